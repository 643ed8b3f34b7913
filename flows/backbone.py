"""Flow `backbone`: train the demo ViT on the built-in `shapes` world (the pipeline's first stage)."""

from __future__ import annotations

import sys

from prefect import flow, task

from flows.common import mlflow_logger, mlflow_run, parse_args, write_metrics
from saev_core.backbone import BackboneConfig, train_backbone
from saev_core.config import load_section, to_dict

METRICS = "metrics/backbone.json"


@task
def train_backbone_task(cfg: BackboneConfig) -> dict:
    import mlflow

    with mlflow_run("backbone", run_name="demo-vit", tags={"stage": "backbone"}):
        mlflow.log_params(to_dict(cfg))
        metrics = train_backbone(cfg, log=mlflow_logger("train/"))
        flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        mlflow.log_metrics(flat)
    return metrics


@flow(name="backbone", log_prints=True)
def backbone_flow(params: str = "params.yaml") -> dict:
    cfg = load_section(params, "backbone", BackboneConfig)
    metrics = train_backbone_task(cfg)
    write_metrics(METRICS, metrics)
    print(f"demo backbone saved to {cfg.out_dir}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args("backbone", argv)
    backbone_flow(params=args.params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
