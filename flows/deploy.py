"""Schedules: serve the `pipeline` flow on a cron schedule (no work pool needed).

    saev serve                         # every day at 03:00; this process runs the scheduled runs
    SAEV_CRON="*/30 * * * *" saev serve

`prefect.serve` keeps this process alive as the runner: it registers the deployment with the
Prefect API (`PREFECT_API_URL`, or a local server started with `prefect server start`) and runs
each scheduled flow run in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import sys

from flows.pipeline import pipeline_flow

DEFAULT_CRON = "0 3 * * *"


def build_deployment(
    name: str = "saev-pipeline", cron: str = DEFAULT_CRON, params: str = "params.yaml"
):
    """The pipeline as a deployment with a cron schedule (not yet registered)."""
    return pipeline_flow.to_deployment(
        name=name,
        cron=cron,
        parameters={"params": params},
        description="backbone -> extract -> validate -> train -> stats -> intervene -> warehouse",
        tags=["saev"],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="saev serve",
        description="Serve the pipeline flow on a cron schedule; runs until interrupted.",
    )
    p.add_argument("--name", default="saev-pipeline", help="deployment name (default: %(default)s)")
    p.add_argument(
        "--cron",
        default=os.environ.get("SAEV_CRON", DEFAULT_CRON),
        help="cron schedule, default $SAEV_CRON or %(default)s",
    )
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args(argv)
    from prefect import serve

    serve(build_deployment(args.name, args.cron, args.params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
