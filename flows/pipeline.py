"""Flow `pipeline`: every stage in order, as sub-flows, in one process.

`dvc repro` runs the same stage flows one process per stage and skips the ones whose inputs did
not change; this flow is what a Prefect deployment runs on a schedule (see `deploy.py`).
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow

from flows.backbone import backbone_flow
from flows.extract import extract_flow
from flows.intervene import intervene_flow
from flows.stats import stats_flow
from flows.train import train_flow
from flows.validate import validate_flow
from flows.warehouse import warehouse_flow

STAGES = {
    "backbone": backbone_flow,
    "extract": extract_flow,
    "validate": validate_flow,
    "train": train_flow,
    "stats": stats_flow,
    "intervene": intervene_flow,
    "warehouse": warehouse_flow,
}


@flow(name="pipeline", log_prints=True)
def pipeline_flow(params: str = "params.yaml", skip: list[str] | None = None) -> None:
    for name, stage in STAGES.items():
        if skip and name in skip:
            print(f"skipping {name}")
            continue
        stage(params=params)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="saev pipeline",
        description="Run every stage in order in one process (no DVC caching: use `dvc repro` "
        "for that).",
    )
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--skip", nargs="*", default=[], choices=list(STAGES), help="stages to skip")
    args = p.parse_args(argv)
    pipeline_flow(params=args.params, skip=args.skip)
    return 0


if __name__ == "__main__":
    sys.exit(main())
