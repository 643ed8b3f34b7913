"""Splice SAEs into a backbone's forward pass and edit their features there.

`splice(blocks, Splice(layer, sae, edit, tokens), ...)` is a context manager: inside it, the
output `x` of each named block becomes `(x - x_hat) + decode(f')` (PAPER.md step 5), where
`f = encode(x)`, `x_hat = decode(f)` and `f'` is `f` edited. The SAE's error term is kept, so
with no edit the model is unchanged up to float error, however crude the SAE. Several SAEs at
several layers may be spliced at once; the hooks are registered with `prepend=True` so that
transformers' own `hidden_states` record the edited value (STACK.md, transformers 5).

Because `decode` is affine, `(x - decode(f)) + decode(f') = x + (f' - f)[:, S] W_dec[S] / scale`
where `S` are the edited features: an edit costs one encode and a decode of |S| rows, not a
second full decode (`bench/intervene.py` measures it). The no-edit splice takes the long way
(`x - x_hat + x_hat`) on purpose: it is the control that shows the splice itself changes nothing.

Edits (`FeatureEdit`): suppress (set to 0), clamp (to a value, absolute or a multiple of each
feature's max observed activation), scale (multiply), add (add a multiple of the feature's
decoder direction, i.e. add to f). The tokens they touch come from `intervene.layout.scope_tokens`.
A random-direction control replaces an edit's change of `x` by a fixed random unit vector of the
same norm on every token (`Splice.direction`).

`stacked_splice(blocks, conditions)` runs an edit and its controls (one layer, one SAE) in one
forward pass: the block's output is replaced by one edited copy per condition, stacked along the
batch, so the blocks before the layer run once for all of them and one encode serves them all.
The bootstrap intervals of the mean and of a ratio close the module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

EDIT_OPS = ("suppress", "clamp", "scale", "add")


# ---------------------------------------------------------------------------------------------
# edits


@dataclass(frozen=True)
class FeatureEdit:
    """What happens to some SAE features: suppress, clamp, scale or add."""

    op: Literal["suppress", "clamp", "scale", "add"]
    """suppress: f = 0; clamp: f = v; scale: f = value * f; add: f = f + v (adds v decoder rows)."""
    features: tuple[int, ...]
    """The edited features."""
    value: float = 0.0
    """clamp/add: the value v (or its multiple, see `max_acts`); scale: the factor."""
    max_acts: tuple[float, ...] | None = None
    """Per-feature max observed activation: when given, clamp/add use v = value x max_act
    (the paper's dose: a multiple of the feature's largest activation)."""

    def __post_init__(self) -> None:
        if self.op not in EDIT_OPS:
            raise ValueError(f"edit op must be one of {'|'.join(EDIT_OPS)}, got {self.op!r}")
        if not self.features:
            raise ValueError("an edit needs at least one feature")
        if self.max_acts is not None and len(self.max_acts) != len(self.features):
            raise ValueError(
                f"max_acts has {len(self.max_acts)} values for {len(self.features)} features"
            )

    def targets(self) -> torch.Tensor:
        """v per feature [n_features] (value, or value x max activation)."""
        v = torch.full((len(self.features),), float(self.value))
        if self.max_acts is not None:
            v = v * torch.as_tensor(self.max_acts, dtype=torch.float32)
        return v

    def apply(self, f_cols: torch.Tensor) -> torch.Tensor:
        """The edited values of the edited features' columns `f_cols` [..., n_features]."""
        if self.op == "suppress":
            return torch.zeros_like(f_cols)
        if self.op == "scale":
            return f_cols * self.value
        v = self.targets().to(f_cols)
        return v.expand_as(f_cols).clone() if self.op == "clamp" else f_cols + v


def suppress(*features: int) -> FeatureEdit:
    """Set the features to 0."""
    return FeatureEdit("suppress", tuple(int(f) for f in features))


# ---------------------------------------------------------------------------------------------
# splicing


@dataclass
class Splice:
    """One SAE spliced in after one block, with an optional edit on some tokens."""

    layer: int
    """Block index (negative counts from the end)."""
    sae: Any
    """An `SAE` whose input is this block's output."""
    edit: FeatureEdit | None = None
    """None: splice only (the no-edit control)."""
    tokens: torch.Tensor | None = None
    """Bool [n_tokens] or [batch, n_tokens] (see `scope_tokens`); None: every token."""
    direction: torch.Tensor | None = None
    """Random-direction control: a [d_model] vector; each token's change of x made by `edit` is
    replaced by this direction (unit-normalised) times that change's norm."""
    stats: dict[str, float] = field(default_factory=dict)
    """Filled during the forward: mean norm of the change of x on edited tokens, tokens edited."""


def feature_values(sae: Any, x_nd: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`sae.encode(x_nd)[:, idx]` without building all of `f` [n, d_sae]. Per-latent activations
    (ReLU, and the JumpReLU that JumpReLU and BatchTopK kinds infer with) need only the edited
    columns of `W_enc`; TopK needs every pre-activation (for the k-th largest) but not the dense
    scatter of the top k. A signed TopK (`cfg.topk_relu` False, saev's `mask * h`) keeps the
    kept values' sign, as its `encode` does."""
    cfg = getattr(sae, "cfg", None)
    if cfg is None or not hasattr(sae, "pre_acts"):
        return sae.encode(x_nd)[:, idx]
    x_n = sae.normalise(x_nd)
    if cfg.arch != "topk":
        h_cols = (x_n - sae.b_dec) @ sae.W_enc[:, idx] + sae.b_enc[idx]
        if cfg.arch == "relu":
            return torch.relu(h_cols)
        threshold = sae.jump_threshold()
        if threshold.dim() == 1:  # JumpReLU: one threshold per latent
            threshold = threshold[idx]
        return torch.relu(h_cols) * (h_cols > threshold).to(h_cols.dtype)
    h = sae.pre_acts(x_n)
    kth = h.topk(cfg.k, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values
    cols = h[:, idx]
    kept = torch.relu(cols) if getattr(cfg, "topk_relu", True) else cols
    return torch.where(cols >= kth, kept, torch.zeros_like(cols))


def _edited_output(s: Splice, x: torch.Tensor) -> torch.Tensor:
    sae = s.sae
    x32 = x.float()
    lead, d = x32.shape[:-1], x32.shape[-1]
    if s.edit is None:
        # The no-edit control takes the long way round on purpose (see the module docstring).
        reconstruct = getattr(sae, "reconstruct", None)  # ours decodes a TopK code sparsely
        if reconstruct is not None:
            x_hat = reconstruct(x32.reshape(-1, d))
        else:
            x_hat = sae.decode(sae.encode(x32.reshape(-1, d)))
        return ((x32.reshape(-1, d) - x_hat) + x_hat).reshape(x.shape).to(x.dtype)
    idx = torch.as_tensor(s.edit.features, dtype=torch.long, device=x.device)
    f_cols = feature_values(sae, x32.reshape(-1, d), idx)
    df = s.edit.apply(f_cols) - f_cols  # [batch * tokens, n_edited]
    if s.tokens is not None:
        keep = s.tokens.to(x.device)
        if keep.dim() == 1:
            keep = keep.expand(*lead)
        df = df * keep.reshape(-1, 1).to(df)
    # decode(f + df) - decode(f) = df W_dec / scale (the affine parts cancel)
    dx = (df @ sae.W_dec[idx]) / sae.norm_scale
    if s.direction is not None:
        u = s.direction.to(dx) / s.direction.norm().clamp_min(1e-12)
        dx = dx.norm(dim=-1, keepdim=True) * u
    norms = dx.norm(dim=-1)
    n_edited = int((norms > 0).sum())
    s.stats = {"dx_norm": float(norms.sum()) / max(1, n_edited), "n_tokens": n_edited}
    return (x32 + dx.reshape(x32.shape)).to(x.dtype)


@contextlib.contextmanager
def splice(blocks: Any, *splices: Splice) -> Iterator[list[Splice]]:
    """Within the block, pass the outputs of `blocks[s.layer]` through each splice's SAE.

    `blocks` is an `nn.ModuleList` (`Backbone.blocks`, `classifier_blocks(model)`) or, for one
    splice, the block itself. Two splices at one layer apply in the order given.
    """
    from saev_core.backbone.hooks import resolve_layer

    handles = []

    def hook_for(group: list[Splice]):
        def hook(module, args, output):
            x = output[0] if isinstance(output, (tuple, list)) else output
            for s in group:
                x = _edited_output(s, x)
            return (x, *output[1:]) if isinstance(output, (tuple, list)) else x

        return hook

    if isinstance(blocks, torch.nn.ModuleList):
        by_block: dict[int, list[Splice]] = {}
        for s in splices:
            by_block.setdefault(resolve_layer(int(s.layer), len(blocks)), []).append(s)
        targets = [(blocks[i], group) for i, group in by_block.items()]
    else:
        targets = [(blocks, list(splices))]
    try:
        for block, group in targets:
            handles.append(block.register_forward_hook(hook_for(group), prepend=True))
        yield list(splices)
    finally:
        for h in handles:
            h.remove()


def _stacked_output(conditions: Sequence[Splice], x: torch.Tensor) -> torch.Tensor:
    """[K * b, ...]: the block output `x` [b, ...] edited by each of K conditions, stacked along
    the batch (condition-major). One encode of the union of the edited features serves them all;
    each distinct edit then costs a decode of its own |S| rows (see `_edited_output`), and a
    random-direction condition reuses its edit's per-token norms. Memory beyond the K-fold
    output itself: one [b * tokens, d] change at a time and a [b * tokens] norm per distinct
    edit (not one change per edit kept to the end)."""
    sae = conditions[0].sae
    x32 = x.float()
    lead, d = x32.shape[:-1], x32.shape[-1]
    x_nd = x32.reshape(-1, d)
    union = sorted({f for s in conditions for f in s.edit.features})
    where = {f: i for i, f in enumerate(union)}
    f_all = feature_values(sae, x_nd, torch.as_tensor(union, dtype=torch.long, device=x.device))
    # in the block's dtype: a bf16 model's K-fold output is not held twice (float32, then cast)
    out = torch.empty((len(conditions), *x_nd.shape), dtype=x.dtype, device=x.device)
    norms_of: dict[tuple[int, int], torch.Tensor] = {}

    def change(s: Splice) -> torch.Tensor:
        idx = torch.as_tensor(s.edit.features, dtype=torch.long, device=x.device)
        f_cols = f_all[:, [where[f] for f in s.edit.features]]
        df = s.edit.apply(f_cols) - f_cols
        if s.tokens is not None:
            keep = s.tokens.to(x.device)
            if keep.dim() == 1:
                keep = keep.expand(*lead)
            df = df * keep.reshape(-1, 1).to(df)
        return (df @ sae.W_dec[idx]) / sae.norm_scale

    for c, s in enumerate(conditions):
        key = (id(s.edit), id(s.tokens))
        if s.direction is None:
            dx = change(s)
            norms = norms_of.setdefault(key, dx.norm(dim=-1))
        else:
            if key not in norms_of:
                norms_of[key] = change(s).norm(dim=-1)
            norms = norms_of[key]
            u = s.direction.to(x_nd) / s.direction.norm().clamp_min(1e-12)
            dx = norms[:, None] * u
        n_edited = int((norms > 0).sum())
        s.stats = {"dx_norm": float(norms.sum()) / max(1, n_edited), "n_tokens": n_edited}
        out[c] = x_nd + dx  # summed in float32, rounded once to x's dtype (as `_edited_output`)
        del dx
    return out.reshape(len(conditions) * lead[0], *lead[1:], d)


@contextlib.contextmanager
def stacked_splice(blocks: Any, conditions: Sequence[Splice]) -> Iterator[list[Splice]]:
    """Within the block, the output of `blocks[layer]` (one layer and one SAE, shared by every
    condition, each with an edit) becomes K edited copies stacked along the batch: a forward of b
    images returns K * b outputs, condition-major. The blocks before the layer run once for all
    K conditions; only those after it (and the head) see the K-fold batch. Per-image `tokens`
    must already be narrowed to the b images of the batch."""
    from saev_core.backbone.hooks import resolve_layer

    if not conditions:
        raise ValueError("stacked_splice: give at least one condition")
    first = conditions[0]
    for s in conditions:
        if s.edit is None or s.layer != first.layer or s.sae is not first.sae:
            raise ValueError("stacked_splice: every condition needs an edit, one layer, one SAE")

    def hook(module, args, output):
        x = output[0] if isinstance(output, (tuple, list)) else output
        x = _stacked_output(conditions, x)
        return (x, *output[1:]) if isinstance(output, (tuple, list)) else x

    block = blocks
    if isinstance(blocks, torch.nn.ModuleList):
        block = blocks[resolve_layer(int(first.layer), len(blocks))]
    handle = block.register_forward_hook(hook, prepend=True)
    try:
        yield list(conditions)
    finally:
        handle.remove()


def random_direction(d_model: int, seed: int) -> torch.Tensor:
    """A random unit vector in the residual stream (Gaussian, so uniform on the sphere)."""
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(d_model, generator=g)
    return v / v.norm()


# ---------------------------------------------------------------------------------------------
# statistics


def bootstrap_ci(values: np.ndarray, n: int, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    idx = rng.integers(0, len(values), size=(n, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def bootstrap_ratio_ci(
    num: np.ndarray, den: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of sum(num) / sum(den) over resampled items (images);
    for rates whose denominator differs per image (patches, labels)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if len(num) == 0:
        return float("nan"), float("nan")
    idx = rng.integers(0, len(num), size=(n, len(num)))
    d = den[idx].sum(axis=1)
    r = np.where(d > 0, num[idx].sum(axis=1) / np.where(d > 0, d, 1), np.nan)
    r = r[np.isfinite(r)]
    if len(r) == 0:
        return float("nan"), float("nan")
    return float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))
