"""Flow `stats`: per-feature statistics of the trained SAE, streamed over the shards.

MLflow: one run in experiment `stats` per stats run, with the dead/dense shares, the exemplar grid
(`exemplars.png`: each label's best feature, its top images with heat maps) and the HTML feature
browser (`browser.html`, self-contained: download and open it).
"""

from __future__ import annotations

import sys

from prefect import flow, task

from flows.common import file_sha256, mlflow_run, stage_main
from saev_core import registry
from saev_core.stats.stage import StatsStage, stats_stage


@task
def stats_task(io: StatsStage) -> dict:
    return stats_stage(io)


@task(retries=1, retry_delay_seconds=2)
def log_task(io: StatsStage, summary: dict) -> None:
    import mlflow

    tags = {"stage": "stats", "shard_manifest_sha256": file_sha256(f"{io.shard_dir}/manifest.json")}
    with mlflow_run("stats", run_name=io.run, tags=tags):
        mlflow.log_params({"sae_dir": io.sae_dir, "shard_dir": io.shard_dir, **io.options})
        mlflow.log_metrics(
            {k: float(summary[k]) for k in ("n_tokens", "n_images", "dead_frac", "dense_frac")}
        )
        for key in ("exemplars_png", "browser"):
            if key in summary:
                mlflow.log_artifact(summary[key])


@flow(name="stats", log_prints=True)
def stats_flow(params: str = "params.yaml", overrides: dict | None = None) -> dict:
    """Stats of the `stats` params section (`overrides` replace its keys for this run)."""
    io = registry.load("stats", params, overrides)
    summary = stats_task(io)
    log_task(io, summary)
    print(
        f"stats of {io.sae_dir} over {summary['n_images']} images ({summary['n_tokens']} tokens), "
        f"{len(summary['labels'])} labels -> {io.out_dir}"
        + (f"; browser: {summary['browser']}" if "browser" in summary else "")
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("stats", argv)


if __name__ == "__main__":
    sys.exit(main())
