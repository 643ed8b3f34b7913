"""Flow `train`: train an SAE on the validated shards, log it to MLflow, write DVC metrics."""

from __future__ import annotations

import sys

from prefect import flow, task

from flows.common import file_sha256, mlflow_logger, mlflow_run, parse_args, write_metrics
from saev_core.config import load_section
from saev_core.stages import TrainStage, scalars, train_stage

METRICS = "metrics/train.json"


@task  # no cache and no retries: training is the expensive, non-idempotent part
def train_task(io: TrainStage) -> dict:
    import mlflow

    from saev_core.plots import density_histogram

    manifest = f"{io.shard_dir}/manifest.json"
    with mlflow_run(
        "train",
        run_name=io.out_dir.rstrip("/").split("/")[-1],
        tags={"shard_manifest_sha256": file_sha256(manifest), "stage": "train"},
    ):
        mlflow.log_params({"layer": io.layer, "tokens": io.tokens, **io.sae})
        metrics = train_stage(io, log=mlflow_logger("train/"))
        final = scalars(metrics)
        mlflow.log_metrics(final)
        mlflow.log_figure(density_histogram(metrics["freq"]), "feature_density.png")
        mlflow.log_artifacts(io.out_dir, artifact_path="sae")
    return final


@flow(name="train", log_prints=True)
def train_flow(params: str = "params.yaml") -> dict:
    io = load_section(params, "train", TrainStage)
    metrics = train_task(io)
    write_metrics(METRICS, metrics)
    print(
        f"SAE in {io.out_dir}: L0 {metrics['l0']:.1f}, FVU {metrics['fvu']:.3f}, "
        f"dead {metrics['dead_frac']:.1%}, dense {metrics['dense_frac']:.1%}"
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args("train", argv)
    train_flow(params=args.params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
