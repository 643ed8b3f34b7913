"""Flow `extract`: record a backbone's residual stream over the images as Parquet shards."""

from __future__ import annotations

import sys

from prefect import flow, task

from flows.common import dvc_version, parse_args
from saev_core.config import load_section
from saev_core.extract import ExtractConfig, extract


@task(retries=1, retry_delay_seconds=5)
def extract_task(cfg: ExtractConfig) -> dict:
    return extract(cfg)


@task(retries=2, retry_delay_seconds=10)
def version_task(out_dir: str) -> dict:
    """DVC takes the shard set (stage output or `dvc add`) and pushes it to the default remote."""
    return dvc_version(out_dir)


@flow(name="extract", log_prints=True)
def extract_flow(
    params: str = "params.yaml", overrides: dict | None = None, version: bool = True
) -> dict:
    """Extract (or extend) the shard set of the `extract` params section, then version it."""
    cfg = load_section(params, "extract", ExtractConfig, **(overrides or {}))
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
    args = parse_args("extract", argv, overrides=True)
    extract_flow(params=args.params, overrides=args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
