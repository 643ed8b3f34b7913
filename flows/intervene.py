"""Flow `intervene`: test feature hypotheses by editing them inside the model, against controls.

One MLflow parent run per invocation (the run is named after `intervene.out_dir`), with one
nested run per hypothesis x strength: its parameters (strength among them, also a metric, so
that comparing runs plots the dose-response), its effect with its interval, the verdict's
statistics as metrics (`p_value`, `p_adjusted`, `vs_control_lo/hi`, `control_lo/hi`,
`off_target_abs_delta`; `beyond_controls` as 0/1) and the verdict as a tag, tags tying it to
the SAE run, shard manifest and commit, and a before/after image grid with the edited region
outlined (every figure is closed once logged). The parent holds the
run's summary metrics (`summary_metrics`: how many experiments are supported, overall and per
strength, the median adjusted p, the mean off-target change), the dose-response plot, one
concept x concept specificity heat map per strength and the results tables, which also go to
`results.parquet` and `specificity.parquet` for the warehouse.
"""

from __future__ import annotations

import math
import numbers
import sys

import numpy as np
from prefect import flow, task

from flows.common import mlflow_run, runs_table_url, save_runs_view, stage_main, write_metrics
from saev_core import registry
from saev_core.config import to_dict
from saev_core.hypotheses import InterveneConfig

METRICS = "metrics/intervene.json"
PARAM_KEYS = ("hypothesis", "concept", "task", "features", "control_features", "edit",
              "relative", "strength", "scope", "layer", "select_split", "eval_split")  # fmt: skip
# strings of a row that are tags of its run (searchable, shown as columns)
TAG_KEYS = ("verdict", "alternative", "correction")
SUPPORTED = "supported"
# metrics/intervene.json: these per hypothesis and strength, with the verdict
METRIC_KEYS = ("delta", "vs_control_lo", "vs_control_hi", "control_lo", "control_hi", "p_value",
               "p_adjusted", "off_target_abs_delta", "target_change_rate")  # fmt: skip
# the saved view of the runs table the flow prints: the parent's summary metrics and these
RUNS_VIEW = "saev-intervene"
CHILD_COLUMNS = ("delta", "p_adjusted", "vs_control_lo", "vs_control_hi", "off_target_abs_delta")


def child_metrics(row: dict) -> dict[str, float]:
    """The numbers of one experiment's row, as MLflow metrics: every finite number that is not
    a parameter, and the strength (a parameter too) so that a chart can plot against it."""
    out = {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, numbers.Real) and k not in PARAM_KEYS and math.isfinite(v)
    }
    out["strength"] = float(row["strength"])
    return out


def summary_metrics(rows: list[dict]) -> dict[str, float]:
    """The parent run's metrics over every experiment of the run: `n_experiments`,
    `n_supported`, `share_supported` (and `share_supported_at_<strength>` for each strength),
    `median_p_adjusted`, `mean_off_target_abs_delta` and `min_n_controls`."""
    if not rows:
        return {}
    supported = [r.get("verdict") == SUPPORTED for r in rows]
    out = {
        "n_experiments": float(len(rows)),
        "n_supported": float(sum(supported)),
        "share_supported": sum(supported) / len(rows),
    }
    for s in sorted({float(r["strength"]) for r in rows}):
        at = [ok for r, ok in zip(rows, supported, strict=True) if float(r["strength"]) == s]
        out[f"share_supported_at_{s:g}"] = sum(at) / len(at)
    for key, name, fn in (
        ("p_adjusted", "median_p_adjusted", np.median),
        ("off_target_abs_delta", "mean_off_target_abs_delta", np.mean),
        ("n_controls", "min_n_controls", np.min),
    ):
        values = [float(r[key]) for r in rows if _finite(r.get(key))]
        if values:
            out[name] = float(fn(values))
    return out


def _finite(v) -> bool:
    return isinstance(v, numbers.Real) and math.isfinite(v)


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
    from saev_core.plots import _plt, specificity_heatmap

    plt = _plt()
    run = cfg.out_dir.rstrip("/").split("/")[-1]
    cache = Cache(cfg.settings(device))
    rows: list[dict] = []
    specificity: list[dict] = []
    tags = {"stage": "intervene", **provenance(cfg.sae_dir, cfg.stats_dir)}
    with mlflow_run("intervene", run_name=run, tags=tags) as parent:
        mlflow.log_params({k: str(v)[:500] for k, v in to_dict(cfg).items()})

        def log(result) -> None:
            # run_all calls this after the multiplicity correction: p_adjusted and verdict are final
            h = result.hypothesis
            h_tags = {"stage": "intervene", "parent": run, **provenance(h.sae_dir, h.stats_dir)}
            for i, row in enumerate(result.rows):
                with mlflow_run(
                    "intervene", run_name=row["experiment"], tags=h_tags, nested=True
                ) as r:
                    mlflow.log_params({k: str(row[k]) for k in PARAM_KEYS if k in row})
                    mlflow.log_metrics(child_metrics(row))
                    mlflow.set_tags({k: str(row[k]) for k in TAG_KEYS if row.get(k) is not None})
                    if i < len(result.figures):
                        mlflow.log_figure(result.figures[i], "before_after.png")
                    rows.append({**row, "mlflow_run_id": r.info.run_id})
            for fig in result.figures:  # logged: free them (pyplot warns past 20 open)
                plt.close(fig)
            result.figures.clear()
            specificity.extend(result.specificity)

        run_all(plan(cfg, cache), cache, on_result=log)
        summary = summary_metrics(rows)
        mlflow.log_metrics(summary)
        exp_id = parent.info.experiment_id
        save_runs_view(exp_id, RUNS_VIEW, "saev: verdicts", metrics=[*summary, *CHILD_COLUMNS],
                       params=("hypothesis", "strength"), tags=("verdict",))  # fmt: skip
        fig = dose_response_figure(rows)
        mlflow.log_figure(fig, "dose_response.png")
        plt.close(fig)
        for s in sorted({float(r["strength"]) for r in specificity}):
            fig = specificity_heatmap(specificity, s)
            mlflow.log_figure(fig, f"specificity/strength_{s:g}.png")
            plt.close(fig)
        table_keys = ("experiment", "verdict", "beyond_controls", "delta", "vs_control_lo",
                      "vs_control_hi", "control_lo", "control_hi", "p_value", "p_adjusted",
                      "off_target_abs_delta")  # fmt: skip
        mlflow.log_table({k: [r.get(k) for r in rows] for k in table_keys}, "results.json")
        if specificity:
            keys = ("experiment", "edited_concept", "strength", "concept", "delta", "delta_lo",
                    "delta_hi")  # fmt: skip
            mlflow.log_table({k: [r.get(k) for r in specificity] for k in keys}, "specificity.json")
        print(f"intervene: MLflow runs table: {runs_table_url(exp_id, view=RUNS_VIEW)}")
    write_results(rows, cfg.out_dir, run, specificity)
    return rows


@flow(name="intervene", log_prints=True)
def intervene_flow(
    params: str = "params.yaml", device: str = "cpu", overrides: dict | None = None
) -> list[dict]:
    cfg = registry.load("intervene", params, overrides)
    rows = intervene_task(cfg, device)
    # One entry per hypothesis and strength: the dose-response, with the verdict against controls.
    summary: dict[str, dict] = {}
    for r in rows:
        summary.setdefault(r["hypothesis"], {})[f"{r['strength']:g}"] = {
            k: (round(float(r[k]), 4) if _finite(r.get(k)) else None) for k in METRIC_KEYS
        } | {k: r.get(k) for k in ("verdict", "beyond_controls", "n_controls")}
    write_metrics(METRICS, summary, overrides)
    for name, by_strength in summary.items():
        for strength, m in by_strength.items():
            print(
                f"{name:>12} @ {strength:>4}: dp {_fmt(m['delta'])} vs {m['n_controls']} controls "
                f"[{_fmt(m['control_lo'])}, {_fmt(m['control_hi'])}], edit - controls "
                f"[{_fmt(m['vs_control_lo'])}, {_fmt(m['vs_control_hi'])}], p_adj "
                f"{_fmt(m['p_adjusted'], '.3g')}, beyond controls: {m.get('beyond_controls')}: "
                f"{m['verdict']}"
            )
    return rows


def _fmt(v, spec: str = "+.3f") -> str:
    return "n/a" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    return stage_main("intervene", argv)


if __name__ == "__main__":
    sys.exit(main())
