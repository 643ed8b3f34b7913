"""The linear probe's AUROC per concept x form on the test split (issue 15, the comparison).

The compare `probe` step trains a multi-label classification probe on each backbone's output
(`saev_core.probes`: train split; its saved metrics are on the probe's `eval_split`, val). Here
that saved probe scores the images of a third split, test, which neither the probe's training
nor anything chosen on val has seen, and each of its labels becomes one row of
`<compare.out_dir>/<backbone>/probes/labels.parquet`:

    backbone, label, concept, form, split, n_images, n_pos,
    accuracy, balanced_accuracy, auroc, auroc_lo, auroc_hi

A forms-world label `<concept>:<form>` ("circle:word") splits into its concept and form; a bare
concept ("red", present in any form) has form null; a bare form ("word": some object is drawn
as a word) has concept null. Accuracy and balanced accuracy (the mean of the true-positive and
true-negative rates, null where the split lacks either class) threshold the probe's sigmoid at
0.5; AUROC is Mann-Whitney with mid-ranks (`baselines.auroc_matrix`, equal to scikit-learn's
`roc_auc_score`), null where the split lacks either class. Its interval is the percentile
bootstrap over the test images: `n_boot` draws of as many images with replacement
(`numpy.random.default_rng(seed).integers(0, n_images, (n_boot, n_images))`), the same draws for
every label as in `baselines.select_and_report`, draws with one class only left out.

The warehouse reads the files as source `probe_labels` (sql/compare/sources.yaml), view
`compare_probes`, named query `probe_by_form`.

Shape suffixes: `i` images, `l` labels, `b` bootstrap draws.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from saev_core import shards
from saev_core.baselines.scores import auroc_matrix, bootstrap_auroc
from saev_core.shapes.config import FORM_SEPARATOR, FORMS

COLUMNS = (
    "backbone",
    "label",
    "concept",
    "form",
    "split",
    "n_images",
    "n_pos",
    "accuracy",
    "balanced_accuracy",
    "auroc",
    "auroc_lo",
    "auroc_hi",
)
SCHEMA = pa.schema(
    [
        ("backbone", pa.string()),
        ("label", pa.string()),
        ("concept", pa.string()),
        ("form", pa.string()),
        ("split", pa.string()),
        ("n_images", pa.int64()),
        ("n_pos", pa.int64()),
        ("accuracy", pa.float64()),
        ("balanced_accuracy", pa.float64()),
        ("auroc", pa.float64()),
        ("auroc_lo", pa.float64()),
        ("auroc_hi", pa.float64()),
    ]
)
# the summary's key for bare concept labels (form null: the concept in any form)
ANY_FORM = "any"


def concept_and_form(label: str) -> tuple[str | None, str | None]:
    """("circle", "word") for "circle:word"; ("red", None) for "red"; (None, "word") for "word"."""
    if FORM_SEPARATOR in label:
        concept, form = label.split(FORM_SEPARATOR, 1)
        return concept, form
    if label in FORMS:
        return None, label
    return label, None


def label_metrics(
    p_il: np.ndarray,
    y_il: np.ndarray,
    labels: list[str],
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> pd.DataFrame:
    """One row per label of probabilities `p_il` against 0/1 targets `y_il` ([images, labels]):
    label, concept, form, n_images, n_pos, accuracy, balanced_accuracy, auroc, auroc_lo, auroc_hi
    (module docstring)."""
    p_il = np.asarray(p_il, np.float64)
    y_il = np.asarray(y_il) > 0.5
    if p_il.ndim != 2 or p_il.shape != y_il.shape or p_il.shape[1] != len(labels):
        raise ValueError(
            f"label_metrics: probabilities {p_il.shape}, targets {y_il.shape} and "
            f"{len(labels)} labels do not match"
        )
    if n_boot < 1:
        raise ValueError(f"label_metrics: n_boot must be >= 1, got {n_boot}")
    if not 0 < ci < 1:
        raise ValueError(f"label_metrics: ci must be in (0, 1), got {ci}")
    n = len(p_il)
    if n == 0:
        raise ValueError("label_metrics: no images")
    auc_l = auroc_matrix(p_il, y_il.astype(np.float64)).diagonal()
    idx_bi = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    q = (1 - ci) / 2
    pred_il = p_il > 0.5
    rows = []
    for j, label in enumerate(labels):
        y, pred = y_il[:, j], pred_il[:, j]
        n_pos = int(y.sum())
        lo = hi = bal = np.nan
        if 0 < n_pos < n:
            bal = 0.5 * ((pred & y).sum() / n_pos + (~pred & ~y).sum() / (n - n_pos))
            boot = bootstrap_auroc(p_il[:, j], y, idx_bi)
            boot = boot[~np.isnan(boot)]
            if len(boot):
                lo, hi = np.quantile(boot, [q, 1 - q])
        concept, form = concept_and_form(str(label))
        rows.append(
            {
                "label": str(label),
                "concept": concept,
                "form": form,
                "n_images": n,
                "n_pos": n_pos,
                "accuracy": float((pred == y).mean()),
                "balanced_accuracy": float(bal),
                "auroc": float(auc_l[j]),
                "auroc_lo": float(lo),
                "auroc_hi": float(hi),
            }
        )
    return pd.DataFrame(rows)


def summarise(table: pd.DataFrame) -> dict[str, float | None]:
    """Mean AUROC per form over the `<concept>:<form>` labels, and over the bare concepts
    (`ANY_FORM`), rounded to 4 places; None where no label of the group has an AUROC."""
    groups = {form: table[(table["form"] == form) & table["concept"].notna()] for form in FORMS}
    groups[ANY_FORM] = table[table["form"].isna() & table["concept"].notna()]
    out: dict[str, float | None] = {}
    for name, g in groups.items():
        if len(g) == 0:
            continue
        mean = g["auroc"].mean()  # skips NaN
        out[name] = None if pd.isna(mean) else round(float(mean), 4)
    return out


def write_probe_labels(
    table: pd.DataFrame, path: str | Path, meta: dict[str, Any] | None = None
) -> Path:
    """Write the table as Parquet with `SCHEMA` (atomically; `meta` as JSON in the schema
    metadata)."""
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"write_probe_labels: the table lacks columns {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = pa.Table.from_pandas(table[list(COLUMNS)], schema=SCHEMA, preserve_index=False)
    t = t.replace_schema_metadata({b"saev": json.dumps(meta or {}).encode()})
    shards.atomic_write_table(t, path)
    return path


def probe_probs(probe: Any, backbone: Any, records: list, batch_size: int) -> np.ndarray:
    """The classification probe's sigmoid per label [images, labels] on `records`, a batch of
    backbone outputs at a time."""
    import torch

    from saev_core.probes import backbone_outputs

    out = []
    with torch.no_grad():
        for i in range(0, len(records), batch_size):
            h = backbone_outputs(backbone, records[i : i + batch_size], batch_size)
            out.append(probe.probs(h).numpy())
    return np.concatenate(out).astype(np.float64)


def probe_labels(
    cfg: Any,
    backbone: str,
    out_path: str | Path,
    split: str = "test",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, float | None]:
    """Score the classification probe that `train_probes(cfg)` saved on `split`'s images, write
    one row per probe label to `out_path` (module docstring) and return `summarise` of it.

    `cfg` is the probe step's `ProbeConfig`; `backbone` names the compared backbone in the rows.
    The probe must have been trained on this backbone's weights (probe.json's sha256)."""
    from saev_core.backbone.load import load_backbone
    from saev_core.data.records import load_records
    from saev_core.probes import load_probe

    if "classification" not in cfg.tasks:
        raise ValueError(
            f"probe_labels: the probe config trains no classification probe (tasks {cfg.tasks})"
        )
    if split == cfg.train_split:
        raise ValueError(f"probe_labels: split {split!r} is the probe's train split")
    probe_dir = Path(cfg.out_dir) / "classification"
    probe, meta = load_probe(probe_dir)
    if probe.task != "classification":
        raise ValueError(f"{probe_dir}: a {probe.task} probe, expected classification")
    bb = load_backbone(cfg.model, device=None if cfg.device == "auto" else cfg.device)
    if meta.get("weights_sha256") not in (None, bb.weights_sha256):
        raise ValueError(
            f"{probe_dir}: the probe was trained on weights {meta['weights_sha256'][:12]}..., "
            f"but {cfg.model} has {bb.weights_sha256[:12]}...; retrain the probe"
        )
    records = load_records(cfg.data, [split], cfg.val_fraction)
    records = records[: cfg.max_images] if cfg.max_images else records
    p_il = probe_probs(probe, bb, records, cfg.batch_size)
    y_il = np.array([[c in r.labels for c in probe.classes] for r in records], dtype=bool)
    table = label_metrics(p_il, y_il, probe.classes, n_boot=n_boot, seed=seed, ci=ci)
    table.insert(0, "backbone", backbone)
    table.insert(4, "split", split)
    info = {
        "backbone": backbone,
        "probe_dir": str(probe_dir),
        "model": str(cfg.model),
        "weights_sha256": bb.weights_sha256,
        "data": str(cfg.data),
        "split": split,
        "n_boot": n_boot,
        "seed": seed,
        "ci": ci,
    }
    write_probe_labels(table, out_path, info)
    return summarise(table)
