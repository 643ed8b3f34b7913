"""The intervene stage: edit SAE features inside the backbone and measure what changes.

`splice(block, sae, edit)` replaces a block's output `x` by `decode(edit(encode(x))) + (x - x_hat)`
(PAPER.md step 5): the SAE's error term is kept, so with no edit the model is unchanged up to
float error. An experiment suppresses the features that best match a concept (by patch AUROC from
the stats stage) on held-out images that contain it, and compares the change in the classifier's
probability for that concept with the same edit on randomly chosen features (the control), with
bootstrap 95% intervals over images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class InterveneConfig:
    """params.yaml section `intervene`."""

    model: str = "artifacts/backbone"
    """The classifier whose predictions are measured (a transformers image classifier dir)."""
    sae_dir: str = "artifacts/saes/demo"
    """The SAE to splice in, at the layer recorded in its cfg.json."""
    stats_dir: str = "artifacts/stats/demo"
    """Per-feature stats of that SAE (feature choice by AUROC, max activation for the dose)."""
    data: str = "data/shapes"
    """Image source for the held-out images."""
    split: str = "test"
    """Held-out split the experiments run on."""
    out_dir: str = "artifacts/interventions/demo"
    """Where results.parquet goes."""
    concepts: tuple[str, ...] = ()
    """Concepts to test; empty = every label the classifier predicts."""
    n_features: int = 1
    """How many of the concept's best features (by patch AUROC) are edited together."""
    strengths: tuple[float, ...] = (0.0, -2.0, -5.0)
    """Dose-response: the edited features are clamped to strength x their max observed value
    (0 = suppress; the seed paper used -2 x max for its quantitative runs)."""
    scope: Literal["all", "patches", "cls"] = "all"
    """Which tokens the edit touches."""
    n_controls: int = 1
    """Random-feature control edits per experiment (the same dose, other features)."""
    n_bootstrap: int = 2000
    """Bootstrap resamples for the 95% intervals."""
    batch_size: int = 128
    """Images per forward pass."""
    max_images: int = 1000
    """At most this many held-out images per concept."""
    n_grid: int = 8
    """Images shown in the before/after grid of each experiment."""
    seed: int = 0
    """Seed for control features and bootstrap."""

    def __post_init__(self):
        if self.n_features < 1 or self.n_controls < 1:
            raise ValueError("intervene.n_features and n_controls must be >= 1")
        if not self.strengths:
            raise ValueError("intervene.strengths: give at least one strength")
        if self.scope not in ("all", "patches", "cls"):
            raise ValueError(f"intervene.scope must be all|patches|cls, got {self.scope!r}")


# ---------------------------------------------------------------------------------------------
# splicing and edits


@contextlib.contextmanager
def splice(block: torch.nn.Module, sae, edit: Edit | None = None) -> Iterator[None]:
    """Within the block, pass its output through the SAE, keeping the error term.

    The hook is registered with `prepend=True` so that transformers' own output recording
    (`hidden_states`) sees the edited value (STACK.md, transformers 5).
    """

    def hook(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        f = sae.encode(x.float())
        x_hat = sae.decode(f)
        f_edit = f if edit is None else edit(f)
        new = (sae.decode(f_edit) + (x.float() - x_hat)).to(x.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = block.register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


def token_index(scope: str, n_prefix_tokens: int) -> slice:
    """Tokens an edit touches: everything, patches only, or the prefix (CLS/registers)."""
    return {
        "all": slice(None),
        "patches": slice(n_prefix_tokens, None),
        "cls": slice(0, n_prefix_tokens),
    }[scope]


def clamp_edit(features: Sequence[int], values: Sequence[float], tokens: slice) -> Edit:
    """Set features to fixed values (0 suppresses; negative values push against them)."""
    idx = torch.as_tensor(list(features), dtype=torch.long)
    vals = torch.as_tensor(list(values), dtype=torch.float32)

    def edit(f_bts: torch.Tensor) -> torch.Tensor:
        f_bts = f_bts.clone()
        f_bts[:, tokens, idx] = vals.to(f_bts.dtype)
        return f_bts

    return edit


def bootstrap_ci(values: np.ndarray, n: int, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    idx = rng.integers(0, len(values), size=(n, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# ---------------------------------------------------------------------------------------------
# experiments


@dataclass
class Experiment:
    """One concept x strength: the measured effect of the edit and of its control."""

    concept: str
    features: list[int]
    control_features: list[int]
    strength: float
    scope: str
    layer: int
    auroc: float
    n_images: int
    p_before: float
    p_after: float
    delta: float
    delta_lo: float
    delta_hi: float
    control_delta: float
    control_lo: float
    control_hi: float
    other_abs_delta: float
    """Mean |change| of the other concepts' probabilities (how specific the edit is)."""
    figure: Any = None

    @property
    def below_control(self) -> bool:
        return self.delta_hi < self.control_lo

    def row(self) -> dict[str, Any]:
        return {
            "experiment": f"{self.concept}@{self.strength:g}",
            "concept": self.concept,
            "feature": self.features[0],
            "features": ",".join(map(str, self.features)),
            "control_feature": self.control_features[0],
            "edit": "clamp",
            "strength": self.strength,
            "scope": self.scope,
            "layer": self.layer,
            "auroc": self.auroc,
            "n_images": self.n_images,
            "p_before": self.p_before,
            "p_after": self.p_after,
            "delta": self.delta,
            "delta_lo": self.delta_lo,
            "delta_hi": self.delta_hi,
            "control_delta": self.control_delta,
            "control_lo": self.control_lo,
            "control_hi": self.control_hi,
            "other_abs_delta": self.other_abs_delta,
            "below_control": self.below_control,
        }


def _probs(model, pixels: torch.Tensor, batch_size: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), batch_size):
            out.append(torch.sigmoid(model(pixel_values=pixels[i : i + batch_size]).logits))
    return torch.cat(out).numpy()


def feature_maps(
    model, block: torch.nn.Module, sae, pixels: torch.Tensor, feature: int, n_prefix: int
) -> np.ndarray:
    """The feature's activation on every patch, unedited: [n_images, grid_h, grid_w]."""
    captured = {}

    def hook(module, args, output):
        captured["x"] = output[0] if isinstance(output, tuple) else output

    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(pixel_values=pixels)
    finally:
        handle.remove()
    with torch.no_grad():
        f = sae.encode(captured["x"].float())[:, n_prefix:, feature]
    side = int(round(f.shape[1] ** 0.5))
    if side * side != f.shape[1]:
        raise ValueError(f"cannot draw {f.shape[1]} patches as a square grid")
    return f.reshape(-1, side, side).numpy()


def run_interventions(cfg: InterveneConfig, progress: bool = True) -> list[Experiment]:
    """All experiments of `cfg`: for each concept and strength, target edit vs control edit."""
    import pandas as pd
    from PIL import Image
    from tqdm import tqdm
    from transformers import AutoImageProcessor

    from saev_core.backbone import classifier_blocks, load_classifier
    from saev_core.data import load_records
    from saev_core.plots import before_after_grid
    from saev_core.sae import SAE

    sae = SAE.load(cfg.sae_dir)
    layer = int(sae.extra.get("layer", 0))
    model, id2label = load_classifier(cfg.model, device="cpu")
    processor = AutoImageProcessor.from_pretrained(cfg.model)
    blocks = classifier_blocks(model)
    n_prefix = int(getattr(model.config, "num_register_tokens", 0) or 0) + 1
    label_index = {name: i for i, name in id2label.items()}
    concepts = list(cfg.concepts) or [id2label[i] for i in sorted(id2label)]
    unknown = [c for c in concepts if c not in label_index]
    if unknown:
        raise ValueError(f"intervene.concepts {unknown} not predicted by {cfg.model}")

    stats_dir = Path(cfg.stats_dir)
    features = pd.read_parquet(stats_dir / "features.parquet")
    feature_labels = pd.read_parquet(stats_dir / "feature_labels.parquet")
    max_act = features.set_index("feature")["max_act"]
    alive = features.loc[features["max_act"] > 0, "feature"].to_numpy()

    records = load_records(cfg.data, [cfg.split])
    images = [np.asarray(Image.open(r.path).convert("RGB")) for r in records]
    pixels = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")[
        "pixel_values"
    ]
    p_base = _probs(model, pixels, cfg.batch_size)
    tokens = token_index(cfg.scope, n_prefix)
    rng = np.random.default_rng(cfg.seed)

    def edited(fs: list[int], strength: float, sub: torch.Tensor) -> np.ndarray:
        values = [strength * float(max_act.get(f, 0.0)) for f in fs]
        with splice(blocks[layer], sae, clamp_edit(fs, values, tokens)):
            return _probs(model, sub, cfg.batch_size)

    results = []
    jobs = [(c, s) for c in concepts for s in cfg.strengths]
    for concept, strength in tqdm(jobs, desc="intervene", disable=not progress):
        j = label_index[concept]
        ranked = feature_labels[feature_labels["label"] == concept].sort_values(
            "auroc", ascending=False
        )
        has = np.array([concept in r.labels for r in records])
        if ranked.empty or not has.any():
            why = "no feature statistics" if ranked.empty else f"no {cfg.split} image contains it"
            print(f"intervene: skipping concept {concept!r}: {why}")
            continue
        feats = ranked["feature"].head(cfg.n_features).astype(int).tolist()
        auroc = float(ranked["auroc"].iloc[0])
        pool = np.setdiff1d(alive, feats)
        # The same control features for every strength of a concept, so doses are comparable.
        crng = np.random.default_rng([cfg.seed, j])
        controls = crng.choice(pool, size=cfg.n_features * cfg.n_controls, replace=False).tolist()
        idx = np.flatnonzero(has)[: cfg.max_images]
        sub = pixels[idx]

        p_after = edited(feats, strength, sub)
        d = p_after[:, j] - p_base[idx, j]
        control_d = []
        for c in range(cfg.n_controls):
            fs = controls[c * cfg.n_features : (c + 1) * cfg.n_features]
            control_d.append(edited(fs, strength, sub)[:, j] - p_base[idx, j])
        control_d = np.concatenate(control_d)
        others = [k for k in range(p_base.shape[1]) if k != j]
        lo, hi = bootstrap_ci(d, cfg.n_bootstrap, rng)
        clo, chi = bootstrap_ci(control_d, cfg.n_bootstrap, rng)
        show = idx[: cfg.n_grid]
        fig = before_after_grid(
            [images[i] for i in show],
            p_base[show, j],
            p_after[: len(show), j],
            concept,
            heatmaps=feature_maps(model, blocks[layer], sae, pixels[show], feats[0], n_prefix),
            title=f"p({concept}) before → after clamping feature(s) {feats} to "
            f"{strength:g} x max at layer {layer} (overlay: feature {feats[0]}'s activation)",
        )
        results.append(
            Experiment(
                concept=concept,
                features=feats,
                control_features=controls,
                strength=float(strength),
                scope=cfg.scope,
                layer=layer,
                auroc=auroc,
                n_images=len(idx),
                p_before=float(p_base[idx, j].mean()),
                p_after=float(p_after[:, j].mean()),
                delta=float(d.mean()),
                delta_lo=lo,
                delta_hi=hi,
                control_delta=float(control_d.mean()),
                control_lo=clo,
                control_hi=chi,
                other_abs_delta=float(np.abs(p_after[:, others] - p_base[idx][:, others]).mean()),
                figure=fig,
            )
        )
    if not results:
        raise ValueError(f"no concept of {concepts} could be tested on split {cfg.split!r}")
    return results


def write_results(rows: list[dict[str, Any]], out_dir: str | Path, run: str) -> Path:
    """results.parquet (one row per experiment), written atomically."""
    import pyarrow as pa

    from saev_core.shards import atomic_write_table

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{"run": run, **r} for r in rows])
    path = out_dir / "results.parquet"
    atomic_write_table(table, path)
    return path
