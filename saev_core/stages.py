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
import sys
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
    """More SAEs trained on the same pass of the data: `{name: overrides of sae}` (e.g. `{k8: {k: 8}}`).
    The key `distribute: true` among them sets `distribute_sweep` instead of naming a member."""
    distribute_sweep: bool = False
    """Each sweep member its own flow run on the GPU work pool (flows/distributed.py), each with
    its own pass of the data, instead of one pass here; members land in the same place."""
    checkpoint_dir: str = ""
    """Resumable training checkpoints ('' = `<out_dir>.ckpt`); a killed run resumes from it; removed on success."""
    register_as: str = ""
    """MLflow registered-model name for the best SAE of the run and its sweep ('' = none)."""
    register_max_l0: float = 32.0
    """The best SAE: lowest val FVU among those with L0 <= this and under 10% dead features."""

    def __post_init__(self) -> None:
        from saev_core.training import TrainConfig, sweep_configs

        if isinstance(self.sweep, dict) and "distribute" in self.sweep:
            flag = self.sweep["distribute"]
            if not isinstance(flag, bool):
                raise ValueError(f"train.sweep.distribute must be true or false, got {flag!r}")
            members = {k: v for k, v in self.sweep.items() if k != "distribute"}
            object.__setattr__(self, "sweep", members)
            object.__setattr__(self, "distribute_sweep", self.distribute_sweep or flag)
        for name in self.sweep:
            if not name or "/" in name or name.startswith(".") or name == "main":
                raise ValueError(f"train.sweep: bad member name {name!r}")
        # A typo in `sae` or a sweep member (params file or `-S sae.kk=...`) fails on loading,
        # naming the key and the valid ones, not when the stage starts.
        if not isinstance(self.sae, dict):
            raise ValueError(
                f"train.sae: expected a mapping of TrainConfig fields, got {self.sae!r}"
            )
        from_dict(TrainConfig, self.sae, where="train.sae")
        sweep_configs(self.sae, self.sweep)


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


TRAIN_TIMING_KEYS = ("train_seconds", "tokens_per_s")
"""Keys of the training summary that measure time: returned under `metrics["timing"]`, never
written into the checkpoint, so the same training on the same machine writes the same bytes."""


def train_stage(
    io: TrainStage,
    log: Log = no_log,
    progress: bool = True,
    member_log: Callable[[str], Log] | None = None,
) -> dict[str, Any]:
    """Train the SAE (and any sweep members, on the same pass of the data) on a shard set.

    Returns the main SAE's held-out metrics (with per-feature `freq`, and the wall-clock
    `timing`, which the checkpoint does not hold) and, under `"sweep"`, `{name: metrics}` for
    each member. `member_log(name)` gives each member's log callback.
    """
    from saev_core.sae_io import activation_space
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
    # What the batches are: a checkpoint of another layer, token policy, split or shard set
    # (manifest hash) starts over instead of resuming (paths, log_every, device do not count).
    data = {
        "manifest_sha256": m.sha256,
        "layer": io.layer,
        "tokens": io.tokens,
        "split": io.train_split,
        # resuming skips the batches trained on by their place in the loader's order
        "shuffle_order": loaders.SHUFFLE_ORDER,
    }
    results = train_saes(
        batches,
        m.d_model,
        cfgs,
        logs,
        progress=progress,
        n_steps=n_steps,
        checkpoint_dir=ckpt_dir,
        data=data,
        # normalisation and b_dec from rows drawn across the whole train split
        norm_sample=lambda n: torch.from_numpy(
            loaders.sample_rows(
                io.shard_dir, io.layer, n, cfg.seed, [io.train_split], io.tokens, "float32"
            )
        ),
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
        # wall-clock figures go to the caller (MLflow), not into the DVC-tracked cfg.json
        metrics["timing"] = {k: summary[k] for k in TRAIN_TIMING_KEYS if k in summary}
        summary = {k: v for k, v in summary.items() if k not in TRAIN_TIMING_KEYS}
        extra = {
            "shard_dir": str(io.shard_dir),
            "manifest_sha256": m.sha256,
            "backbone": m.data["model"]["name"],
            "backbone_sha256": m.data["model"]["weights_sha256"],
            "activation_space": activation_space(m.data),
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

    def __post_init__(self) -> None:
        from saev_core.browser import BrowserConfig
        from saev_core.stats import StatsConfig

        # unknown keys in `options`/`browser` (params file or `-S options.n_top=...`) fail now
        for name, cls in (("options", StatsConfig), ("browser", BrowserConfig)):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise ValueError(f"stats.{name}: expected a mapping, got {value!r}")
            from_dict(cls, value, where=f"stats.{name}")


def stats_stage(io: StatsStage, progress: bool = True) -> dict[str, Any]:
    """Per-feature statistics of an SAE over a shard set, streamed image by image.

    Streams only the tokens the SAE was trained on (its cfg.json `tokens`, unless
    `stats.options.tokens` says otherwise); whether token 0 is CLS comes from the manifest.
    `compute_stats` runs once per split of `splits` (with every label's shuffled-label control,
    see `saev_core.stats_splits`): feature_labels holds every split's scores, leaders are chosen on
    `select_split` and reported on `report_split`; frequencies, max_act and exemplars are over all
    the streamed splits together.
    """
    import numpy as np

    from saev_core.sae import SAE
    from saev_core.sae_io import check_sae_matches
    from saev_core.stats import StatsConfig, compute_stats, exemplar_heatmaps
    from saev_core.stats_splits import (
        CONTROL_PREFIX,
        merge_stats,
        pop_controls,
        resolve_splits,
        shuffled_labels,
    )
    from saev_core.stats_tables import write_stats
    from saev_core.training import dense_fractions

    sae_sha256 = check_sae_matches(io.sae_dir, io.shard_dir)  # refuse another backbone/shards
    cfg = from_dict(StatsConfig, io.options, where="stats.options")
    sae = SAE.load(io.sae_dir)
    extra = sae.extra
    layer = int(extra.get("layer", 0))
    m = shards.read_manifest(io.shard_dir)
    if m.d_model != sae.cfg.d_model:
        raise ValueError(
            f"SAE {io.sae_dir} expects d_model {sae.cfg.d_model}, shards {io.shard_dir} have {m.d_model}"
        )
    tokens = stats_tokens(cfg.tokens, extra, io.sae_dir)
    if cfg.prefix_apart and tokens != "patches":
        raise ValueError(
            f"stats.prefix_apart measures CLS/registers apart for an SAE trained on patches; "
            f"these stats stream tokens {tokens!r} (stats.tokens {cfg.tokens!r})"
        )
    has_cls = manifest_has_cls(m.data.get("tokens", {}))
    patch_labels = shards.read_patch_labels(io.shard_dir)
    image_labels = _image_labels(io.shard_dir)
    if tokens == "prefix":
        # label association needs patch codes: patch labels sit on patches and an image is
        # scored by its highest patch code, so a CLS/register SAE would get NaN patch scores and
        # an image AUROC of 0.5 for every feature. Skip it; frequencies and max_act stay.
        print(
            f"stats: {io.sae_dir} streams CLS/register tokens only (tokens 'prefix'); label "
            "association is measured on patch codes, so it is skipped: no feature_labels rows "
            "and no label leaders for this run (frequencies and max_act are measured). Stream "
            "patches (stats.tokens: all or patches) to score labels.",
            file=sys.stderr,
        )
        patch_labels = image_labels = None
    grid = m.data.get("tokens", {}).get("grid")
    present = [s for s in cfg.splits if sum(f["images"] for f in m.files(layer, [s])) > 0]
    select, report = resolve_splits(cfg, present)
    split_ids = _split_image_ids(io.shard_dir)

    def batches(splits: list[str], policy: str = tokens):
        return loaders.iter_image_batches(
            io.shard_dir, layer, cfg.batch_images, splits=splits, tokens=policy
        )

    def stats_of(split: str, chosen=None):
        labels, img_labels, names = patch_labels, image_labels, None  # None: every label
        controls = cfg.controls and split in split_ids
        if controls:
            labels, img_labels, names = shuffled_labels(
                patch_labels, image_labels, None, split_ids[split], cfg.control_seed
            )
        thresholds = None
        if chosen is not None and len(chosen.label_names):
            # the select split's best-F1 thresholds, fixed: precision and recall at them here
            # carry no selection on this split (the controls get none)
            want = list(chosen.label_names)
            want += [CONTROL_PREFIX + n for n in want] if controls else []
            if names is not None and list(names) != want:
                raise ValueError(f"split {split!r} scores labels {names}, the select split {want}")
            pad = np.full((len(want) - len(chosen.label_names), chosen.d_sae), np.nan)
            thresholds = {
                k: np.concatenate([getattr(chosen, k), pad])
                for k in ("threshold", "image_threshold")
            }
        st = compute_stats(
            sae,
            lambda: batches([split]),  # a callable: label statistics may take refining passes
            labels,
            names,
            m.n_prefix_tokens,
            cfg,
            run=io.run,
            progress=progress,
            image_labels=img_labels,
            patch_grid=tuple(grid) if grid else None,
            has_cls=has_cls,
            thresholds=thresholds,
        )
        st = pop_controls(st, len(names) // 2) if controls else st
        if chosen is not None and list(st.label_names) != list(chosen.label_names):
            raise ValueError(
                f"split {split!r} scored labels {list(st.label_names)}, the select split "
                f"{list(chosen.label_names)}"
            )
        st.split = split
        return st

    chosen = stats_of(select)
    # at its own thresholds the select split's precision and recall are its best-F1 ones
    chosen.precision_at_select, chosen.recall_at_select = chosen.precision, chosen.recall
    chosen.image_precision_at_select = chosen.image_precision
    chosen.image_recall_at_select = chosen.image_recall
    by_split = {s: chosen if s == select else stats_of(s, chosen) for s in present}
    stats = merge_stats(by_split, label_split=select)
    if cfg.prefix_apart and m.n_prefix_tokens:
        # CLS and registers in a pass of their own: freq_cls without touching freq or max_act
        prefix = compute_stats(
            sae, batches(present, "prefix"), None, [], m.n_prefix_tokens, cfg,
            run=io.run, progress=progress, has_cls=has_cls,
        )  # fmt: skip
        stats.n_cls, stats.n_fires_cls = prefix.n_cls, prefix.n_fires_cls
    if cfg.n_heatmaps:
        # a second pass that encodes only the exemplar images
        exemplar_heatmaps(sae, batches(present), stats, cfg.n_heatmaps, cfg.device, progress)
    metrics = dict(extra.get("metrics", {}))
    if "dense_frac_abs" not in metrics and "dense_frac" in metrics:
        # an SAE trained before the relative rule: its dense_frac was the absolute one
        metrics["dense_frac_abs"] = metrics.pop("dense_frac")
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
        "dense_frac_abs": metrics.get("dense_frac_abs"),
        "manifest_sha256": m.sha256,
        "tokens": tokens,
        "has_cls": has_cls,
        "splits": ",".join(present),
        "select_split": select,
        "report_split": report,
        "cfg_json": json.dumps({"train": train, "stats": to_dict(cfg), "sae_sha256": sae_sha256}),
    }
    out_dir = Path(io.out_dir)
    tmp = tmp_dir_for(out_dir)
    write_stats(stats, tmp, run_info, by_split=by_split)
    pictures = _pictures(io, stats, tmp)
    replace_dir(tmp, out_dir)
    dense = dense_fractions(stats.freq, float(train.get("dense_threshold", 0.01)))
    return {
        "n_tokens": stats.n_tokens,
        "n_images": stats.n_images,
        "labels": list(stats.label_names),
        "tokens": tokens,
        "select_split": select,
        "report_split": report,
        "dead_frac": float((stats.n_fires == 0).mean()),
        "dense_frac": dense["dense_frac"],
        "dense_frac_abs": dense["dense_frac_abs"],
        **{k: str(out_dir / v) for k, v in pictures.items()},
    }


def stats_tokens(option: str, extra: dict[str, Any], sae_dir: str | Path) -> str:
    """The token policy stats stream: `option`, or for "trained" the SAE's own (cfg.json)."""
    policy = extra.get("tokens", "all") if option == "trained" else option
    if policy not in loaders.TOKEN_CHOICES:
        raise ValueError(
            f"{sae_dir}/cfg.json: tokens {policy!r} is not one of {loaders.TOKEN_CHOICES}"
        )
    return str(policy)


def manifest_has_cls(tokens: dict[str, Any]) -> bool | None:
    """Whether token 0 is CLS, from a manifest's `tokens` entry (`has_cls`, else prefix tokens
    minus registers); None when the manifest says neither (compute_stats then takes any prefix
    token 0 to be CLS, as shard sets from before `has_cls` was recorded were laid out)."""
    if "has_cls" in tokens:
        return bool(tokens["has_cls"])
    if "n_registers" in tokens and "n_prefix_tokens" in tokens:
        return int(tokens["n_prefix_tokens"]) - int(tokens["n_registers"]) >= 1
    return None


def _split_image_ids(shard_dir: str | Path) -> dict[str, Any]:
    """{split: image ids} from the shard set's images.parquet ({} when it has none)."""
    if not (Path(shard_dir) / shards.IMAGES).exists():
        return {}
    images = shards.read_images(shard_dir)
    if "split" not in images.columns:
        return {}
    return {str(s): g["image_id"].to_numpy() for s, g in images.groupby("split", sort=False)}


def _pictures(io: StatsStage, stats: Any, stats_dir: Path) -> dict[str, str]:
    """The HTML browser and the exemplar grid (each label's best feature by patch AUROC on the
    select split: `stats` carries that split's label scores)."""
    import numpy as np

    from saev_core.browser import BrowserConfig, build_browser, exemplar_grid

    cfg = from_dict(BrowserConfig, io.browser, where="stats.browser")
    if not cfg.enabled:
        return {}
    build_browser(stats_dir, stats_dir / "browser.html", ".", cfg)
    if len(stats.label_names):
        # a label no patch carries (class folders: image labels only) by its image AUROC
        patchless = np.isnan(stats.auroc).all(axis=1, keepdims=True)
        auroc = np.nan_to_num(np.where(patchless, stats.image_auroc, stats.auroc), nan=-1.0)
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
