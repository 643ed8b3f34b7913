"""The stats stage over files: `stats_stage` streams a shard set through a trained SAE, split by
split, and writes the stats tables, the HTML browser and the exemplar grid into `out_dir`.

`StatsStage` is the params.yaml section `stats`; `stats_tokens` and `manifest_has_cls` read the
token policy and whether token 0 is CLS from the SAE's cfg.json and the shard manifest. Tracking
and orchestration stay outside: a Prefect flow, a test or a notebook calls `stats_stage`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saev_core import shards
from saev_core.config import from_dict, to_dict
from saev_core.files import replace_dir, tmp_dir_for
from saev_core.loaders.common import TOKEN_CHOICES
from saev_core.loaders.ordered import iter_image_batches


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
        from saev_core.stats.config import StatsConfig

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
    see `saev_core.stats.splits`): feature_labels holds every split's scores, leaders are chosen on
    `select_split` and reported on `report_split`; frequencies, max_act and exemplars are over all
    the streamed splits together.
    """
    import numpy as np

    from saev_core.sae.checks import check_sae_matches
    from saev_core.sae.model import SAE
    from saev_core.stats.compute import compute_stats, exemplar_heatmaps
    from saev_core.stats.config import StatsConfig
    from saev_core.stats.splits import (
        CONTROL_PREFIX,
        merge_stats,
        pop_controls,
        resolve_splits,
        shuffled_labels,
    )
    from saev_core.stats.tables import write_stats
    from saev_core.training.evaluation import dense_fractions

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
        return iter_image_batches(
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
    if policy not in TOKEN_CHOICES:
        raise ValueError(f"{sae_dir}/cfg.json: tokens {policy!r} is not one of {TOKEN_CHOICES}")
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
