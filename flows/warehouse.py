"""Flow `warehouse`: rebuild `warehouse/saev.duckdb` from the stats, images and intervention Parquet."""

from __future__ import annotations

import sys

from prefect import flow, task

from flows.common import parse_args
from saev_core.config import load_section
from saev_core.warehouse import WarehouseConfig, build_warehouse


@task(retries=1, retry_delay_seconds=2)
def build_task(cfg: WarehouseConfig) -> dict:
    return build_warehouse(
        cfg.db, root=".", sql_dir=cfg.sql_dir, n_matches=cfg.n_matches, materialize=cfg.materialize
    )


@flow(name="warehouse", log_prints=True)
def warehouse_flow(params: str = "params.yaml", overrides: dict | None = None) -> dict:
    cfg = load_section(params, "warehouse", WarehouseConfig, overrides)
    report = build_task(cfg)
    print(f"warehouse {cfg.db}: {report}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args("warehouse", argv, overrides=True)
    warehouse_flow(params=args.params, overrides=args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
