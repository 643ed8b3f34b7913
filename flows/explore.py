"""`saev explore`: the interactive app over one run (saev_core/explore/), with MLflow behind
its "log this intervention" button.

Not a pipeline stage: it serves a run the stages produced. This module only adds tracking, which
`saev_core` leaves to a callback: each logged intervention is one MLflow run in experiment
`explore`, tagged like every other run (git commit, data version) and with the SAE's provenance,
holding the image, the edits and where they apply as parameters, the before/after numbers as
metrics and the whole record (prediction included) as `intervention.json`.
"""

from __future__ import annotations

import sys
from typing import Any

from flows.common import mlflow_run, runs_table_url

EXPERIMENT = "explore"


def log_intervention(record: dict[str, Any]) -> dict[str, Any]:
    """One MLflow run for one intervention shown in the app; returns its ids and the runs
    table's address."""
    import mlflow

    from saev_core.hypotheses import provenance

    edits = ",".join(f"{e['feature']}:{e['scale']:g}" for e in record["edits"]) or "none"
    tags = {"stage": "explore", **provenance(record["sae_dir"], record["stats_dir"])}
    name = f"{record['image']} {edits}"[:250]
    with mlflow_run(EXPERIMENT, run_name=name, tags=tags) as run:
        mlflow.log_params(
            {
                "image": record["image"],
                "edits": edits[:500],
                "where": record["where"],
                "patches": ",".join(map(str, record["patches"]))[:500] or "all",
                "model": record["model"],
                "layer": record["layer"],
                "run": record["run"],
            }
        )
        mlflow.log_metrics(intervention_metrics(record["prediction"]))
        mlflow.log_dict(record, "intervention.json")
        exp_id = run.info.experiment_id
        return {"run_id": run.info.run_id, "experiment_id": exp_id, "url": runs_table_url(exp_id)}


def intervention_metrics(prediction: dict[str, Any]) -> dict[str, float]:
    """Before/after per class (`p_before.<class>`, `p_after.<class>`, the largest |change|)
    and, for segmentation, how many patches change class."""
    out: dict[str, float] = {}
    cls = prediction.get("classification")
    if cls:
        probs = cls["probs"]
        for c, b, a in zip(probs["classes"], probs["before"], probs["after"], strict=True):
            key = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(c))
            out[f"p_before.{key}"], out[f"p_after.{key}"] = float(b), float(a)
        out["max_abs_dp"] = max(
            abs(a - b) for a, b in zip(probs["after"], probs["before"], strict=True)
        )
    seg = prediction.get("segmentation")
    if seg:
        changed = sum(a != b for a, b in zip(seg["after"], seg["before"], strict=True))
        out["seg_patches_changed"] = float(changed)
        out["seg_share_changed"] = changed / max(1, len(seg["before"]))
    return out


def main(argv: list[str] | None = None) -> int:
    from saev_core.explore import main as serve

    return serve(argv, log_run=log_intervention)


if __name__ == "__main__":
    sys.exit(main())
