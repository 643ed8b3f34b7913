"""Which features a hypothesis edits, and the controls matched to them.

`best_features` picks a label's best features (by patch- or image-level AUROC) on the stats'
select split, from the stats Parquet or the warehouse (read-only), and reports the first one's
AUROC on the report split with the label's shuffled-label control (`Choice`).
`frequency_matched` / `frequency_matched_sets` draw random-feature controls matched in firing
frequency. `stats_run` and `provenance` tie an experiment to its SAE run and stats;
`batch_hypotheses` makes one hypothesis per label (its best feature).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from saev_core.hypotheses.config import Hypothesis

# ---------------------------------------------------------------------------------------------
# features and controls


class Choice(NamedTuple):
    """The features chosen for a label, on which split, and their scores on the other."""

    features: list[int]
    auroc: float
    """The first feature's `select_by` AUROC on the report split (what an experiment reports)."""
    select_split: str | None
    """The split the features were ranked on (None: stats from before splits were kept apart)."""
    select_auroc: float
    """The first feature's AUROC on the select split (the ranking score)."""
    report_split: str | None
    control_auroc: float
    """The best AUROC any feature reaches on the label shuffled across the select split's
    images: what the best of d_sae features reaches by chance (NaN: no control recorded)."""


def _check_warehouse_run(h: Hypothesis, run: str) -> None:
    """Refuse a warehouse whose run of this name was built from stats of another SAE (a stale
    build: `check_stats_match` checks the stats directory, not the warehouse's copy of it)."""
    from saev_core.sae.checks import sae_sha256
    from saev_core.warehouse.sandbox import run_query

    rows = json.loads(
        run_query(
            h.warehouse,
            "select json_extract_string(cfg_json, '$.sae_sha256') as sha from runs "
            "where run = $run",
            {"run": run},
            fmt="json",
        )
    )
    recorded = rows[0]["sha"] if rows else None
    if recorded and recorded != sae_sha256(h.sae_dir):
        raise ValueError(
            f"warehouse {h.warehouse}: run {run!r} was built from stats of the SAE with weights "
            f"sha256 {recorded[:12]}..., not {h.sae_dir} ({sae_sha256(h.sae_dir)[:12]}...): "
            "rebuild the warehouse (saev warehouse)"
        )


def best_features(h: Hypothesis, label: str, n: int) -> Choice:
    """The `n` features with the highest `h.select_by` AUROC for `label` on the stats' select
    split, with the first one's AUROC on the report split and on the select split, and the
    label's shuffled-label control (see `Choice`)."""
    nan = float("nan")
    if h.warehouse:
        from saev_core.warehouse.sandbox import run_query

        run = stats_run(h.stats_dir)
        _check_warehouse_run(h, run)
        rows = json.loads(
            run_query(
                h.warehouse,
                "top_features_for_label",
                {"label": label, "run": run, "limit": str(n), "level": h.select_by},
                fmt="json",
            )
        )
        if not rows:
            raise ValueError(f"no feature statistics for label {label!r} in {h.warehouse}")
        key = "auroc" if h.select_by == "patch" else "image_auroc"
        r = rows[0]
        return Choice(
            [int(x["feature"]) for x in rows],
            _float(r.get(key)),
            r.get("select_split"),
            _float(r.get("select_auroc")),
            r.get("report_split"),
            _float(r.get("control_auroc")),
        )
    import pandas as pd

    stats_dir = Path(h.stats_dir)
    fl = pd.read_parquet(stats_dir / "feature_labels.parquet")
    key, other = ("auroc", "image_auroc") if h.select_by == "patch" else ("image_auroc", "auroc")
    if key not in fl:
        raise ValueError(f"{h.stats_dir}/feature_labels.parquet has no {key}: re-run stats")
    fl = fl[fl["label"] == label]
    select, report = _stats_splits(stats_dir)
    if "split" in fl and select is not None:
        if select not in set(fl["split"]):
            raise ValueError(
                f"{h.stats_dir}/feature_labels.parquet has no rows of its select split {select!r}"
            )
        selecting, reporting = fl[fl["split"] == select], fl[fl["split"] == report]
    else:  # stats from before splits were kept apart: one block, chosen and reported on it
        select = report = None
        selecting = reporting = fl
    # ties (colours reach image AUROC 1.0 with several features) go to the other level
    order = [key, other, "feature"] if other in fl else [key, "feature"]
    ranked = selecting.sort_values(order, ascending=[False] * (len(order) - 1) + [True])
    feats = ranked["feature"].head(n).astype(int).tolist()
    if not feats:
        raise ValueError(f"no feature statistics for label {label!r} in {h.stats_dir}")
    reported = reporting.loc[reporting["feature"] == feats[0], key]
    control = nan
    path = stats_dir / "label_controls.parquet"
    if path.exists() and select is not None:
        lc = pd.read_parquet(path)
        col = "control_auroc" if h.select_by == "patch" else "control_image_auroc"
        hit = lc.loc[(lc["split"] == select) & (lc["label"] == label), col]
        control = _float(hit.iloc[0]) if len(hit) else nan
    return Choice(
        feats,
        _float(reported.iloc[0]) if len(reported) else nan,
        select,
        _float(ranked[key].iloc[0]),
        report,
        control,
    )


def _float(x: Any) -> float:
    return float("nan") if x is None or x != x else float(x)


def _stats_splits(stats_dir: Path) -> tuple[str | None, str | None]:
    """(select_split, report_split) recorded in a stats directory's run.parquet, or Nones."""
    path = stats_dir / "run.parquet"
    if not path.exists():
        return None, None
    import pyarrow.parquet as pq

    run = pq.read_table(path).to_pylist()[0]
    return run.get("select_split"), run.get("report_split")


def stats_run(stats_dir: str) -> str:
    """The run name written with the stats (run.parquet), else the directory name."""
    path = Path(stats_dir) / "run.parquet"
    if path.exists():
        import pyarrow.parquet as pq

        return str(pq.read_table(path, columns=["run"]).column(0)[0])
    return Path(stats_dir).name


def frequency_matched(
    features: Any, targets: list[int], rng: np.random.Generator, n_candidates: int
) -> list[int]:
    """For each target feature, a random alive other feature among the `n_candidates` nearest in
    log10 firing frequency (so the control edits something that fires about as often)."""
    freq = features.set_index("feature")["freq"]
    alive = freq[(freq > 0) & ~freq.index.isin(targets)]
    if len(alive) == 0:
        raise ValueError("no alive feature left for a random-feature control")
    out = []
    for f in targets:
        dist = np.abs(np.log10(alive.to_numpy()) - np.log10(max(float(freq.get(f, 0.0)), 1e-12)))
        near = alive.index.to_numpy()[np.argsort(dist, kind="stable")[:n_candidates]]
        out.append(int(rng.choice([c for c in near if c not in out] or list(near))))
    return out


def frequency_matched_sets(
    features: Any, targets: list[int], rng: np.random.Generator, n_candidates: int, n_sets: int
) -> list[list[int]]:
    """`n_sets` random-feature controls for the `targets`: each a set of one alive other feature
    per target among its `n_candidates` nearest in log10 firing frequency, drawn without
    replacement across sets while the candidates last (then cycling through them again)."""
    freq = features.set_index("feature")["freq"]
    alive = freq[(freq > 0) & ~freq.index.isin(targets)]
    if len(alive) == 0:
        raise ValueError("no alive feature left for a random-feature control")
    perms = []
    for f in targets:
        dist = np.abs(np.log10(alive.to_numpy()) - np.log10(max(float(freq.get(f, 0.0)), 1e-12)))
        perms.append(
            rng.permutation(alive.index.to_numpy()[np.argsort(dist, kind="stable")][:n_candidates])
        )
    sets = []
    for k in range(n_sets):
        chosen: list[int] = []
        for perm in perms:
            cands = [int(perm[(k + o) % len(perm)]) for o in range(len(perm))]
            chosen.append(next((c for c in cands if c not in chosen), cands[0]))
        sets.append(chosen)
    return sets


def provenance(sae_dir: str, stats_dir: str) -> dict[str, str]:
    """Tags that tie an experiment to its SAE run and shard manifest."""
    import hashlib

    cfg = Path(sae_dir) / "cfg.json"
    extra = json.loads(cfg.read_text()).get("extra", {}) if cfg.exists() else {}
    return {
        "sae_dir": str(sae_dir),
        "sae_cfg_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.exists() else "",
        "manifest_sha256": str(extra.get("manifest_sha256", "")),
        "backbone_sha256": str(extra.get("backbone_sha256", "")),
        "stats_run": stats_run(stats_dir),
    }


# ---------------------------------------------------------------------------------------------
# batches


def batch_hypotheses(base: Hypothesis | dict[str, Any], labels: list[str]) -> list[Hypothesis]:
    """One hypothesis per label: its best feature, edited as `base` says, targeting that label."""
    fields = (
        base if isinstance(base, dict) else {k: getattr(base, k) for k in base.__dataclass_fields__}
    )
    out = []
    for label in labels:
        out.append(
            Hypothesis(
                **{**fields, "target": label, "best_for": label, "features": (), "name": label}
            )
        )
    return out
