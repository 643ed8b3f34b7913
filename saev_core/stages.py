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

from saev_core import loaders, shards
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
    """params.yaml section `train`: which shards to train on and where the SAE (and its sweep) go."""

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
    """Checkpoint directory (sae.safetensors + cfg.json); sweep members go to `<out_dir>/sweep/<name>/`."""
    sae: dict[str, Any] = field(default_factory=dict)
    """SAE hyperparameters: the fields of `training.TrainConfig`."""
    sweep: dict[str, dict[str, Any]] = field(default_factory=dict)
    """More SAEs trained on the same pass of the data: `{name: overrides of sae}` (e.g. `{k8: {k: 8}}`)."""
    checkpoint_dir: str = ""
    """Resumable training checkpoints ('' = `<out_dir>.ckpt`); a killed run resumes from it; removed on success."""
    register_as: str = ""
    """MLflow registered-model name for the best SAE of the run and its sweep ('' = none)."""
    register_max_l0: float = 32.0
    """The best SAE: lowest val FVU among those with L0 <= this and under 10% dead features."""

    def __post_init__(self) -> None:
        for name in self.sweep:
            if not name or "/" in name or name.startswith(".") or name == "main":
                raise ValueError(f"train.sweep: bad member name {name!r}")


def check_shards(io: TrainStage) -> Any:
    """The shard set's manifest, after checking what training needs, before any training.

    Refuses a missing layer, an empty split, files that are missing or whose row count or vector
    width disagree with the manifest, so a bad shard set fails in seconds with a clear message.
    """
    import pyarrow.parquet as pq

    m = shards.read_manifest(io.shard_dir)
    if io.layer not in m.layers:
        raise ValueError(f"train.layer {io.layer} not recorded in {io.shard_dir} (has {m.layers})")
    width = m.d_model * m.dtype.itemsize
    for split in (io.train_split, io.eval_split):
        files = m.files(io.layer, [split])
        if not files or sum(f["rows"] for f in files) == 0:
            raise ValueError(f"no rows of split {split!r}, layer {io.layer} in {io.shard_dir}")
        for f in files:
            path = m.dir / f["path"]
            if not path.is_file():
                raise FileNotFoundError(f"shard file {path} is listed in {m.path} but missing")
            meta = pq.read_metadata(path)
            if meta.num_rows != int(f["rows"]):
                raise ValueError(
                    f"shard file {path} has {meta.num_rows} rows, {m.path} says {f['rows']}"
                )
            act = meta.schema.to_arrow_schema().field("act").type
            got = (
                getattr(act, "byte_width", None) or getattr(act, "list_size", 0) * m.dtype.itemsize
            )
            if got != width:
                raise ValueError(
                    f"shard file {path}: vectors of {got} bytes, but the manifest says d_model "
                    f"{m.d_model} x {m.dtype} = {width} bytes"
                )
    return m


def train_stage(
    io: TrainStage,
    log: Log = no_log,
    progress: bool = True,
    member_log: Callable[[str], Log] | None = None,
) -> dict[str, Any]:
    """Train the SAE (and any sweep members, on the same pass of the data) on a shard set.

    Returns the main SAE's held-out metrics (with per-feature `freq`) and, under `"sweep"`,
    `{name: metrics}` for each member. `member_log(name)` gives each member's log callback.
    """
    from saev_core.training import (
        TrainConfig,
        check_shared,
        evaluate,
        sweep_configs,
        train_saes,
    )

    cfg = from_dict(TrainConfig, io.sae, where="train.sae")
    members = sweep_configs(io.sae, io.sweep) if io.sweep else {}
    names = ["main", *members]
    cfgs = [cfg, *members.values()]
    check_shared(cfgs, names)
    m = check_shards(io)
    for c in cfgs:
        c.sae_config(m.d_model)  # k > d_sae and the like fail now, not after reading data
    import torch

    def batches(epoch: int, split: str = io.train_split):
        # dtype=None: batches stay float16 (half the copy); the trainer casts on the device.
        for x in loaders.iter_shuffled(
            io.shard_dir,
            io.layer,
            cfg.batch_size,
            seed=cfg.seed + epoch,
            splits=[split],
            tokens=io.tokens,
            dtype=None,
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
    out_dir = Path(io.out_dir)
    ckpt_dir = (
        Path(io.checkpoint_dir) if io.checkpoint_dir else out_dir.parent / f"{out_dir.name}.ckpt"
    )
    logs = [log] + [member_log(n) if member_log else no_log for n in members]
    results = train_saes(
        batches, m.d_model, cfgs, logs, progress=progress, n_steps=n_steps, checkpoint_dir=ckpt_dir
    )

    def eval_batches():
        for _, _, x in loaders.iter_ordered(
            io.shard_dir, io.layer, splits=[io.eval_split], tokens=io.tokens
        ):
            yield torch.from_numpy(x)

    tmp = tmp_dir_for(out_dir)
    all_metrics = {}
    for name, c, (sae, summary) in zip(names, cfgs, results, strict=True):
        sae = sae.cpu()
        metrics = evaluate(sae, eval_batches(), dense_threshold=c.dense_threshold)
        extra = {
            "shard_dir": str(io.shard_dir),
            "manifest_sha256": m.sha256,
            "backbone": m.data["model"]["name"],
            "backbone_sha256": m.data["model"]["weights_sha256"],
            "layer": io.layer,
            "tokens": io.tokens,
            "train": to_dict(c),
            "metrics": scalars(metrics),
            "summary": summary,
        }
        sae.save(tmp if name == "main" else tmp / "sweep" / name, extra=extra)
        all_metrics[name] = metrics
    replace_dir(tmp, out_dir)
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # the run finished; its checkpoint has served
    main = dict(all_metrics.pop("main"))
    main["sweep"] = all_metrics
    return main


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
    browser: dict[str, Any] = field(default_factory=dict)
    """The fields of `browser.BrowserConfig`: the HTML feature browser and the exemplar grid
    written into out_dir (`browser.html`, `exemplars.png`)."""


def stats_stage(io: StatsStage, progress: bool = True) -> dict[str, Any]:
    """Per-feature statistics of an SAE over a shard set, streamed image by image."""
    from saev_core.sae import SAE
    from saev_core.stats import StatsConfig, compute_stats, exemplar_heatmaps
    from saev_core.stats_tables import write_stats

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
    image_labels = _image_labels(io.shard_dir)
    grid = m.data.get("tokens", {}).get("grid")

    def batches():
        return loaders.iter_image_batches(
            io.shard_dir, layer, cfg.batch_images, splits=list(cfg.splits)
        )

    stats = compute_stats(
        sae,
        batches(),
        patch_labels,
        None,  # every label of the patches or the images
        m.n_prefix_tokens,
        cfg,
        run=io.run,
        progress=progress,
        image_labels=image_labels,
        patch_grid=tuple(grid) if grid else None,
    )
    if cfg.n_heatmaps:
        # a second pass that encodes only the exemplar images
        exemplar_heatmaps(sae, batches(), stats, cfg.n_heatmaps, cfg.device, progress)
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
        "k": sae.cfg.k if sae.cfg.arch in ("topk", "batchtopk", "matryoshka") else None,
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
    pictures = _pictures(io, stats, tmp)
    replace_dir(tmp, out_dir)
    return {
        "n_tokens": stats.n_tokens,
        "n_images": stats.n_images,
        "labels": list(stats.label_names),
        "dead_frac": float((stats.n_fires == 0).mean()),
        "dense_frac": float((stats.freq > 0.01).mean()),
        **{k: str(out_dir / v) for k, v in pictures.items()},
    }


def _pictures(io: StatsStage, stats: Any, stats_dir: Path) -> dict[str, str]:
    """The HTML browser and the exemplar grid (each label's best feature by patch AUROC)."""
    import numpy as np

    from saev_core.browser import BrowserConfig, build_browser, exemplar_grid

    cfg = from_dict(BrowserConfig, io.browser, where="stats.browser")
    if not cfg.enabled:
        return {}
    build_browser(stats_dir, stats_dir / "browser.html", ".", cfg)
    if len(stats.label_names):
        auroc = np.nan_to_num(stats.auroc, nan=-1.0)
        best = list(dict.fromkeys(int(x) for x in auroc.argmax(1)))
    else:
        best = [int(x) for x in np.argsort(-stats.freq, kind="stable")[:8]]
    exemplar_grid(stats_dir, best, stats_dir / "exemplars.png", ".", cfg.n_exemplars)
    return {"browser": "browser.html", "exemplars_png": "exemplars.png"}


def _image_labels(shard_dir: str | Path):
    """The shard set's image labels as a long (image_id, label) table; None when it has none."""
    if not (Path(shard_dir) / shards.IMAGES).exists():
        return None
    images = shards.read_images(shard_dir)
    if "labels" not in images.columns:
        return None
    long = images[["image_id", "labels"]].explode("labels").dropna()
    return long.rename(columns={"labels": "label"})
