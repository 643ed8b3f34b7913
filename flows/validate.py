"""Flow `validate`: the Great Expectations suite over a shard set; stops the pipeline on failure."""

from __future__ import annotations

import sys

from prefect import flow, task

from flows.common import parse_args
from saev_core.config import load_section
from saev_core.validate import ValidateConfig, validate_shards


@task
def validate_task(cfg: ValidateConfig) -> dict:
    return validate_shards(cfg.shard_dir, cfg.report)


@flow(name="validate", log_prints=True)
def validate_flow(params: str = "params.yaml", overrides: dict | None = None) -> dict:
    cfg = load_section(params, "validate", ValidateConfig, overrides)
    report = validate_task(cfg)
    print(f"{report['n_checks']} checks passed on {cfg.shard_dir}; report in {cfg.report}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args("validate", argv, overrides=True)
    validate_flow(params=args.params, overrides=args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
