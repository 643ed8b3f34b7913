"""The validate stage: a Great Expectations suite over a shard set.

What a shard set promises (DESIGN.md "Shards"), checked file by file and layer by layer:
- the manifest against the files: every listed file exists with the listed row count (from the
  Parquet footer) and sha256, no unlisted shard file lies in a layer directory, and the image
  table has the manifest's image count;
- every file: row count as the manifest says, no null keys, tokens within the layout, vectors of
  the manifest's width, no NaN or Inf in any vector;
- every layer: `(image_id, token)` unique, every image_id in the image table, and rows = images
  x tokens written.
Vectors whose norm is an outlier within their file (robust z-score above `OUTLIER_Z`: ViTs grow
a few high-norm tokens, Darcet et al. 2023) are a *warning*: counted and listed in the report,
never dropped and never a failure. A failed critical check raises `ShardValidationError` naming
the check and the file; the full result is written as JSON either way (deterministic: no
timestamps, so an unchanged shard set gives an unchanged report).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from saev_core import shards


@dataclass(frozen=True)
class ValidateConfig:
    """params.yaml section `validate`."""

    shard_dir: str = "artifacts/activations/shapes"
    """The shard set to check."""
    report: str = "artifacts/activations/shapes.validation.json"
    """Where the Great Expectations result (JSON) is written: next to the shard set."""

    def __post_init__(self):
        if Path(self.report).resolve().is_relative_to(Path(self.shard_dir).resolve()):
            raise ValueError(
                f"validate.report {self.report} lies inside the shard set {self.shard_dir}: "
                "put it next to it (the shard set is the extract stage's output)"
            )


OUTLIER_Z = 10.0
"""Robust z-score (median and MAD of the file's vector norms) above which a norm is flagged."""
N_OUTLIER_EXAMPLES = 20


class ShardValidationError(RuntimeError):
    """A shard set broke one of its promises; `failures` lists every failed check."""

    def __init__(self, failures: list[dict[str, Any]]):
        self.failures = failures
        lines = [
            f"  - {f['check']}({f.get('column') or ''}) failed on {f['file']}: {f['detail']}"
            for f in failures
        ]
        super().__init__("shard validation failed:\n" + "\n".join(lines))


def _gx_context():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return gx, ctx


def _file_frame(path: Path, m: shards.Manifest) -> pd.DataFrame:
    table = pq.read_table(path)
    col = table.column("act")
    width = col.type.byte_width if hasattr(col.type, "byte_width") else -1
    frame = pd.DataFrame(
        {
            "image_id": table.column("image_id").to_numpy(zero_copy_only=False),
            "token": table.column("token").to_numpy(zero_copy_only=False),
            "act_bytes": np.full(len(table), width, dtype=np.int64),
        }
    )
    if width == m.d_model * m.dtype.itemsize:
        acts = shards.arrow_to_acts(col, m.dtype, m.d_model)
        frame["n_nonfinite"] = (~np.isfinite(acts)).sum(axis=1)
        norm = np.linalg.norm(acts.astype(np.float32), axis=1)
    else:
        frame["n_nonfinite"] = 0  # the width check reports this file; its values cannot be read
        norm = np.zeros(len(table), np.float32)
    finite = np.isfinite(norm)
    med = float(np.median(norm[finite])) if finite.any() else 0.0
    mad = float(np.median(np.abs(norm[finite] - med))) * 1.4826 if finite.any() else 0.0
    frame["norm"] = norm
    frame["norm_z"] = (norm - med) / max(mad, 1e-6 * max(med, 1e-12))
    return frame


def _manifest_frame(m: shards.Manifest) -> pd.DataFrame:
    """One row per shard file, listed or found: what the manifest says against what is there."""
    rows = []
    listed = {f["path"] for f in m.data["files"]}
    for f in m.data["files"]:
        path = m.dir / f["path"]
        exists = path.exists()
        rows.append(
            {
                "path": f["path"],
                "listed": True,
                "exists": exists,
                "rows_manifest": int(f["rows"]),
                "rows_file": pq.ParquetFile(path).metadata.num_rows if exists else -1,
                "sha256_matches": exists and shards.sha256_file(path) == f["sha256"],
            }
        )
    for path in sorted(m.dir.glob("layer=*/*")):
        rel = str(path.relative_to(m.dir))
        if rel not in listed:
            rows.append(
                {
                    "path": rel,
                    "listed": False,
                    "exists": True,
                    "rows_manifest": -1,
                    "rows_file": -1,
                    "sha256_matches": False,
                }
            )
    return pd.DataFrame(rows)


def _missing(file: str, detail: str) -> dict[str, Any]:
    """A failed check for a file that is not there or cannot be read."""
    return {
        "file": file,
        "check": "file_readable",
        "column": "",
        "success": False,
        "severity": "critical",
        "detail": detail,
        "exception": None,
    }


def validate_shards(shard_dir: str | Path, report_path: str | Path | None = None) -> dict[str, Any]:
    """Check the shard set at `shard_dir`; returns the report or raises ShardValidationError."""
    m = shards.read_manifest(shard_dir)
    gx, ctx = _gx_context()
    import great_expectations.expectations as gxe

    source = ctx.data_sources.add_pandas("shards")
    asset = source.add_dataframe_asset("frame")
    batch_def = asset.add_batch_definition_whole_dataframe("whole")
    n_tokens = m.n_tokens
    allowed_tokens = m.written_tokens

    def run(name: str, frame: pd.DataFrame, expectations: list, file: str) -> list[dict[str, Any]]:
        suite = ctx.suites.add(gx.ExpectationSuite(name=name))
        for e in expectations:
            suite.add_expectation(e)
        vd = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch_def, suite=suite)
        )
        result = vd.run(batch_parameters={"dataframe": frame})
        out = []
        for r in result.results:
            cfg = r.expectation_config
            res = r.result or {}
            detail = (
                f"observed {res['observed_value']}"
                if "observed_value" in res
                else f"{res.get('unexpected_count', '?')} unexpected rows, e.g. "
                f"{res.get('partial_unexpected_list', [])[:3]}"
            )
            out.append(
                {
                    "file": file,
                    "check": cfg.type,
                    "column": cfg.kwargs.get("column")
                    or ",".join(cfg.kwargs.get("column_list", [])),
                    "success": bool(r.success),
                    "severity": str(getattr(cfg, "severity", "critical").value)
                    if hasattr(getattr(cfg, "severity", None), "value")
                    else "critical",
                    "detail": detail if not r.success else "ok",
                    "exception": (r.exception_info or {}).get("exception_message"),
                }
            )
        return out

    checks: list[dict[str, Any]] = []
    files = _manifest_frame(m)
    checks += run(
        "manifest",
        files,
        [
            gxe.ExpectColumnValuesToBeInSet(column="listed", value_set=[True]),
            gxe.ExpectColumnValuesToBeInSet(column="exists", value_set=[True]),
            gxe.ExpectColumnPairValuesToBeEqual(column_A="rows_manifest", column_B="rows_file"),
            gxe.ExpectColumnValuesToBeInSet(column="sha256_matches", value_set=[True]),
        ],
        shards.MANIFEST,
    )
    image_ids = None
    if (m.dir / shards.IMAGES).exists():
        images = shards.read_images(m.dir)
        image_ids = images["image_id"].tolist()
        checks += run(
            "images",
            images[["image_id", "split"]],
            [
                gxe.ExpectTableRowCountToEqual(value=int(m.data["n_images"])),
                gxe.ExpectColumnValuesToBeUnique(column="image_id"),
                gxe.ExpectColumnValuesToNotBeNull(column="split"),
            ],
            shards.IMAGES,
        )
    else:
        checks.append(_missing(shards.IMAGES, "the image table is missing"))
    outliers: list[pd.DataFrame] = []
    n_outliers = 0
    for layer in m.layers:
        keys = []
        for i, f in enumerate(m.files(layer)):
            path = m.dir / f["path"]
            if not path.exists():
                checks.append(_missing(f["path"], "listed in the manifest but missing"))
                continue
            try:
                frame = _file_frame(path, m)
            except Exception as e:  # a damaged footer or page: report it, check the rest
                checks.append(_missing(f["path"], f"unreadable: {type(e).__name__}: {e}"))
                continue
            checks += run(
                f"file-{layer}-{i}",
                frame,
                [
                    gxe.ExpectTableRowCountToEqual(value=int(f["rows"])),
                    gxe.ExpectColumnValuesToNotBeNull(column="image_id"),
                    gxe.ExpectColumnValuesToNotBeNull(column="token"),
                    gxe.ExpectColumnValuesToBeInSet(column="token", value_set=allowed_tokens),
                    gxe.ExpectColumnValuesToBeBetween(
                        column="act_bytes",
                        min_value=m.d_model * m.dtype.itemsize,
                        max_value=m.d_model * m.dtype.itemsize,
                    ),
                    gxe.ExpectColumnValuesToBeBetween(
                        column="n_nonfinite", min_value=0, max_value=0
                    ),
                    gxe.ExpectColumnValuesToBeBetween(
                        column="norm_z", max_value=OUTLIER_Z, severity="warning"
                    ),
                ],
                f["path"],
            )
            keys.append(frame[["image_id", "token"]])
            flagged = frame[frame["norm_z"] > OUTLIER_Z]
            n_outliers += len(flagged)
            outliers.append(flagged.nlargest(N_OUTLIER_EXAMPLES, "norm_z").assign(layer=layer))
        if keys:
            checks += run(
                f"layer-{layer}",
                pd.concat(keys, ignore_index=True),
                [
                    gxe.ExpectCompoundColumnsToBeUnique(column_list=["image_id", "token"]),
                    gxe.ExpectTableRowCountToEqual(value=int(m.data["n_images"]) * n_tokens),
                ]
                + (
                    [gxe.ExpectColumnValuesToBeInSet(column="image_id", value_set=image_ids)]
                    if image_ids is not None
                    else []
                ),
                f"layer={layer}/*",
            )

    failures = [c for c in checks if not c["success"] and c["severity"] == "critical"]
    warnings = [c for c in checks if not c["success"] and c["severity"] != "critical"]
    examples = pd.concat(outliers) if outliers else pd.DataFrame()
    if len(examples):
        examples = examples.nlargest(N_OUTLIER_EXAMPLES, "norm_z")
    report = {
        "shard_dir": str(m.dir),
        "manifest_sha256": m.sha256,
        "success": not failures,
        "n_checks": len(checks),
        "n_failed": len(failures),
        "n_warnings": len(warnings),
        "norm_outliers": {
            "threshold_robust_z": OUTLIER_Z,
            "count": n_outliers,
            "examples": [
                {
                    "layer": int(r.layer),
                    "image_id": int(r.image_id),
                    "token": int(r.token),
                    "norm": round(float(r.norm), 4),
                    "robust_z": round(float(r.norm_z), 2),
                }
                for r in examples.itertuples()
            ],
        },
        "checks": checks,
    }
    if report_path is not None:
        report_path = Path(report_path)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        shards.atomic_write_json(report_path, report)
    if failures:
        raise ShardValidationError(failures)
    return report
