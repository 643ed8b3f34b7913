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
decoder direction, i.e. add to f). Scopes pick the tokens: every token, the patches, the CLS
token, or a region (a patch mask, a pixel bounding box or a pixel mask turned into patches;
boxes and masks in original pixels go through the processor's resize and crop,
`TokenLayout.geometry`).
A random-direction control replaces an edit's change of `x` by a fixed random unit vector of the
same norm on every token (`Splice.direction`).

`stacked_splice(blocks, conditions)` runs an edit and its controls (one layer, one SAE) in one
forward pass: the block's output is replaced by one edited copy per condition, stacked along the
batch, so the blocks before the layer run once for all of them and one encode serves them all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from saev_core.geometry import Geometry

EDIT_OPS = ("suppress", "clamp", "scale", "add")
SCOPES = ("all", "patches", "cls", "region")


# ---------------------------------------------------------------------------------------------
# the stage's configuration


@dataclass(frozen=True)
class InterveneConfig:
    """params.yaml section `intervene`: the hypotheses to test and how to measure them.

    The fields from `model` to `max_images` are the defaults of every hypothesis (the fields of
    `hypotheses.Hypothesis` of the same name); `batch` adds one hypothesis per label (its best
    feature), `hypotheses` and `hypotheses_file` add hand-written ones.
    """

    model: str = "artifacts/backbone"
    """The classifier (task classifier), or the backbone the probe reads (task probe)."""
    sae_dir: str = "artifacts/saes/demo"
    """The SAE to splice in, at the layer recorded in its cfg.json."""
    stats_dir: str = "artifacts/stats/demo"
    """Its per-feature stats (best feature by AUROC, max activation, frequency)."""
    warehouse: str = ""
    """Resolve best features through this DuckDB file (read-only) instead of the stats Parquet."""
    data: str = "data/shapes"
    """Image source of the evaluation images."""
    split: str = "test"
    """Held-out split the experiments run on (not the stats' select split, where the features
    were chosen: that is refused unless a hypothesis sets allow_selection_split)."""
    out_dir: str = "artifacts/interventions/demo"
    """Where results.parquet goes; its name is the run's name."""
    task: Literal["classifier", "probe"] = "classifier"
    """What reads the model: the classifier's head or a probe."""
    probe_dir: str = ""
    """For task probe: a probe directory (`saev probe`)."""
    op: Literal["suppress", "clamp", "scale", "add"] = "clamp"
    """The edit."""
    relative: bool = True
    """clamp/add values are multiples of the feature's max observed activation."""
    strengths: tuple[float, ...] = (0.0, -2.0, -5.0)
    """Dose-response: the edit's values (clamp at 0 suppresses; the paper used -2 x max)."""
    scope: Literal["all", "patches", "cls", "region", "target"] = "all"
    """Which tokens the edit touches (target: the target label's pixels, from the masks)."""
    n_features: int = 1
    """How many of a label's best features (by `select_by` AUROC) are edited together."""
    select_by: Literal["patch", "image"] = "patch"
    """Rank a label's features by patch-level AUROC (where it fires) or image-level AUROC (an
    image's highest patch: what an image classifier can read)."""
    max_images: int = 1000
    """At most this many evaluation images per hypothesis."""
    batch: bool = True
    """Test the best feature of every label in `concepts` (one hypothesis each)."""
    concepts: tuple[str, ...] = ()
    """Labels of the batch; empty = every label the classifier/probe predicts."""
    hypotheses: tuple[dict[str, Any], ...] = ()
    """More hypotheses, each a dict of `Hypothesis` fields over the defaults above."""
    hypotheses_file: str = ""
    """A YAML file with a list of such dicts (or {hypotheses: [...]})."""
    alternative: Literal["auto", "less", "greater", "two-sided"] = "auto"
    """Tested direction of the effect on the target (auto: decrease for suppress, clamp <= 0,
    scale < 1; increase for add > 0, clamp > 0, scale > 1); a hypothesis may set its own."""
    controls: tuple[str, ...] = ("random_feature", "random_direction", "no_edit")
    """Controls run next to every edit."""
    n_control_features: int = 10
    """Random features matched in frequency, per hypothesis and strength."""
    n_control_directions: int = 10
    """Random residual-stream directions matched in norm, per hypothesis and strength."""
    n_candidates: int = 32
    """Random-feature controls come from this many alive features nearest in frequency."""
    correction: Literal["holm", "bh"] = "holm"
    """Multiplicity correction over every hypothesis x strength of the run: holm (family-wise
    error) or bh (Benjamini-Hochberg, false discovery rate)."""
    alpha: float = 0.05
    """Verdict 'supported' when the adjusted p-value is below alpha, the effect points the
    tested way and lies beyond the controls' 95% range (`verdicts.beyond_controls`)."""
    n_bootstrap: int = 2000
    """Bootstrap resamples for the 95% intervals."""
    n_permutations: int = 9999
    """Sign flips of the paired permutation test."""
    batch_size: int = 128
    """Images per forward pass."""
    stack_rows: int = 1024
    """Images x conditions per forward pass after the SAE layer (edit and controls stacked)."""
    n_grid: int = 8
    """Images shown in the before/after grid of each experiment (0: none)."""
    seed: int = 0
    """Seed for control features, random directions, bootstrap and permutations."""

    def __post_init__(self) -> None:
        if not self.strengths:
            raise ValueError("intervene.strengths: give at least one strength")
        if self.scope not in ("all", "patches", "cls", "region", "target"):
            raise ValueError(
                f"intervene.scope must be all|patches|cls|region|target, got {self.scope!r}"
            )
        if self.op not in EDIT_OPS:
            raise ValueError(f"intervene.op must be one of {'|'.join(EDIT_OPS)}, got {self.op!r}")
        if self.n_features < 1:
            raise ValueError("intervene.n_features must be >= 1")
        if self.select_by not in ("patch", "image"):
            raise ValueError(f"intervene.select_by must be patch|image, got {self.select_by!r}")
        if self.correction not in ("holm", "bh"):
            raise ValueError(f"intervene.correction must be holm|bh, got {self.correction!r}")
        if self.alternative not in ("auto", "less", "greater", "two-sided"):
            raise ValueError(
                f"intervene.alternative must be auto|less|greater|two-sided, got {self.alternative!r}"
            )
        if not 0 < self.alpha < 1:
            raise ValueError(f"intervene.alpha must be in (0, 1), got {self.alpha}")
        if self.n_control_features < 0 or self.n_control_directions < 0:
            raise ValueError("intervene.n_control_features/n_control_directions must be >= 0")
        if not self.batch and not self.hypotheses and not self.hypotheses_file:
            raise ValueError("intervene: nothing to test (batch is false and no hypotheses)")

    DEFAULT_FIELDS = (
        "model", "sae_dir", "stats_dir", "warehouse", "data", "split", "task", "probe_dir",
        "op", "relative", "strengths", "scope", "n_features", "select_by", "max_images",
    )  # fmt: skip

    def defaults(self) -> dict[str, Any]:
        """The hypothesis fields every hypothesis of this run starts from."""
        return {k: getattr(self, k) for k in self.DEFAULT_FIELDS}

    def settings(self, device: str = "cpu") -> Any:
        """How experiments are measured (`hypotheses.Settings`)."""
        from saev_core.hypotheses import Settings

        return Settings(
            controls=self.controls,
            n_control_features=self.n_control_features,
            n_control_directions=self.n_control_directions,
            n_bootstrap=self.n_bootstrap,
            n_permutations=self.n_permutations,
            alternative=self.alternative,
            correction=self.correction,
            alpha=self.alpha,
            batch_size=self.batch_size,
            stack_rows=self.stack_rows,
            n_grid=self.n_grid,
            n_candidates=self.n_candidates,
            seed=self.seed,
            device=device,
        )

    def extra_hypotheses(self) -> list[Any]:
        """The hand-written hypotheses (params list, then the YAML file), defaults filled in."""
        from saev_core.config import from_dict
        from saev_core.hypotheses import Hypothesis

        items = list(self.hypotheses)
        if self.hypotheses_file:
            import yaml

            path = Path(self.hypotheses_file)
            if not path.is_file():
                raise FileNotFoundError(f"intervene.hypotheses_file not found: {path}")
            loaded = yaml.safe_load(path.read_text()) or []
            loaded = loaded.get("hypotheses", []) if isinstance(loaded, dict) else loaded
            if not isinstance(loaded, list):
                raise ValueError(f"{path}: expected a list of hypotheses")
            items += loaded
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ValueError(f"intervene hypothesis {i}: expected a mapping, got {item!r}")
            out.append(from_dict(Hypothesis, {**self.defaults(), **item}, f"hypothesis {i}"))
        return out


# ---------------------------------------------------------------------------------------------
# token layout and scopes


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of a block output are: CLS (if any), registers, then patches row-major."""

    n_prefix_tokens: int
    """Tokens before the patches: CLS (if any) plus registers (0 for SigLIP)."""
    has_cls: bool
    """Whether token 0 is a CLS token."""
    grid: tuple[int, int]
    """Patches per column and per row."""
    image_size: tuple[int, int]
    """Height and width in px of the processed image the grid covers."""
    geometry: Geometry | None = None
    """The processor's resize and crop, mapping original pixels (boxes, masks) to the input;
    None: the original image is taken as squashed onto the input."""
    geometry_error: str = ""
    """Set when the processor's geometry could not be read: mapping original pixels refuses."""

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix_tokens + self.n_patches

    @classmethod
    def of_backbone(cls, backbone: Any) -> TokenLayout:
        """The layout `load_backbone` measured."""
        return cls(
            int(backbone.n_prefix_tokens),
            bool(backbone.has_cls),
            tuple(backbone.grid),
            tuple(backbone.image_size),
            getattr(backbone, "geometry", None),
            getattr(backbone, "geometry_error", ""),
        )


def measure_layout(model: Any, blocks: Any, pixel_values: torch.Tensor) -> TokenLayout:
    """The token layout of any transformers vision model (e.g. the demo classifier) measured
    with one forward pass, as `load_backbone` does: prefix = tokens - patches, CLS from weights."""
    from saev_core.backbone import CLS_PARAMETER_NAMES, _patch_size, record_blocks

    patch = _patch_size(model)
    h, w = pixel_values.shape[-2:]
    with torch.no_grad(), record_blocks(blocks, [0]) as acts:
        model(pixel_values=pixel_values[:1])
    grid = (int(h) // patch, int(w) // patch)
    n_prefix = acts[0].shape[1] - grid[0] * grid[1]
    has_cls = any(n.rsplit(".", 1)[-1] in CLS_PARAMETER_NAMES for n, _ in model.named_parameters())
    if n_prefix < int(has_cls):
        raise ValueError(f"{type(model).__name__}: {n_prefix} prefix tokens but a CLS parameter")
    return TokenLayout(n_prefix, has_cls, grid, (int(h), int(w)))


def _check_geometry(layout: TokenLayout) -> None:
    if layout.geometry is None and layout.geometry_error:
        raise ValueError(
            "cannot map original pixels to patches: the processor's resize and crop are "
            f"unknown ({layout.geometry_error})"
        )


def patches_in_bbox(
    layout: TokenLayout, bbox: Sequence[float], image_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Bool [grid_h, grid_w]: patches that overlap the box (x0, y0, x1, y1) given in px of the
    original image of size `image_hw` (default: the processed image). With `layout.geometry` the
    box goes through the processor's resize and crop (a box the crop cuts away touches nothing);
    without, the original image is taken as squashed onto the input."""
    _check_geometry(layout)
    x0, y0, x1, y1 = (float(v) for v in bbox)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"bbox must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {bbox}")
    gh, gw = layout.grid
    if layout.geometry is not None and image_hw is not None:
        ih, iw = layout.image_size
        x0, y0, x1, y1 = layout.geometry.box_to_input((x0, y0, x1, y1), image_hw[1], image_hw[0])
        ph, pw = ih // gh, iw // gw  # the patches cover the input's top-left gh*ph x gw*pw px
    else:
        ih, iw = image_hw or layout.image_size
        ph, pw = ih / gh, iw / gw  # patch r covers rows [r, r + 1) * ih / gh of the image
    if not (x1 > x0 and y1 > y0):
        return np.zeros((gh, gw), dtype=bool)
    rows = np.arange(gh)
    cols = np.arange(gw)
    r_in = ((rows + 1) * ph > y0) & (rows * ph < y1)
    c_in = ((cols + 1) * pw > x0) & (cols * pw < x1)
    return r_in[:, None] & c_in[None, :]


def patches_in_mask(layout: TokenLayout, mask_hw: np.ndarray, min_cover: float = 0.5) -> np.ndarray:
    """Bool [grid_h, grid_w]: patches at least `min_cover` covered by a boolean pixel mask of the
    original image (any size): through `layout.geometry`'s resize and crop by nearest neighbour,
    or, without a geometry, squashed to the processed image."""
    _check_geometry(layout)
    h, w = layout.image_size
    geometry = layout.geometry or Geometry.squash(h, w)
    m = geometry.transform_mask(np.asarray(mask_hw, dtype=bool))
    if m.shape != (h, w):
        raise ValueError(
            f"a {np.shape(mask_hw)[0]}x{np.shape(mask_hw)[1]} mask becomes {m.shape[0]}x{m.shape[1]} "
            f"through {geometry}, not the {h}x{w} input of this layout"
        )
    gh, gw = layout.grid
    ph, pw = h // gh, w // gw
    cover = m[: gh * ph, : gw * pw].reshape(gh, ph, gw, pw).mean(axis=(1, 3))
    return cover >= min_cover


def scope_tokens(
    layout: TokenLayout, scope: str, patch_mask: np.ndarray | torch.Tensor | None = None
) -> torch.Tensor:
    """Bool tokens an edit touches: [n_tokens], or [n_images, n_tokens] for per-image regions.

    `patch_mask` ([grid_h, grid_w] or [n_images, grid_h, grid_w], or flattened patches) is needed
    for scope "region" only.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {'|'.join(SCOPES)}, got {scope!r}")
    t = torch.zeros(layout.n_tokens, dtype=torch.bool)
    if scope == "all":
        return t.fill_(True)
    if scope == "patches":
        t[layout.n_prefix_tokens :] = True
        return t
    if scope == "cls":
        if not layout.has_cls:
            raise ValueError("scope 'cls': this model has no CLS token (SigLIP?); use patches")
        t[0] = True
        return t
    if patch_mask is None:
        raise ValueError("scope 'region' needs a patch mask (or a bbox turned into one)")
    pm = torch.as_tensor(np.asarray(patch_mask), dtype=torch.bool)
    lead = pm.shape[:-2] if pm.shape[-2:] == torch.Size(layout.grid) else pm.shape[:-1]
    pm = pm.reshape(*lead, layout.n_patches)
    prefix = torch.zeros(*lead, layout.n_prefix_tokens, dtype=torch.bool)
    return torch.cat([prefix, pm], dim=-1)


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
    from saev_core.backbone import resolve_layer

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
    from saev_core.backbone import resolve_layer

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
