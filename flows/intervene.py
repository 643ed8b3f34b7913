"""Flow `intervene`: test feature hypotheses by editing them inside the model, against controls.

One MLflow parent run per invocation (the run is named after `intervene.out_dir`), with one
nested run per hypothesis x strength: its parameters, its effect and the three controls with
95% intervals, tags tying it to the SAE run, shard manifest and commit, and a before/after image
grid with the edited region outlined. The parent holds the dose-response plot and the results
table, which also goes to `results.parquet` for the warehouse's `interventions` table.
"""

from __future__ import annotations

import sys

from prefect import flow, task

from flows.common import mlflow_run, parse_args, write_metrics
from saev_core.config import load_section, to_dict
from saev_core.intervene import InterveneConfig

METRICS = "metrics/intervene.json"
PARAM_KEYS = ("hypothesis", "concept", "task", "features", "control_features", "edit",
              "relative", "strength", "scope", "layer")  # fmt: skip


@task
def intervene_task(cfg: InterveneConfig, device: str = "cpu") -> list[dict]:
    import mlflow

    from saev_core.hypotheses import (
        Cache,
        dose_response_figure,
        plan,
        provenance,
        run_all,
        write_results,
    )

    run = cfg.out_dir.rstrip("/").split("/")[-1]
    cache = Cache(cfg.settings(device))
    rows: list[dict] = []
    tags = {"stage": "intervene", **provenance(cfg.sae_dir, cfg.stats_dir)}
    with mlflow_run("intervene", run_name=run, tags=tags):
        mlflow.log_params({k: str(v)[:500] for k, v in to_dict(cfg).items()})

        def log(result) -> None:
            h = result.hypothesis
            h_tags = {"stage": "intervene", "parent": run, **provenance(h.sae_dir, h.stats_dir)}
            for i, row in enumerate(result.rows):
                with mlflow_run(
                    "intervene", run_name=row["experiment"], tags=h_tags, nested=True
                ) as r:
                    mlflow.log_params({k: str(row[k]) for k in PARAM_KEYS})
                    mlflow.log_metrics(
                        {
                            k: float(v)
                            for k, v in row.items()
                            if isinstance(v, (int, float)) and k not in PARAM_KEYS and v == v
                        }
                    )
                    mlflow.set_tag("below_control", str(row["below_control"]))
                    if i < len(result.figures):
                        mlflow.log_figure(result.figures[i], "before_after.png")
                    rows.append({**row, "mlflow_run_id": r.info.run_id})

        run_all(plan(cfg, cache), cache, on_result=log)
        mlflow.log_figure(dose_response_figure(rows), "dose_response.png")
        mlflow.log_table(
            {k: [r.get(k) for r in rows] for k in ("experiment", "delta", "control_delta")},
            "results.json",
        )
    write_results(rows, cfg.out_dir, run)
    return rows


@flow(name="intervene", log_prints=True)
def intervene_flow(params: str = "params.yaml", device: str = "cpu") -> list[dict]:
    cfg = load_section(params, "intervene", InterveneConfig)
    rows = intervene_task(cfg, device)
    # One entry per hypothesis and strength: the dose-response, with both controls' verdict.
    summary: dict[str, dict] = {}
    for r in rows:
        los = [r[k] for k in ("control_delta_lo", "direction_delta_lo") if k in r]
        summary.setdefault(r["hypothesis"], {})[f"{r['strength']:g}"] = {
            "delta": round(r["delta"], 4),
            "control_delta": round(r.get("control_delta", float("nan")), 4),
            "direction_delta": round(r.get("direction_delta", float("nan")), 4),
            "target_change_rate": round(r["target_change_rate"], 4),
            "below_controls": bool(los) and all(r["delta_hi"] < lo for lo in los),
        }
    write_metrics(METRICS, summary)
    for name, by_strength in summary.items():
        for strength, m in by_strength.items():
            print(
                f"{name:>12} @ {strength:>4}: dp {m['delta']:+.3f} vs random feature "
                f"{m['control_delta']:+.3f}, random direction {m['direction_delta']:+.3f}"
                f"{' (below both controls)' if m['below_controls'] else ''}"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args("intervene", argv)
    intervene_flow(params=args.params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
