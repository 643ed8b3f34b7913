"""What the comparison's figures are and the rows they read: the figure names (`FIGURES`,
`OPTIONAL`), `FiguresConfig` (params.yaml `compare.figures`), the small helpers the drawings share,
and the row reshaping of the intervention figure (`intervention_rows`, `paired_rows`) and of
`dvc plots` (`plot_label`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from saev_core.plots import _plt

Rows = list[dict[str, Any]]
FORM_ORDER = ("filled", "outline", "word")
KIND_ORDER = ("trained", "trained_vs_random", "random")
INTERVENTION_METHODS = ("sae", "pca", "random_sae", "random_pca", "random")
FIGURES = (
    "compare_backbones",
    "cross_form_features",
    "semantic_probe",
    "sae_vs_baselines",
    "seed_stability",
    "probe_by_form",
    "pca_vs_sae_intervention",
)
"Every figure, in the order drawn; each is named after the query it draws."
OPTIONAL = ("probe_by_form", "pca_vs_sae_intervention")
"Figures skipped (not failed) while their query is missing or has no rows."


@dataclass(frozen=True)
class FiguresConfig:
    """params.yaml `compare.figures` (less `out_dir`, which the flow passes apart)."""

    figures: tuple[str, ...] = FIGURES
    """Which figures to draw (names in FIGURES)."""
    min_auroc: float = 0.9
    """cross_form_features: AUROC a feature needs in each form."""
    min_forms: int = 2
    """cross_form_features: forms it must reach that in."""
    level: Literal["image", "patch"] = "image"
    """cross_form_features: image-level (the image's highest patch code) or patch-level AUROC."""
    alpha: float = 0.05
    """semantic_probe: significance level after Holm's adjustment over its rows."""
    kind: Literal["concept", "concept_form", "form", "all"] = "concept"
    """sae_vs_baselines: which labels the methods are compared on."""
    strength: float = -2.0
    """pca_vs_sae_intervention: the edit strength shown (x the unit's max activation)."""
    dpi: int = 100
    """Resolution of the PNGs."""
    log_mlflow: bool = True
    """Log the figures, their data and headline numbers to MLflow (off in tests)."""
    experiment: str = "compare"
    """MLflow experiment."""
    run_name: str = "figures"
    """MLflow run name."""
    root: str | None = None
    """Project root the warehouse's paths are relative to (default: the one recorded at build)."""
    sql_dir: str | None = None
    """SQL directory, relative to the root (default: the one recorded at build)."""

    def __post_init__(self) -> None:
        if isinstance(self.figures, str):
            raise ValueError(f"figures must be a list of names, got {self.figures!r}")
        unknown = sorted(set(self.figures) - set(FIGURES))
        if unknown or not self.figures:
            raise ValueError(f"figures: unknown {unknown or 'none given'}; choose from {FIGURES}")
        if not 0.0 <= self.min_auroc <= 1.0:
            raise ValueError(f"min_auroc must lie in [0, 1], got {self.min_auroc}")
        if self.min_forms < 1:
            raise ValueError(f"min_forms must be >= 1, got {self.min_forms}")
        if self.level not in ("image", "patch"):
            raise ValueError(f"level must be image or patch, got {self.level!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.kind not in ("concept", "concept_form", "form", "all"):
            raise ValueError(f"kind must be concept, concept_form, form or all, got {self.kind!r}")
        if not 20 <= self.dpi <= 600:
            raise ValueError(f"dpi must lie in [20, 600], got {self.dpi}")

    def query_params(self, name: str) -> dict[str, Any]:
        """The parameters figure `name` binds in its query (the query's own defaults otherwise)."""
        return {
            "cross_form_features": {
                "min_auroc": self.min_auroc, "min_forms": self.min_forms, "level": self.level,
            },
            "semantic_probe": {"alpha": self.alpha},
            "sae_vs_baselines": {"kind": self.kind},
            "pca_vs_sae_intervention": {"strength": self.strength},
        }.get(name, {})  # fmt: skip


# ---------------------------------------------------------------------------------------------
# small helpers


def _num(x: Any) -> float:
    """A row value as a float (a JSON null, from SQL null or NaN, is NaN)."""
    return math.nan if x is None else float(x)


def _ordered(values: Any, first: Sequence[str] = ()) -> list[str]:
    """The distinct values, those in `first` in its order, then the rest sorted."""
    seen = {v for v in values if v is not None}
    return [v for v in first if v in seen] + sorted(seen - set(first))


def _colours(backbones: Sequence[str]) -> dict[str, Any]:
    cmap = _plt().get_cmap("tab10")
    return {b: cmap(i % 10) for i, b in enumerate(backbones)}


def _err(values: Sequence[float], lo: Sequence[float], hi: Sequence[float]) -> np.ndarray:
    """Asymmetric error bars from an interval; 0 where the interval is unknown."""
    v, lo_, hi_ = (np.asarray(a, dtype=np.float64) for a in (values, lo, hi))
    return np.nan_to_num(np.stack([np.maximum(v - lo_, 0), np.maximum(hi_ - v, 0)]), nan=0.0)


def _mean(xs: Sequence[float]) -> float:
    a = np.asarray([x for x in xs if math.isfinite(x)], dtype=np.float64)
    return float(a.mean()) if len(a) else math.nan


def _key(*parts: Any) -> str:
    """An MLflow metric key: parts joined by '/', odd characters replaced."""
    return "/".join(re.sub(r"[^\w.\- ]", "_", str(p)) for p in parts)


def _dodge(i: int, n: int, width: float = 0.8) -> float:
    return (i - (n - 1) / 2) * width / max(n, 1)


def intervention_rows(rows: Rows) -> Rows:
    """pca_vs_sae_intervention's rows as one row per (backbone, strength, concept, method):
    as they are when the query has a `method` column (a random row's `control_for`, when given,
    makes its method `random_<control_for>`), else unfolded from side-by-side columns
    `<method>_delta`, `<method>_lo`, `<method>_hi` (method in INTERVENTION_METHODS; a method
    without `_lo`/`_hi` columns, such as a random control, gets no interval)."""
    if not rows:
        return []
    if "method" in rows[0]:
        out = []
        for r in rows:
            m = r["method"]
            if m == "random" and r.get("control_for"):
                m = f"random_{r['control_for']}"
            out.append(
                {
                    "backbone": r.get("backbone"),
                    "concept": r["concept"],
                    "method": m,
                    "strength": r.get("strength"),
                    "delta": r["delta"],
                    "lo": r.get("lo", r.get("ci_lo")),
                    "hi": r.get("hi", r.get("ci_hi")),
                }
            )
        return out  # fmt: skip
    methods = [m for m in INTERVENTION_METHODS if f"{m}_delta" in rows[0]]
    if not methods:
        raise ValueError(
            "pca_vs_sae_intervention: expected a `method` column or `<method>_delta` columns "
            f"(method in {INTERVENTION_METHODS}), got {sorted(rows[0])}"
        )
    return [{"backbone": r.get("backbone"), "concept": r["concept"], "method": m,
             "strength": r.get("strength"), "delta": r[f"{m}_delta"], "lo": r.get(f"{m}_lo"),
             "hi": r.get(f"{m}_hi")} for r in rows for m in methods]  # fmt: skip


def paired_rows(rows: Rows) -> Rows:
    """The rows that carry the control-adjusted pca minus sae paired over images (`adj_diff`,
    `adj_diff_lo`, `adj_diff_hi`: (pca - random_pca) - (sae - random_sae); the pca rows of a
    query with a `method` column), with `stronger` where the query says which edit moved the
    concept further beyond its control (sae, pca or level: CI and Holm-adjusted p)."""
    return [{"backbone": r.get("backbone"), "strength": r.get("strength"),
             "concept": r["concept"], "diff": r["adj_diff"], "diff_lo": r.get("adj_diff_lo"),
             "diff_hi": r.get("adj_diff_hi"), "stronger": r.get("stronger")}
            for r in rows if r.get("adj_diff") is not None
            and r.get("method", "pca") == "pca"]  # fmt: skip


def _where(backbone: Any, strength: Any) -> str:
    parts = (backbone or "", "" if strength is None else f"strength {_num(strength):g}")
    return " ".join(p for p in parts if p)


def plot_label(name: str, row: dict[str, Any]) -> str:
    """What a row is called in a `dvc plots` bar chart of figure `name`."""
    b = row.get("backbone")
    if name in ("compare_backbones", "probe_by_form"):
        return f"{row['concept']}:{row['form']} {b}"
    if name in ("cross_form_features", "semantic_probe"):
        return f"{row['concept']} {b}"
    if name == "sae_vs_baselines":
        return f"{b} {row['method']}"
    if name == "seed_stability":
        return f"{b} {row['kind']}"
    parts = (b, row.get("concept"), row.get("method"), row.get("strength"))
    return " ".join(str(p) for p in parts if p is not None)
