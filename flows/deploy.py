"""Schedules: serve the `pipeline` flow on a cron schedule (no work pool needed).

    saev serve                         # every day at 03:00, this process runs the scheduled runs
    SAEV_CRON="*/30 * * * *" saev serve

`flow.serve` keeps this process alive as the runner: it polls the Prefect API (the local one by
default, or `PREFECT_API_URL`) and runs each scheduled flow run in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import sys

from flows.pipeline import pipeline_flow

DEFAULT_CRON = "0 3 * * *"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="saev serve", description="Serve the pipeline flow on a cron schedule."
    )
    p.add_argument("--name", default="saev-pipeline", help="deployment name")
    p.add_argument("--cron", default=os.environ.get("SAEV_CRON", DEFAULT_CRON))
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args(argv)
    pipeline_flow.serve(
        name=args.name,
        cron=args.cron,
        parameters={"params": args.params},
        description="extract -> validate -> train -> stats -> intervene -> warehouse",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
