"""Flow `probe`: linear probes on the backbone's output (classification, segmentation), saved with
their held-out metrics; an MLflow run in experiment `probe` and DVC metrics."""

from __future__ import annotations

import sys

from prefect import flow, task

from flows.common import mlflow_run, stage_main, write_metrics
from saev_core import registry
from saev_core.config import to_dict
from saev_core.probes import ProbeConfig, train_probes

METRICS = "metrics/probe.json"


@task  # deterministic given its inputs; DVC caches the stage
def probe_task(cfg: ProbeConfig) -> dict:
    import mlflow

    with mlflow_run(
        "probe", run_name=cfg.out_dir.rstrip("/").split("/")[-1], tags={"stage": "probe"}
    ):
        mlflow.log_params({k: str(v) for k, v in to_dict(cfg).items()})
        results = train_probes(cfg)
        flat = {}
        for task_name, m in results.items():
            for k, v in m.items():
                if isinstance(v, dict):
                    flat |= {f"{task_name}/{k}/{c}": x for c, x in v.items() if x == x}
                else:
                    flat[f"{task_name}/{k}"] = v
        mlflow.log_metrics({k.replace(" ", "_"): float(v) for k, v in flat.items()})
        mlflow.log_artifacts(cfg.out_dir, artifact_path="probes")
    return results


@flow(name="probe", log_prints=True)
def probe_flow(params: str = "params.yaml", overrides: dict | None = None) -> dict:
    cfg = registry.load("probe", params, overrides)
    results = probe_task(cfg)
    summary = {
        t: {
            k: round(v, 4) for k, v in m.items() if k in ("mean_accuracy", "miou", "patch_accuracy")
        }
        for t, m in results.items()
    }
    write_metrics(METRICS, summary, overrides)
    print(f"probes in {cfg.out_dir}: {summary}")
    return results


def main(argv: list[str] | None = None) -> int:
    return stage_main("probe", argv)


if __name__ == "__main__":
    sys.exit(main())
