"""Flow `refresh`: new images in the watched folder -> extend the shards -> stats -> warehouse.

The watched folder is `extract.data` of the params file. The `saev-refresh` deployment
(`flows/deploy.py`) runs this flow every few minutes; when the folder holds no image the shard
set lacks, it stops after a cheap listing. Otherwise it extracts only the new images (the shard
set grows incrementally, see `saev_core/extract/`), validates the grown set, recomputes the
SAE's statistics and rebuilds the warehouse, then versions what it wrote with DVC and records
the run in MLflow (experiment `service`). With `distributed`, the new images' partitions are flow
runs of their own on the work pool (`flows/distributed.py`, docs/scale-out.md); the flow then
checks for a Prefect server first (and that `staging_url`, the bucket the chunks may go through,
is one), even on a run that finds nothing new.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from prefect import flow, task

from flows.common import (
    file_sha256,
    mlflow_run,
    parse_args,
    placement,
    provenance,
    tag_flow_run,
    version_outputs_task,
)
from flows.extract import extract_flow
from flows.stats import stats_flow
from flows.validate import validate_flow
from flows.warehouse import warehouse_flow
from saev_core.config import read_params
from saev_core.data import load_records
from saev_core.extract import ExtractConfig, pending


@task(retries=2, retry_delay_seconds=5)
def new_images_task(
    data: str, out_dir: str, splits: tuple[str, ...], val_fraction: float = 0.1
) -> int:
    """How many images of the source the shard set does not hold yet (no model loaded)."""
    import pyarrow.parquet as pq

    records = load_records(data, splits, val_fraction)
    images = Path(out_dir) / "images.parquet"
    if images.exists():
        if "key" not in pq.read_schema(images).names:
            raise ValueError(
                f"{out_dir} predates stable image keys and cannot be extended: delete it and "
                "run again (the whole folder is then extracted)"
            )
        manifest = json.loads((Path(out_dir) / "manifest.json").read_text())
        extracted = pq.read_table(images, columns=["key"]).column("key").to_pylist()
        return len(pending(records, manifest, extracted))
    return len(records)


def tracked_input(path: str | Path) -> Path | None:
    """The DVC-tracked folder (`<folder>.dvc` next to it) holding `path`, if any."""
    path = Path(path).resolve()
    for p in [path, *path.parents]:
        if not p.name or (p / ".dvc").is_dir():  # not above the file system or the DVC root
            return None
        if p.with_name(p.name + ".dvc").exists():
            return p
    return None


@flow(name="refresh", log_prints=True)
def refresh_flow(
    params: str = "params.yaml",
    partitions: int = 1,
    version: bool = True,
    distributed: bool = False,
    staging_url: str | None = None,
) -> dict:
    """Bring shards, stats and warehouse up to date with the images in `extract.data`.

    `distributed`: the extraction's partitions are flow runs on the work pool (see `extract`);
    `staging_url` (`s3://bucket/prefix`, default `$SAEV_STAGING_URL`): they exchange their
    chunks through that bucket, each in its worker's own clone of the project."""
    if staging_url and not distributed:  # said now, not on the day new images arrive
        raise ValueError("refresh_flow: staging_url needs distributed=True")
    if distributed:
        from flows.distributed import require_server
        from flows.distributed import staging_url as staging_url_of

        # said on the first run, not on the day new images arrive
        require_server("saev refresh --distributed")
        staging_url_of(staging_url)
    started = time.time()
    print(placement(needs_gpu=True))
    p = read_params(params)
    cfg = ExtractConfig(**{k: v for k, v in p["extract"].items() if k in ("data", "out_dir")})
    splits = tuple(p["extract"].get("splits", ExtractConfig.splits))
    n_new = new_images_task(cfg.data, cfg.out_dir, splits, cfg.val_fraction)
    if n_new == 0:
        print(f"no new images in {cfg.data}: shards, stats and warehouse are up to date")
        return {"new_images": 0}
    print(f"{n_new} new images in {cfg.data}")
    manifest = extract_flow(
        params=params,
        version=False,
        partitions=partitions,
        distributed=distributed,
        staging_url=staging_url,
    )
    validate_flow(params=params)
    stats_flow(params=params)
    warehouse_flow(params=params)
    versioned = []
    if version:  # the input folder too, if DVC tracks it: the data version then names it
        source = tracked_input(cfg.data)
        outs = [p["extract"]["out_dir"], p["stats"]["out_dir"], p["warehouse"]["db"]]
        versioned = version_outputs_task([source, *outs] if source else outs)
    tags = provenance()
    tag_flow_run(tags)
    summary = {"new_images": n_new, "n_images": manifest["n_images"]}
    _record(tags, summary, p, versioned, time.time() - started)
    print(f"refresh done: {summary}; DVC: {versioned}")
    return {**summary, "dvc": versioned}


def _record(tags: dict, summary: dict, p: dict, versioned: list, seconds: float) -> None:
    """One MLflow run per refresh, tagged like every run (git commit, data version, manifest)."""
    import mlflow
    from prefect.runtime import flow_run

    manifest = Path(p["extract"]["out_dir"]) / "manifest.json"
    with mlflow_run(
        "service",
        run_name="refresh",
        tags={
            **tags,
            "stage": "refresh",
            "shard_manifest_sha256": file_sha256(manifest),
            "prefect_flow_run_id": str(flow_run.get_id() or ""),
            "dvc_pushed_to": ",".join(sorted({v.get("pushed_to", "") for v in versioned} - {""})),
        },
    ):
        mlflow.log_metrics({**summary, "seconds": seconds})


def main(argv: list[str] | None = None) -> int:
    def options(p) -> None:
        p.add_argument(
            "--partitions",
            type=int,
            default=1,
            help="fan the new images out over this many partitions (default: %(default)s)",
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
            "prefix and each runs in its worker's own clone of the project (default: "
            "$SAEV_STAGING_URL; unset, the project directory must be a path every worker shares)",
        )

    args = parse_args("refresh", argv, extra=options)
    if args.staging_url and not args.distributed:
        raise SystemExit("saev refresh: --staging-url needs --distributed")
    if args.distributed:
        from flows.distributed import require_server, staging_url

        require_server("saev refresh --distributed")  # before a temporary server starts
        staging_url(args.staging_url)
    refresh_flow(
        params=args.params,
        partitions=args.partitions,
        distributed=args.distributed,
        staging_url=args.staging_url,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
