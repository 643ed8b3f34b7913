"""Flow `intervene`: suppress concept features inside the backbone vs random-feature controls.

Every experiment (concept x strength) is an MLflow run nested under one parent run, with its
parameters, its effect and control intervals, and a before/after image grid; the parent holds a
dose-response plot. The results also go to `results.parquet` for the warehouse.
"""

from __future__ import annotations

import sys

from prefect import flow, task

from flows.common import file_sha256, mlflow_run, parse_args, write_metrics
from saev_core.config import load_section, to_dict
from saev_core.intervene import InterveneConfig, run_interventions, write_results

METRICS = "metrics/intervene.json"


@task
def intervene_task(cfg: InterveneConfig) -> list[dict]:
    import mlflow

    from saev_core.plots import dose_response

    run = cfg.out_dir.rstrip("/").split("/")[-1]
    tags = {"stage": "intervene", "sae_cfg_sha256": file_sha256(f"{cfg.sae_dir}/cfg.json")}
    experiments = run_interventions(cfg)
    rows = []
    with mlflow_run("intervene", run_name=run, tags=tags):
        mlflow.log_params({k: str(v) for k, v in to_dict(cfg).items()})
        for e in experiments:
            with mlflow_run(
                "intervene", run_name=f"{e.concept}@{e.strength:g}", tags=tags, nested=True
            ) as r:
                row = e.row()
                mlflow.log_params(
                    {
                        k: row[k]
                        for k in (
                            "concept",
                            "features",
                            "control_feature",
                            "strength",
                            "scope",
                            "layer",
                        )
                    }
                )
                mlflow.log_metrics(
                    {
                        k: float(row[k])
                        for k in (
                            "auroc",
                            "n_images",
                            "p_before",
                            "p_after",
                            "delta",
                            "delta_lo",
                            "delta_hi",
                            "control_delta",
                            "control_lo",
                            "control_hi",
                            "other_abs_delta",
                        )
                    }
                )
                mlflow.set_tag("below_control", str(e.below_control))
                mlflow.log_figure(e.figure, "before_after.png")
                rows.append({**row, "mlflow_run_id": r.info.run_id})
        mlflow.log_figure(dose_response(rows), "dose_response.png")
    write_results(rows, cfg.out_dir, run)
    return rows


@flow(name="intervene", log_prints=True)
def intervene_flow(params: str = "params.yaml") -> list[dict]:
    cfg = load_section(params, "intervene", InterveneConfig)
    rows = intervene_task(cfg)
    strongest = min(cfg.strengths)
    summary = {}
    for r in rows:
        if r["strength"] == strongest:
            summary[r["concept"]] = {
                "delta": round(r["delta"], 4),
                "control_delta": round(r["control_delta"], 4),
                "below_control": bool(r["below_control"]),
            }
    write_metrics(METRICS, summary)
    for concept, s in summary.items():
        print(
            f"{concept:>9}: dp {s['delta']:+.3f} vs control {s['control_delta']:+.3f}"
            f" {'(below control)' if s['below_control'] else ''}"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args("intervene", argv)
    intervene_flow(params=args.params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
