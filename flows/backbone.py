"""Flow `backbone`: train the demo ViT on the built-in `shapes` world (the pipeline's first stage)."""

from __future__ import annotations

import sys

from prefect import flow, task

from flows.common import mlflow_logger, mlflow_run, stage_main, write_metrics
from saev_core import registry
from saev_core.config import to_dict
from saev_core.demo_vit import BackboneConfig, tracked_metrics, train_backbone

METRICS = "metrics/backbone.json"


@task
def train_backbone_task(cfg: BackboneConfig) -> dict:
    import mlflow

    with mlflow_run("backbone", run_name="demo-vit", tags={"stage": "backbone"}):
        mlflow.log_params(to_dict(cfg))
        metrics = train_backbone(cfg, log=mlflow_logger("train/"))
        mlflow.log_metrics(
            {
                f"{k}/{c}" if isinstance(v, dict) else k: float(x)
                for k, v in summary(metrics).items()
                for c, x in (v.items() if isinstance(v, dict) else [(None, v)])
            }
        )
    return metrics


def summary(metrics: dict) -> dict:
    """The numbers worth a DVC metric: scalars and per-concept dicts of scalars (no history)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
        elif isinstance(v, dict) and v and all(isinstance(x, (int, float)) for x in v.values()):
            out[k] = v
    return out


@flow(name="backbone", log_prints=True)
def backbone_flow(params: str = "params.yaml", overrides: dict | None = None) -> dict:
    cfg = registry.load("backbone", params, overrides)
    metrics = train_backbone_task(cfg)
    write_metrics(METRICS, summary(tracked_metrics(metrics)), overrides)  # timings: MLflow only
    print(f"demo backbone saved to {cfg.out_dir}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("backbone", argv)


if __name__ == "__main__":
    sys.exit(main())
