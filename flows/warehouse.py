"""Flow `warehouse`: rebuild `warehouse/saev.duckdb` from the stats, images and intervention Parquet."""

from __future__ import annotations

import sys

from prefect import flow, task

from flows.common import stage_main
from saev_core import registry
from saev_core.warehouse import WarehouseConfig, build_warehouse


@task(retries=1, retry_delay_seconds=2)
def build_task(cfg: WarehouseConfig) -> dict:
    return build_warehouse(
        cfg.db, root=".", sql_dir=cfg.sql_dir, n_matches=cfg.n_matches, materialize=cfg.materialize
    )


@flow(name="warehouse", log_prints=True)
def warehouse_flow(params: str = "params.yaml", overrides: dict | None = None) -> dict:
    cfg = registry.load("warehouse", params, overrides)
    report = build_task(cfg)
    print(f"warehouse {cfg.db}: {report}")
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main("warehouse", argv)


if __name__ == "__main__":
    sys.exit(main())
