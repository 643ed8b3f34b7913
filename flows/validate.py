"""Flow `validate`: the Great Expectations suite over a shard set; stops the pipeline on failure."""

from __future__ import annotations

import sys

from prefect import flow, task

from flows.common import stage_main
from saev_core import registry
from saev_core.validate import ValidateConfig, validate_shards


@task
def validate_task(cfg: ValidateConfig) -> dict:
    return validate_shards(cfg.shard_dir, cfg.report)


@flow(name="validate", log_prints=True)
def validate_flow(params: str = "params.yaml", overrides: dict | None = None) -> dict:
    cfg = registry.load("validate", params, overrides)
    report = validate_task(cfg)
    print(f"{report['n_checks']} checks passed on {cfg.shard_dir}; report in {cfg.report}")
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main("validate", argv)


if __name__ == "__main__":
    sys.exit(main())
