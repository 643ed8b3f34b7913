"""Flow `stats`: per-feature statistics of the trained SAE, streamed over the shards."""

from __future__ import annotations

import sys

from prefect import flow, task

from flows.common import parse_args
from saev_core.config import load_section
from saev_core.stages import StatsStage, stats_stage


@task
def stats_task(io: StatsStage) -> dict:
    return stats_stage(io)


@flow(name="stats", log_prints=True)
def stats_flow(params: str = "params.yaml") -> dict:
    io = load_section(params, "stats", StatsStage)
    summary = stats_task(io)
    print(
        f"stats of {io.sae_dir} over {summary['n_images']} images ({summary['n_tokens']} tokens), "
        f"{len(summary['labels'])} labels -> {io.out_dir}"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args("stats", argv)
    stats_flow(params=args.params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
