"""The validate stage: a Great Expectations suite over a shard set.

What a shard set promises (DESIGN.md "Shards"), checked file by file and layer by layer:
- every file: row count as the manifest says, no null keys, tokens within the layout, vectors of
  the manifest's width, no NaN or Inf in any vector;
- every layer: `(image_id, token)` unique, and rows = images x tokens written.
A failure raises `ShardValidationError` naming the check and the file; the full result is written
as JSON either way.
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
    report: str = "artifacts/validation/shapes.json"
    """Where the Great Expectations result (JSON) is written."""


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
    else:
        frame["n_nonfinite"] = 0  # the width check reports this file; its values cannot be read
    return frame


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
                    "detail": detail if not r.success else "ok",
                    "exception": (r.exception_info or {}).get("exception_message"),
                }
            )
        return out

    checks: list[dict[str, Any]] = []
    for layer in m.layers:
        keys = []
        for i, f in enumerate(m.files(layer)):
            path = m.dir / f["path"]
            if not path.exists():
                checks.append(
                    {
                        "file": f["path"],
                        "check": "file_exists",
                        "column": "",
                        "success": False,
                        "detail": "listed in the manifest but missing",
                    }
                )
                continue
            frame = _file_frame(path, m)
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
                ],
                f["path"],
            )
            keys.append(frame[["image_id", "token"]])
        if keys:
            checks += run(
                f"layer-{layer}",
                pd.concat(keys, ignore_index=True),
                [
                    gxe.ExpectCompoundColumnsToBeUnique(column_list=["image_id", "token"]),
                    gxe.ExpectTableRowCountToEqual(value=int(m.data["n_images"]) * n_tokens),
                ],
                f"layer={layer}/*",
            )

    failures = [c for c in checks if not c["success"]]
    report = {
        "shard_dir": str(m.dir),
        "manifest_sha256": m.sha256,
        "success": not failures,
        "n_checks": len(checks),
        "n_failed": len(failures),
        "checks": checks,
    }
    if report_path is not None:
        report_path = Path(report_path)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        shards.atomic_write_json(report_path, report)
    if failures:
        raise ShardValidationError(failures)
    return report
