"""The stages as plain library functions over files: shards in, checkpoints and tables out.

Each `*_stage` function is what a Prefect flow, a test or a notebook calls. It reads its inputs
from disk, calls the model code (`training`, `stats`, ...), and writes its outputs atomically.
Tracking reaches it as a `log(metrics, step)` callback; nothing here knows about Prefect, DVC or
MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from saev_core import shards
from saev_core.config import from_dict, to_dict

Log = Callable[[dict[str, float], int], None]


def no_log(metrics: dict[str, float], step: int) -> None:
    """The default tracking callback: does nothing."""


def replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move a finished `tmp_dir` into `out_dir`, replacing what was there."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp_dir, out_dir)


def tmp_dir_for(out_dir: Path) -> Path:
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


# ---------------------------------------------------------------------------------------------
# train


@dataclass(frozen=True)
class TrainStage:
    """params.yaml section `train`: which shards to train on and where the SAE goes."""

    shard_dir: str = "artifacts/activations/shapes"
    """The (validated) shard set to train on."""
    layer: int = 2
    """Which recorded layer of the shard set."""
    tokens: Literal["all", "patches", "prefix"] = "all"
    """Train on every token, only patches (the paper), or only CLS/registers."""
    train_split: str = "train"
    """Split used for training."""
    eval_split: str = "val"
    """Held-out split for the final metrics (L0, FVU, dead, dense)."""
    out_dir: str = "artifacts/saes/demo"
    """Checkpoint directory (sae.safetensors + cfg.json + metrics.json)."""
    sae: dict[str, Any] = field(default_factory=dict)
    """SAE hyperparameters: the fields of `training.TrainConfig`."""


def train_stage(io: TrainStage, log: Log = no_log, progress: bool = True) -> dict[str, Any]:
    """Train an SAE on a shard set; returns the held-out metrics (with per-feature freq)."""
    from saev_core.training import TrainConfig, evaluate, train_sae

    cfg = from_dict(TrainConfig, io.sae, where="train.sae")
    m = shards.read_manifest(io.shard_dir)
    if io.layer not in m.layers:
        raise ValueError(f"train.layer {io.layer} not recorded in {io.shard_dir} (has {m.layers})")
    import torch

    def batches(epoch: int, split: str = io.train_split):
        for x in shards.iter_shuffled(
            io.shard_dir,
            io.layer,
            cfg.batch_size,
            seed=cfg.seed + epoch,
            splits=[split],
            tokens=io.tokens,
        ):
            yield torch.from_numpy(x)

    per_image = (
        len(m.written_tokens)
        if io.tokens == "all"
        else sum((t >= m.n_prefix_tokens) == (io.tokens == "patches") for t in m.written_tokens)
    )
    n_rows = sum(f["images"] for f in m.files(io.layer, [io.train_split])) * per_image
    if n_rows == 0:
        raise ValueError(f"no {io.tokens} tokens of split {io.train_split!r} in {io.shard_dir}")
    n_steps = -(-n_rows // cfg.batch_size) * cfg.n_epochs
    sae, summary = train_sae(batches, m.d_model, cfg, log=log, progress=progress, n_steps=n_steps)
    sae = sae.cpu()

    def eval_batches():
        for _, _, x in shards.iter_ordered(
            io.shard_dir, io.layer, splits=[io.eval_split], tokens=io.tokens
        ):
            yield torch.from_numpy(x)

    metrics = evaluate(sae, eval_batches())
    out_dir = Path(io.out_dir)
    tmp = tmp_dir_for(out_dir)
    extra = {
        "shard_dir": str(io.shard_dir),
        "manifest_sha256": m.sha256,
        "backbone": m.data["model"]["name"],
        "backbone_sha256": m.data["model"]["weights_sha256"],
        "layer": io.layer,
        "tokens": io.tokens,
        "train": to_dict(cfg),
        "metrics": scalars(metrics),
        "summary": summary,
    }
    sae.save(tmp, extra=extra)
    replace_dir(tmp, out_dir)
    return metrics


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a metrics dict (per-feature arrays left out)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


# ---------------------------------------------------------------------------------------------
# stats


@dataclass(frozen=True)
class StatsStage:
    """params.yaml section `stats`: which SAE over which shards, and where the tables go."""

    sae_dir: str = "artifacts/saes/demo"
    """The trained SAE (its cfg.json says the layer and token policy it was trained with)."""
    shard_dir: str = "artifacts/activations/shapes"
    """The shard set to stream (may differ from the one the SAE was trained on)."""
    out_dir: str = "artifacts/stats/demo"
    """Where features/top_examples/feature_labels/run.parquet are written."""
    run: str = "demo"
    """The run's name in the warehouse."""
    options: dict[str, Any] = field(default_factory=dict)
    """The fields of `stats.StatsConfig` (n_top, splits, histogram bins, ...)."""


def stats_stage(io: StatsStage, progress: bool = True) -> dict[str, Any]:
    """Per-feature statistics of an SAE over a shard set, streamed image by image."""
    from saev_core.sae import SAE
    from saev_core.stats import StatsConfig, compute_stats, write_stats

    cfg = from_dict(StatsConfig, io.options, where="stats.options")
    sae = SAE.load(io.sae_dir)
    extra = sae.extra
    layer = int(extra.get("layer", 0))
    m = shards.read_manifest(io.shard_dir)
    if m.d_model != sae.cfg.d_model:
        raise ValueError(
            f"SAE {io.sae_dir} expects d_model {sae.cfg.d_model}, shards {io.shard_dir} have {m.d_model}"
        )
    patch_labels = shards.read_patch_labels(io.shard_dir)
    label_names = sorted(set(patch_labels["label"])) or None
    stats = compute_stats(
        sae,
        shards.iter_ordered(io.shard_dir, layer, splits=list(cfg.splits)),
        patch_labels,
        label_names,
        m.n_prefix_tokens,
        cfg,
        run=io.run,
        progress=progress,
    )
    metrics = extra.get("metrics", {})
    train = extra.get("train", {})
    run_info = {
        "run": io.run,
        "sae_dir": str(io.sae_dir),
        "shard_dir": str(io.shard_dir),
        "backbone": m.data["model"]["name"],
        "layer": layer,
        "arch": sae.cfg.arch,
        "d_model": sae.cfg.d_model,
        "d_sae": sae.cfg.d_sae,
        "k": sae.cfg.k if sae.cfg.arch == "topk" else None,
        "l0": metrics.get("l0"),
        "fvu": metrics.get("fvu"),
        "dead_frac": metrics.get("dead_frac"),
        "dense_frac": metrics.get("dense_frac"),
        "manifest_sha256": m.sha256,
        "cfg_json": json.dumps({"train": train, "stats": to_dict(cfg)}),
    }
    out_dir = Path(io.out_dir)
    tmp = tmp_dir_for(out_dir)
    write_stats(stats, tmp, run_info)
    replace_dir(tmp, out_dir)
    return {
        "n_tokens": stats.n_tokens,
        "n_images": stats.n_images,
        "labels": list(stats.label_names),
    }
