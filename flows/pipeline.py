"""Flow `pipeline`: every stage in order, as sub-flows, in one process.

`dvc repro` runs the same stage flows one process per stage and skips the ones whose inputs did
not change; this flow is what a Prefect deployment runs on a schedule (see `deploy.py`), with
`version=True`: the run is tagged with the git commit and data version, and every output is
committed to DVC and pushed to the configured remote. With `distributed`, each of the
extraction's `partitions` is a flow run of its own, taken by any worker of the pool
(`flows/distributed.py`, docs/scale-out.md): the flow then needs a Prefect server, checked first;
`staging_url` (default `$SAEV_STAGING_URL`) sends the partitions' chunks through a bucket.
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow

from saev_core.registry import STAGES as REGISTRY

# Every stage's flow, in order (saev_core/registry.py declares them).
STAGES = {name: stage.flow_function() for name, stage in REGISTRY.items()}

# Stages that run best on a GPU; a deployment that includes one asks for the GPU work pool.
GPU_STAGES = tuple(name for name, stage in REGISTRY.items() if stage.gpu)

# The params key of each stage's output, versioned after a run (extract versions its own shards;
# validate's report is a small uncached file that dvc.lock records).
OUTPUTS = {name: stage.output for name, stage in REGISTRY.items() if stage.output}


@flow(name="pipeline", log_prints=True)
def pipeline_flow(
    params: str = "params.yaml",
    skip: list[str] | None = None,
    version: bool = False,
    partitions: int = 1,
    distributed: bool = False,
    staging_url: str | None = None,
) -> None:
    """Every stage in order; with `version`, tag the run and commit + push what it wrote.

    `distributed`: the extraction's partitions are flow runs on the work pool (see `extract`);
    `staging_url` (`s3://bucket/prefix`, default `$SAEV_STAGING_URL`): they exchange their
    chunks through that bucket, each in its worker's own clone of the project."""
    from flows.common import placement, provenance, tag_flow_run, version_outputs_task
    from saev_core.config import read_params

    ran = [name for name in STAGES if not (skip and name in skip)]
    if staging_url and not distributed:
        raise ValueError("pipeline_flow: staging_url needs distributed=True")
    if distributed and "extract" in ran:
        from flows.distributed import require_server
        from flows.distributed import staging_url as staging_url_of

        require_server("saev pipeline --distributed")  # before the backbone trains for minutes
        staging_url_of(staging_url)  # a bad URL too
    print(placement(needs_gpu=any(s in GPU_STAGES for s in ran)))
    if version:
        print(f"provenance: {tag_flow_run(provenance())}")
    for name, stage in STAGES.items():
        if name not in ran:
            print(f"skipping {name}")
        elif name == "extract":
            # versions its shards itself
            stage(
                params=params,
                partitions=partitions,
                distributed=distributed,
                staging_url=staging_url,
            )
        else:
            stage(params=params)
    if version:
        p = read_params(params)
        outs = [p[s][OUTPUTS[s]] for s in ran if s in OUTPUTS and s in p]
        print(f"DVC: {version_outputs_task(outs)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="saev pipeline",
        description="Run every stage in order in one process (no DVC caching: use `dvc repro` "
        "for that).",
    )
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--skip", nargs="*", default=[], choices=list(STAGES), help="stages to skip")
    p.add_argument(
        "--version",
        action="store_true",
        help="tag the run with git commit and data version, then commit every output to DVC "
        "and push it to the remote (what scheduled runs do)",
    )
    p.add_argument("--partitions", type=int, default=1, help="extraction partitions")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="each extraction partition its own flow run, taken by any worker of the work pool "
        "(needs PREFECT_API_URL and `saev worker`s; paths on storage every worker shares)",
    )
    p.add_argument(
        "--staging-url",
        default=None,
        metavar="s3://BUCKET/PREFIX",
        help="with --distributed: the extraction's partitions send their chunks through this "
        "bucket prefix and each runs in its worker's own clone of the project (default: "
        "$SAEV_STAGING_URL; unset, the project directory must be a path every worker shares)",
    )
    args = p.parse_args(argv)
    if args.staging_url and not args.distributed:
        raise SystemExit("saev pipeline: --staging-url needs --distributed")
    if args.distributed and "extract" not in args.skip:
        from flows.distributed import require_server, staging_url

        require_server("saev pipeline --distributed")  # before a temporary server starts
        staging_url(args.staging_url)
    pipeline_flow(
        params=args.params,
        skip=args.skip,
        version=args.version,
        partitions=args.partitions,
        distributed=args.distributed,
        staging_url=args.staging_url,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
