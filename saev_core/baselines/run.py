"""Running the baselines: `sae_vs_baselines` (fit on a shard set's train split, score beside an
SAE), the table on disk (`write_baselines`, `read_baselines`), what is read from it
(`best_direction`, `headline`), and `saev baselines` (`main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from saev_core import shards
from saev_core.baselines.scores import (
    COLUMNS,
    image_labels_of,
    image_scores,
    label_matrix,
    select_and_report,
)
from saev_core.baselines.units import METHODS, BaselinesConfig, Units, fit_baselines
from saev_core.loaders.ordered import iter_image_batches
from saev_core.loaders.shuffled import sample_rows


def sae_vs_baselines(
    shard_dir: str | Path,
    sae_dir: str | Path | None,
    cfg: BaselinesConfig = BaselinesConfig(),  # noqa: B008  (a frozen dataclass: immutable)
    layer: int | None = None,
    progress: bool = False,
) -> tuple[pd.DataFrame, dict[str, Units]]:
    """Fit the baselines on `shard_dir`'s train split and score them beside the SAE in `sae_dir`.

    `layer` defaults to the SAE's (cfg.json `extra.layer`), else the shard set's first layer.
    Returns the table (`COLUMNS`) and the fitted units (`best_direction` takes both).
    """
    from saev_core.sae.model import SAE

    m = shards.read_manifest(shard_dir)
    sae = None
    methods = cfg.methods
    if sae_dir is not None:
        from saev_core.sae.checks import check_sae_matches

        check_sae_matches(sae_dir, shard_dir)  # refuse an SAE of another backbone or shard set
        sae = SAE.load(sae_dir).eval()
        if layer is None and "layer" in sae.extra:
            layer = int(sae.extra["layer"])
    elif "sae" in methods:
        methods = tuple(x for x in methods if x != "sae")
    cfg = dataclasses.replace(cfg, methods=methods)
    layer = int(m.data["layers"][0]) if layer is None else int(layer)
    n_prefix = int(m.data.get("tokens", {}).get("n_prefix_tokens", 0))
    x_fit = sample_rows(shard_dir, layer, cfg.n_fit, cfg.seed, ["train"], "patches")
    if progress:
        print(
            f"baselines: fitting {', '.join(methods)} on {len(x_fit)} train patches",
            file=sys.stderr,
        )
    units = fit_baselines(x_fit, cfg, sae)
    if progress:
        fit_s = {k: round(u.info["fit_s"], 1) for k, u in units.items()}
        print(f"baselines: fitted in seconds {fit_s}", file=sys.stderr)
    labels = image_labels_of(shard_dir)
    names = list(m.data.get("labels") or sorted(set(labels["label"].astype(str))))
    scored = []
    for split in (cfg.select_split, cfg.report_split):
        if not m.files(layer, [split]):
            raise ValueError(f"{shard_dir}: no shards of split {split!r} at layer {layer}")
        batches = iter_image_batches(
            shard_dir, layer, cfg.batch_images, splits=[split], tokens="patches"
        )
        t0 = time.perf_counter()
        image_id, scores = image_scores(units, batches, n_prefix)
        if progress:
            took = time.perf_counter() - t0
            print(
                f"baselines: scored {len(image_id)} {split} images in {took:.1f} s", file=sys.stderr
            )
        scored.append((image_id, scores, label_matrix(image_id, labels, names)))
    table = select_and_report(units, scored[0], scored[1], names, cfg)
    return table, units


def best_direction(table: pd.DataFrame, concept: str, method: str = "pca") -> np.ndarray:
    """`[d_model]` unit vector of `method`'s best unit for `concept` (sign applied): the direction
    to edit along, e.g. the best PCA direction beside the SAE feature. `table` is the table of
    `sae_vs_baselines` or one read back with `read_baselines`."""
    rows = table[(table["method"] == method) & (table["concept"] == concept)]
    if rows.empty:
        raise ValueError(
            f"no {method!r} row for concept {concept!r} (methods {sorted(set(table['method']))}, "
            f"concepts {sorted(set(table['concept']))})"
        )
    return np.asarray(rows.iloc[0]["direction"], dtype=np.float32)


def write_baselines(
    table: pd.DataFrame, path: str | Path, meta: dict[str, Any] | None = None
) -> Path:
    """Write the table as Parquet (atomically; `meta` as JSON in the schema metadata)."""
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"write_baselines: the table lacks columns {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = pa.Table.from_pandas(table[list(COLUMNS)], preserve_index=False)
    t = t.replace_schema_metadata(
        {**(t.schema.metadata or {}), b"saev": json.dumps(meta or {}).encode()}
    )
    shards.atomic_write_table(t, path)
    return path


def read_baselines(path: str | Path) -> pd.DataFrame:
    """The table `write_baselines` wrote."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"baselines table not found: {path}")
    return pd.read_parquet(path)


def headline(table: pd.DataFrame) -> pd.DataFrame:
    """Mean test AUROC per method over concepts, and on how many concepts it is better or worse
    than the SAE, paired: the CI of its AUROC minus the SAE's on the same bootstrap draws
    (`diff_lo`, `diff_hi`) lies wholly above 0 (`better_than_sae`) or below it (`worse_than_sae`).
    Overlapping CIs are not tested: paired differences are tighter than two separate CIs."""
    out = table.groupby("method", sort=False)["auroc_test"].agg(["mean", "min", "max"])
    if "sae" in set(table["method"]):
        g = table.groupby("method", sort=False)
        out["better_than_sae"] = g["diff_lo"].apply(lambda v: int((v > 0).sum()))
        out["worse_than_sae"] = g["diff_hi"].apply(lambda v: int((v < 0).sum()))
        out["n_units"] = g["n_units"].max()
    return out.reset_index()


def main(argv: list[str] | None = None) -> int:
    """`saev baselines`: the SAE against neurons, PCA, ICA, NMF and random directions."""
    p = argparse.ArgumentParser(prog="saev baselines", description=main.__doc__)
    p.add_argument("--shards", required=True, help="shard set (manifest.json, images.parquet)")
    p.add_argument("--sae", default=None, help="SAE checkpoint directory to compare")
    p.add_argument("--layer", type=int, default=None, help="layer (default: the SAE's)")
    p.add_argument("--out", default=None, help="Parquet file for the table")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--n-fit", type=int, default=BaselinesConfig.n_fit)
    p.add_argument("--n-boot", type=int, default=BaselinesConfig.n_boot)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = BaselinesConfig(
        methods=tuple(x.strip() for x in a.methods.split(",") if x.strip()),
        n_fit=a.n_fit,
        n_boot=a.n_boot,
        seed=a.seed,
    )
    table, _ = sae_vs_baselines(a.shards, a.sae, cfg, a.layer, progress=True)
    if a.out:
        write_baselines(
            table, a.out, {"shards": str(a.shards), "sae": a.sae, "cfg": dataclasses.asdict(cfg)}
        )
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(table.drop(columns=["direction"]).round(3).to_string(index=False))
        print()
        print(headline(table).round(3).to_string(index=False))
    return 0
