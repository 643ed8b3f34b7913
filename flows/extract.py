"""Flow `extract`: record a backbone's residual stream over the images as Parquet shards.

With `partitions` > 1 the images are fanned out: one task plans the chunks, one mapped task per
partition extracts its share (each writing its own shard files), and a last task merges them
into one manifest; the shard set is byte-identical to a single-worker run. With `distributed`
each partition is instead its own flow run of the `saev-extract-partition` deployment, which
any worker of the pool may take (flows/distributed.py: shared storage, crashed runs resubmitted).
"""

from __future__ import annotations

import sys

from prefect import flow, task, unmapped

from flows.common import dvc_version, stage_main
from flows.settings import GPU_TAG
from saev_core import registry
from saev_core.extract import (
    ExtractConfig,
    extract,
    extract_partition,
    merge_partitions,
    plan_partitions,
)


@task(retries=1, retry_delay_seconds=5, tags=[GPU_TAG])
def extract_task(cfg: ExtractConfig) -> dict:
    return extract(cfg)


@task(retries=1, retry_delay_seconds=5)
def plan_task(cfg: ExtractConfig, partitions: int) -> dict:
    """Stage the plan and deal its unfinished chunks out to the partitions."""
    return plan_partitions(cfg, partitions)


# A retry redoes only the partition's unfinished chunks (finished ones have their record).
@task(retries=2, retry_delay_seconds=2, tags=[GPU_TAG])
def partition_task(cfg: ExtractConfig, chunks: list[str]) -> list[str]:
    """Extract one partition's chunks into the staging directory."""
    return extract_partition(cfg, chunks)


@task(retries=1, retry_delay_seconds=5)
def merge_task(cfg: ExtractConfig) -> dict:
    """One manifest over every partition's files; the set then replaces `out_dir` atomically."""
    return merge_partitions(cfg)


@task(retries=2, retry_delay_seconds=10)
def version_task(out_dir: str) -> dict:
    """DVC takes the shard set (stage output or `dvc add`) and pushes it to the default remote."""
    return dvc_version(out_dir)


@flow(name="extract", log_prints=True)
def extract_flow(
    params: str = "params.yaml",
    overrides: dict | None = None,
    version: bool = True,
    partitions: int = 1,
    distributed: bool = False,
    staging_url: str | None = None,
) -> dict:
    """Extract (or extend) the shard set of the `extract` params section, then version it.

    `distributed`: one flow run per partition on the work pool, not mapped tasks in this run.
    `staging_url` (`s3://bucket/prefix`, default `$SAEV_STAGING_URL`): the partitions exchange
    their chunks through the bucket and each runs in its worker's own clone of the project, so
    the workers share nothing but the Prefect server and the bucket (flows/distributed.py)."""
    cfg = registry.load("extract", params, overrides)
    if staging_url and not distributed:
        raise ValueError("extract_flow: staging_url needs distributed=True")
    if distributed:
        from flows.distributed import finish_bucket, require_server, run_partitions
        from flows.distributed import staging_url as staging_url_of

        require_server("saev extract --distributed")  # before planning: fail in a second
        staging = staging_url_of(staging_url)  # a bad URL fails before anything runs
        plan = plan_task(cfg, partitions)
        print(
            f"{cfg.out_dir}: {sum(map(len, plan['partitions']))} of {plan['n_chunks']} chunks "
            f"to extract, in {len(plan['partitions'])} flow runs"
        )
        bucket = run_partitions(cfg, plan["partitions"], staging=staging)
        manifest = merge_task(cfg)
        finish_bucket(cfg, bucket)  # the set is published: empty the plan's bucket folder
    elif partitions > 1:
        plan = plan_task(cfg, partitions)
        print(
            f"{cfg.out_dir}: {sum(map(len, plan['partitions']))} of {plan['n_chunks']} chunks "
            f"to extract, in {len(plan['partitions'])} partitions"
        )
        done = partition_task.map(unmapped(cfg), plan["partitions"])
        manifest = merge_task(cfg, wait_for=done)
    else:
        manifest = extract_task(cfg)
    print(
        f"{cfg.out_dir}: {manifest['n_images']} images x {manifest['tokens']['n_tokens_written']} "
        f"tokens x layers {manifest['layers']} ({len(manifest['skipped'])} skipped, listed in "
        f"{cfg.out_dir}/skipped.json)"
    )
    if version:
        result = version_task(cfg.out_dir)
        print(f"DVC: {result}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    def options(p) -> None:
        p.add_argument(
            "--partitions",
            type=int,
            default=1,
            help="fan the images out over this many mapped tasks (flow runs with --distributed), "
            "merged into one shard set identical to a single-worker run (default: %(default)s)",
        )
        p.add_argument(
            "--distributed",
            action="store_true",
            help="each partition its own flow run, taken by any worker of the work pool "
            "(needs PREFECT_API_URL and `saev worker`s; paths on storage every worker shares)",
        )
        p.add_argument(
            "--staging-url",
            default=None,
            metavar="s3://BUCKET/PREFIX",
            help="with --distributed: the partitions send their chunks through this bucket "
            "prefix and each runs in its worker's own clone of the project, so workers share "
            "only the Prefect server and the bucket (default: $SAEV_STAGING_URL; unset, the "
            "project directory must be a path every worker shares)",
        )
        p.add_argument("--no-version", action="store_true", help="do not hand the shard set to DVC")

    def check(args) -> None:
        if args.staging_url and not args.distributed:
            raise SystemExit("saev extract: --staging-url needs --distributed")
        if args.distributed:
            from flows.distributed import require_server

            require_server("saev extract --distributed")  # before a temporary server starts

    return stage_main(
        "extract",
        argv,
        extra=options,
        check=check,
        partitions=lambda a: a.partitions,
        distributed=lambda a: a.distributed,
        staging_url=lambda a: a.staging_url,
        version=lambda a: not a.no_version,
    )


if __name__ == "__main__":
    sys.exit(main())
