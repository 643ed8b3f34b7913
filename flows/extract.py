"""Flow `extract`: record a backbone's residual stream over the images as Parquet shards."""

from __future__ import annotations

import sys

from prefect import flow, task

from flows.common import parse_args
from saev_core.config import load_section
from saev_core.extract import ExtractConfig, extract


@task(retries=1, retry_delay_seconds=5)
def extract_task(cfg: ExtractConfig) -> dict:
    return extract(cfg)


@flow(name="extract", log_prints=True)
def extract_flow(params: str = "params.yaml") -> dict:
    cfg = load_section(params, "extract", ExtractConfig)
    manifest = extract_task(cfg)
    print(
        f"wrote {manifest['n_images']} images x {manifest['tokens']['n_tokens_written']} tokens "
        f"x layers {manifest['layers']} to {cfg.out_dir} ({len(manifest['skipped'])} skipped)"
    )
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = parse_args("extract", argv)
    extract_flow(params=args.params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
