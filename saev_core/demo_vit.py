"""The demo ViT: a small transformers ViT trained on the shapes world (the `backbone` stage).

`train_backbone`: a small `ViTForImageClassification` (hidden 128, 4 blocks, 4 heads, MLP 256,
patch 8 on 64 px) learns which of the 8 concepts (4 shapes, 4 colours) an image holds. FINDINGS.md: a plain image-level loss learns colour at once but shape
slowly. What made shape learnable in ~75 s on 2 CPU cores (measured; numbers are the val
accuracy of the worst shape concept, one seed each, 8 epochs unless said):
  - a dense auxiliary loss: every final patch token predicts which fractions of its pixels are
    background or each shape/colour (from the masks), through a head dropped before saving;
    without it shapes stayed at chance (0.62 after 12 epochs);
  - many small steps: batch 16 costs little more per image on CPU than 64, and at batch 64 shapes
    were still at 0.63-0.76 after 12 epochs;
  - a weight of 4 on the dense loss, shifts of up to 4 px besides left-right flips, and a world
    whose squares and crosses differ more (see saev_core.shapes): 0.904 with transformers' init;
  - a convolution-like start for attention (`local_attention_init`) and PCA-whitened patch
    embeddings (`pca_patch_embedding_init`): 0.958 (sin-cos positions instead: 0.900; random
    patch embedding instead: 0.944).
All the changes are in the starting weights and the training loss; the saved model is a plain
transformers ViT, loadable by `load_backbone` and `load_classifier`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np
    import torch

from saev_core.backbone import (
    classifier_blocks,
    find_blocks,
    noop,
    pick_device,
    record_blocks,
    resolve_layer,
    weights_sha256,
)


@dataclass(frozen=True)
class BackboneConfig:
    """The demo ViT and how it is trained; the `backbone` section of params.yaml."""

    data_dir: str = "data/shapes"
    """The shapes world to train on (written by `saev_core.shapes.generate`)."""
    out_dir: str = "artifacts/backbone"
    """Where the model, its image processor and metrics.json are saved."""
    hidden_size: int = 128
    """d_model of the ViT."""
    num_hidden_layers: int = 4
    """Number of transformer blocks."""
    num_attention_heads: int = 4
    """Attention heads per block."""
    intermediate_size: int = 256
    """Hidden width of each block's MLP."""
    patch_size: int = 8
    """Patch side in px; 8 on 64 px images gives an 8x8 grid."""
    image_size: int = 64
    """Input side in px; must equal the world's image_size."""
    epochs: int = 8
    """Passes over the train split (8: about 75 s on 2 idle CPU cores)."""
    batch_size: int = 16
    """Images per optimiser step; small batches cost little more per image on CPU, and the
    number of steps is what shape learning needed (batch 64: shapes 0.63-0.76 after 12 epochs)."""
    lr: float = 2e-3
    """Peak AdamW learning rate (after warm-up, then cosine to 0)."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    warmup_frac: float = 0.05
    """Fraction of all steps spent warming the learning rate up linearly."""
    aux_weight: float = 4.0
    """Weight of the dense per-patch shape/colour loss (0 turns it off: shapes stay at chance)."""
    aux_layers: tuple[int, ...] = (-1,)
    """Blocks whose patch tokens feed the dense loss (negative counts from the end)."""
    init: Literal["transformers", "sincos", "local"] = "local"
    """Start from transformers' random init, add 2-D sin-cos position embeddings (MAE), or
    also start every attention head looking at one neighbouring patch (`local_attention_init`)."""
    patch_init: Literal["random", "pca"] = "pca"
    """"pca" starts the patch embedding as PCA-whitening of the training patches."""
    attn_sharpness: float = 1.0
    """For init="local": scale of the initial query weights (1.0: ~94% on the neighbour)."""
    aux_targets: Literal["fractions", "majority"] = "fractions"
    """Dense targets per patch: the fraction of its pixels of each shape/colour (and background),
    or only the class covering most of it (which calls thin edge slivers background)."""
    hflip: bool = True
    """Mirror half the training images left-right (the shapes are left-right symmetric)."""
    max_shift: int = 4
    """Shift each training image by up to this many px (objects stay inside the image)."""
    seed: int = 0
    """Seed for initialisation, shuffling and flips."""
    num_threads: int = 2
    """torch CPU threads while training (the demo machine has 2 cores)."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "cpu"
    """Where to train; "auto" picks CUDA, then MPS, then CPU."""
    objective: Literal["supervised", "clip", "mae"] = "supervised"
    """What the ViT learns from: the concept labels (with the dense loss above), the images'
    captions (a CLIPModel, contrastive), or nothing but the pixels (ViTMAEForPreTraining);
    `saev_core.objectives`. The aux_* options apply to "supervised" only."""
    mask_ratio: float = 0.75
    """For objective "mae": the share of patches hidden from the encoder while training."""

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "patch_size",
            "image_size",
            "epochs",
            "batch_size",
            "num_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {self.aux_weight}")
        for layer in self.aux_layers:
            resolve_layer(layer, self.num_hidden_layers)
        if self.init not in ("transformers", "sincos", "local"):
            raise ValueError(f"init must be transformers, sincos or local, got {self.init!r}")
        if self.init != "transformers" and self.hidden_size % (4 * self.num_attention_heads):
            raise ValueError(
                f"init={self.init!r} needs hidden_size ({self.hidden_size}) divisible by "
                f"4 * num_attention_heads ({4 * self.num_attention_heads})"
            )
        if not 0 <= self.max_shift < self.image_size:
            raise ValueError(f"max_shift must be in [0, image_size), got {self.max_shift}")
        if self.patch_init not in ("random", "pca"):
            raise ValueError(f"patch_init must be random or pca, got {self.patch_init!r}")
        if self.aux_targets not in ("fractions", "majority"):
            raise ValueError(f"aux_targets must be fractions or majority, got {self.aux_targets!r}")
        if not self.attn_sharpness > 0:
            raise ValueError(f"attn_sharpness must be > 0, got {self.attn_sharpness}")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device must be auto, cpu, cuda or mps, got {self.device!r}")
        if self.objective not in ("supervised", "clip", "mae"):
            raise ValueError(f"objective must be supervised, clip or mae, got {self.objective!r}")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")


@dataclass
class _Split:
    pixels: Any  # uint8 [n, 3, H, W]
    labels: Any  # float32 [n, n_concepts]
    class_maps: Any  # uint8 [n, 2, H, W]: per pixel 1 + shape index, 1 + colour index; 0 = none


def patch_class_fractions(class_map: torch.Tensor, patch_size: int, n_classes: int) -> torch.Tensor:
    """Per patch (row-major), the fraction of its pixels in each class: [n, n_patches, n_classes].

    `class_map` is an integer tensor [n, H, W] of class ids in 0..n_classes-1.
    """
    import torch.nn.functional as F

    one_hot = F.one_hot(class_map.long(), n_classes).permute(0, 3, 1, 2).float()
    fractions = F.avg_pool2d(one_hot, patch_size)  # [n, n_classes, H/p, W/p]
    return fractions.flatten(2).transpose(1, 2)


def _load_split(data_dir: Path, split: str, progress: bool) -> _Split:
    """One split of a shapes world as tensors: pixels, image labels and per-pixel classes."""
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image
    from tqdm import tqdm

    from .shapes import COLOURS, CONCEPTS, FORMS, SHAPES

    images = pd.read_csv(data_dir / "images.csv", keep_default_na=False)
    objects = pd.read_csv(data_dir / "objects.csv")
    images = images[images["split"] == split].sort_values("image_id")
    if images.empty:
        raise ValueError(f"{data_dir}/images.csv has no images in split {split!r}")
    pixels, masks = [], []
    for rel_img, rel_mask in tqdm(
        zip(images["image"], images["mask"], strict=True),
        total=len(images),
        desc=f"read {split}",
        disable=not progress,
    ):
        with Image.open(data_dir / rel_img) as im:
            pixels.append(np.asarray(im.convert("RGB")))
        with Image.open(data_dir / rel_mask) as m:
            masks.append(np.asarray(m))
    pixels_nhwc = np.stack(pixels)
    masks_nhw = np.stack(masks)

    # Lookup tables [n_images_in_split, 256] from mask value to shape/colour class (0 = none).
    row_of = {int(i): r for r, i in enumerate(images["image_id"])}
    shape_lut = np.zeros((len(images), 256), dtype=np.uint8)
    colour_lut = np.zeros_like(shape_lut)
    objs = objects[objects["image_id"].isin(row_of)]
    rows = objs["image_id"].map(row_of).to_numpy()
    obj = objs["object"].to_numpy()
    # A forms-world word names one concept: its other column is empty (class 0 there).
    shape_lut[rows, obj] = objs["shape"].map({s: i + 1 for i, s in enumerate(SHAPES)}).fillna(0)
    colour_lut[rows, obj] = objs["colour"].map({c: i + 1 for i, c in enumerate(COLOURS)}).fillna(0)
    r = np.arange(len(images))[:, None, None]
    class_maps = np.stack([shape_lut[r, masks_nhw], colour_lut[r, masks_nhw]], axis=1)
    labels = np.zeros((len(images), len(CONCEPTS)), dtype=np.float32)
    for row, text in enumerate(images["labels"]):
        for concept in filter(None, text.split(";")):
            if concept in CONCEPTS:
                labels[row, CONCEPTS.index(concept)] = 1.0
            elif ":" not in concept and concept not in FORMS:  # forms world: "red:word", "word"
                raise ValueError(f"{data_dir}/images.csv: unknown label {concept!r}")
    return _Split(
        pixels=torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2))),
        labels=torch.from_numpy(labels),
        class_maps=torch.from_numpy(class_maps),
    )


def _normalise(pixels_u8: torch.Tensor) -> torch.Tensor:
    # The same as the saved ViTImageProcessor: rescale by 1/255, then (x - 0.5) / 0.5.
    return pixels_u8.float().div_(255.0).sub_(0.5).div_(0.5)


def _augment(
    pixels: torch.Tensor,
    class_maps: torch.Tensor,
    flip: torch.Tensor,
    max_shift: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror the images where `flip` is set, then shift each by up to `max_shift` px.

    Shifts roll the image (the background wraps around) and are limited per image so that no
    object crosses the border; pixels and class maps move together.
    """
    import torch

    pixels, class_maps = pixels.clone(), class_maps.clone()
    pixels[flip] = pixels[flip].flip(-1)
    class_maps[flip] = class_maps[flip].flip(-1)
    if max_shift <= 0:
        return pixels, class_maps
    n, h, w = len(pixels), pixels.shape[-2], pixels.shape[-1]
    on_object = class_maps[:, 0] > 0
    index = []
    for used, size in ((on_object.any(dim=2), h), (on_object.any(dim=1), w)):
        # First and last row (column) with an object pixel bound the shift; empty images: any.
        any_used = used.any(dim=1)
        first = torch.where(any_used, used.int().argmax(dim=1), size - 1)
        last = torch.where(any_used, size - 1 - used.flip(1).int().argmax(dim=1), 0)
        lo = torch.clamp(-first, min=-max_shift)
        hi = torch.clamp(size - 1 - last, max=max_shift)
        shift = lo + (torch.rand(n, generator=gen) * (hi - lo + 1)).long().clamp(max=hi - lo)
        index.append((torch.arange(size)[None, :] - shift[:, None]) % size)  # [n, size]
    rows, cols = index[0][:, None, :, None], index[1][:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    pixels = pixels[batch, torch.arange(pixels.shape[1])[None, :, None, None], rows, cols]
    class_maps = class_maps[
        batch, torch.arange(class_maps.shape[1])[None, :, None, None], rows, cols
    ]
    return pixels, class_maps


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN if one class."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Mid-ranks: every score in a run of ties gets the mean of the run's 1-based ranks.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _evaluate(model: Any, split: _Split, batch_size: int, device: str) -> dict[str, Any]:
    import torch

    from .shapes import CONCEPTS

    probs = []
    with torch.inference_mode():
        for start in range(0, len(split.labels), batch_size):
            x = _normalise(split.pixels[start : start + batch_size].to(device))
            probs.append(torch.sigmoid(model(pixel_values=x).logits).cpu())
    p = torch.cat(probs).numpy()
    y = split.labels.numpy()
    acc = ((p > 0.5) == (y > 0.5)).mean(axis=0)
    out: dict[str, Any] = {"accuracy": {}, "auroc": {}}
    for j, c in enumerate(CONCEPTS):
        out["accuracy"][c] = float(acc[j])
        out["auroc"][c] = auroc(p[:, j], y[:, j])
    out["mean_accuracy"] = float(acc.mean())
    out["min_accuracy"] = float(acc.min())
    out["exact_match"] = float(((p > 0.5) == (y > 0.5)).all(axis=1).mean())
    return out


def sincos_position_embeddings(d_model: int, grid: int) -> torch.Tensor:
    """2-D sin-cos position embeddings [1, 1 + grid^2, d_model] with a zero row for CLS.

    As in MAE (He et al. 2022): half the channels encode the column, half the row, each as
    sin/cos at d_model/4 frequencies from 1 down to 1/10000.
    """
    import torch

    quarter = d_model // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for pos in (cols.reshape(-1), rows.reshape(-1)):
        angles = pos[:, None] * omega[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    pe = torch.cat([torch.zeros(1, d_model, dtype=torch.float64), torch.cat(parts, dim=1)])
    return pe[None].float()


# Offsets (rows, columns) of the neighbour each head starts looking at: head h of block l takes
# entry (l * n_heads + h) mod 8, so 4 heads cover the 4-neighbourhood in even blocks and the
# diagonals in odd ones; two blocks together see a 3x3 patch window, like a 3x3 convolution.
NEIGHBOURS = ((0, -1), (0, 1), (-1, 0), (1, 0), (-1, -1), (-1, 1), (1, -1), (1, 1))


def local_attention_init(model: Any, grid: int, sharpness: float = 1.0) -> None:
    """Start each attention head of a ViT looking at one neighbouring patch.

    Why: a ViT from scratch has no notion of "next to"; on the shapes world it learned colour at
    once but shape only slowly. Starting attention as a convolution (Cordonnier et al. 2020, "On
    the relationship between self-attention and convolutional layers"; Zheng et al. 2024,
    "convolutional initialization" of ViTs) raised the worst shape's val accuracy from 0.90 to
    0.96 in the same 8 epochs (module docstring). Only the initial weights change; the
    architecture stays a plain `ViTForImageClassification`.

    How: position embeddings become Fourier features of the patch's column x and row y at
    frequencies w_k = k pi / grid (k = 1..K), as [sin, cos] pairs, followed by their negatives
    so that every token has mean 0 and LayerNorm only rescales them. For a head with offset
    (dy, dx), W_k copies these features and W_q rotates each pair by the phase w_k dx (or w_k dy),
    so that q_i . k_j = sum_k cos(w_k (x_j - x_i - dx)) + cos(w_k (y_j - y_i - dy)), a Dirichlet
    kernel that peaks where patch j is patch i moved by the offset. Other weights keep
    transformers' initialisation; CLS keeps a zero position embedding.
    """
    import torch

    config = model.config
    d_model, n_heads = config.hidden_size, config.num_attention_heads
    d_head = d_model // n_heads
    n_freq = min(grid, d_head // 4, d_model // 8)
    n_feat = 4 * n_freq  # [sin, cos] x n_freq for columns, then for rows
    if n_freq < 1:
        raise ValueError(f"local attention init needs d_model // n_heads >= 4, got {d_head}")
    w = torch.arange(1, n_freq + 1, dtype=torch.float64) * math.pi / grid
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    feats = []
    for pos in (cols.reshape(-1), rows.reshape(-1)):
        angle = pos[:, None] * w[None, :]
        feats.append(
            torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1).reshape(-1, 2 * n_freq)
        )
    fourier = torch.cat(feats, dim=1)  # [grid^2, n_feat]
    pe = torch.zeros(1 + grid * grid, d_model, dtype=torch.float64)
    pe[1:, :n_feat] = fourier
    pe[1:, n_feat : 2 * n_feat] = -fourier

    vit = getattr(model, "vit", model)
    with torch.no_grad():
        vit.embeddings.position_embeddings.copy_(pe[None].float())
        for li, block in enumerate(find_blocks(vit, config.num_hidden_layers)):
            q_w, k_w = block.attention.q_proj.weight, block.attention.k_proj.weight
            q_w[:, :n_feat] = 0.0
            k_w[:, :n_feat] = 0.0
            for h in range(n_heads):
                dy, dx = NEIGHBOURS[(li * n_heads + h) % len(NEIGHBOURS)]
                rot = torch.zeros(n_feat, n_feat, dtype=torch.float64)
                for axis, delta in ((0, dx), (1, dy)):
                    for f in range(n_freq):
                        i = 2 * (axis * n_freq + f)
                        c, s = math.cos(w[f] * delta), math.sin(w[f] * delta)
                        # [sin a, cos a] -> [sin(a + phase), cos(a + phase)]
                        rot[i : i + 2, i : i + 2] = torch.tensor(
                            [[c, s], [-s, c]], dtype=torch.float64
                        )
                out = slice(h * d_head, h * d_head + n_feat)
                q_w[out, :n_feat] = (sharpness * rot).float()
                k_w[out, :n_feat] = torch.eye(n_feat)


def pca_patch_embedding_init(model: Any, pixel_values: torch.Tensor, patch_size: int) -> None:
    """Start the patch embedding as PCA whitening of patches from `pixel_values` [n, 3, H, W].

    Why: raw patches vary most in their mean colour; a random projection passes that on and
    hides the low-variance directions that carry edges and corners (shape). Whitening gives every
    one of the top-d_model principal directions unit variance from the first step.
    """
    import torch

    vit = getattr(model, "vit", model)
    proj = vit.embeddings.patch_embeddings.projection
    d_model = proj.out_channels
    n, c, h, w = pixel_values.shape
    patches = pixel_values.double().reshape(
        n, c, h // patch_size, patch_size, w // patch_size, patch_size
    )
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(-1, c * patch_size * patch_size)
    mean = patches.mean(dim=0)
    cov = torch.cov((patches - mean).T)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    top = evecs[:, -d_model:].flip(-1).T  # [d_model, c * p * p], largest variance first
    scale = 1.0 / torch.sqrt(evals[-d_model:].flip(-1) + 1e-3)
    weight = top * scale[:, None]
    with torch.no_grad():
        proj.weight.copy_(weight.reshape(d_model, c, patch_size, patch_size).float())
        proj.bias.copy_((-weight @ mean).float())


def build_classifier(cfg: BackboneConfig) -> Any:
    """A freshly initialised multi-label `ViTForImageClassification` over the 8 concepts."""
    from transformers import ViTConfig, ViTForImageClassification

    from .shapes import CONCEPTS

    config = ViTConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        problem_type="multi_label_classification",
        id2label=dict(enumerate(CONCEPTS)),
        label2id={c: i for i, c in enumerate(CONCEPTS)},
    )
    return ViTForImageClassification(config)


def build_processor(image_size: int) -> Any:
    """The image processor saved with the demo ViT: resize to `image_size`, scale to [-1, 1]."""
    try:  # transformers 5 without torchvision: the PIL processor, named directly to stay quiet
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - other transformers builds
        from transformers import ViTImageProcessor as Processor
    return Processor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def train_backbone(
    cfg: BackboneConfig,
    log: Callable[[dict[str, float], int], None] = noop,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the demo ViT on the world in `cfg.data_dir`, save it to `cfg.out_dir`, return metrics.

    `cfg.objective` "clip" or "mae" hands over to `saev_core.objectives.train_objective`; what
    follows describes "supervised".

    The saved directory holds the classifier (safetensors + config.json with id2label), its image
    processor and metrics.json (per-concept val accuracy and AUROC); it loads with both
    `load_backbone(out_dir)` and `load_classifier(out_dir)`. It appears complete or not at all.
    The returned metrics also hold timings (`TIMING_KEYS`, for MLflow); metrics.json does not,
    so the same config on the same machine writes the same bytes.
    """
    if cfg.objective != "supervised":
        from .objectives import train_objective

        return train_objective(cfg, log, progress)
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from .config import to_dict
    from .shapes import COLOURS, CONCEPTS, SHAPES, read_world

    t_start = time.perf_counter()
    data_dir = Path(cfg.data_dir)
    world = read_world(data_dir)
    if world["concepts"] != list(CONCEPTS):
        raise ValueError(f"{data_dir}/world.json concepts {world['concepts']} != {list(CONCEPTS)}")
    if world["config"]["image_size"] != cfg.image_size:
        raise ValueError(
            f"image_size {cfg.image_size} does not match the world's {world['config']['image_size']}"
        )
    device = pick_device(None if cfg.device == "auto" else cfg.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        train = _load_split(data_dir, "train", progress)
        val = _load_split(data_dir, "val", progress)
        t_data = time.perf_counter() - t_start

        torch.manual_seed(cfg.seed)
        model = build_classifier(cfg).to(device)
        if cfg.patch_init == "pca":
            pca_patch_embedding_init(model, _normalise(train.pixels[:1000]), cfg.patch_size)
        grid = cfg.image_size // cfg.patch_size
        if cfg.init == "sincos":
            with torch.no_grad():
                pe = sincos_position_embeddings(cfg.hidden_size, grid)
                model.vit.embeddings.position_embeddings.copy_(pe)
        elif cfg.init == "local":
            local_attention_init(model, grid, cfg.attn_sharpness)
        aux_layers = sorted({resolve_layer(i, cfg.num_hidden_layers) for i in cfg.aux_layers})
        # Dense heads (not saved), one per hooked block: LayerNorm, then shape and colour logits
        # over background + 4 classes each.
        aux_heads = torch.nn.ModuleDict(
            {
                str(layer): torch.nn.Sequential(
                    torch.nn.LayerNorm(cfg.hidden_size),
                    torch.nn.Linear(cfg.hidden_size, 2 * (1 + len(SHAPES))),
                )
                for layer in aux_layers
            }
        ).to(device)
        params = list(model.parameters()) + list(aux_heads.parameters())
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
        )
        n = len(train.labels)
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        warmup = max(1, int(cfg.warmup_frac * total))

        def lr_at(step: int) -> float:
            if step < warmup:
                return cfg.lr * (step + 1) / warmup
            t = (step - warmup) / max(1, total - warmup)
            return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))

        gen = torch.Generator().manual_seed(cfg.seed)
        n_shape = 1 + len(SHAPES)
        blocks = classifier_blocks(model)
        step = 0
        history = []
        bar = tqdm(total=total, desc="train backbone", disable=not progress)
        for epoch in range(cfg.epochs):
            model.train()
            perm = torch.randperm(n, generator=gen)
            flips = (torch.rand(n, generator=gen) < 0.5) & cfg.hflip
            sums = {"loss": 0.0, "cls_loss": 0.0, "aux_loss": 0.0}
            patch_hits = [0, 0]
            for start in range(0, n, cfg.batch_size):
                idx = perm[start : start + cfg.batch_size]
                pixels, maps = _augment(
                    train.pixels[idx], train.class_maps[idx], flips[idx], cfg.max_shift, gen
                )
                x = _normalise(pixels.to(device))
                y = train.labels[idx].to(device)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                with record_blocks(blocks, aux_layers, detach=False) as acts:
                    logits = model(pixel_values=x).logits
                cls_loss = F.binary_cross_entropy_with_logits(logits, y)
                aux_loss = torch.zeros((), device=device)
                if cfg.aux_weight > 0:
                    ts, tc = (
                        patch_class_fractions(
                            maps[:, i].to(device), cfg.patch_size, n_shape
                        ).reshape(-1, n_shape)
                        for i in (0, 1)
                    )
                    if cfg.aux_targets == "majority":
                        ts, tc = (F.one_hot(t.argmax(-1), n_shape).float() for t in (ts, tc))
                    for layer in aux_layers:
                        out = aux_heads[str(layer)](acts[layer][:, 1:, :]).reshape(-1, 2 * n_shape)
                        aux_loss = aux_loss + F.cross_entropy(out[:, :n_shape], ts)
                        aux_loss = aux_loss + F.cross_entropy(out[:, n_shape:], tc)
                    aux_loss = aux_loss / len(aux_layers)
                    # Patch shape accuracy of the last dense head, over patches mostly on objects.
                    with torch.no_grad():
                        fg = ts[:, 0] < 0.5
                        hit = out[fg, 1:n_shape].argmax(-1) == ts[fg, 1:].argmax(-1)
                        patch_hits[0] += int(hit.sum())
                        patch_hits[1] += int(fg.sum())
                loss = cls_loss + cfg.aux_weight * aux_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                k = len(idx)
                sums["loss"] += loss.item() * k
                sums["cls_loss"] += cls_loss.item() * k
                sums["aux_loss"] += aux_loss.item() * k
                bar.update(1)
            model.eval()
            ev = _evaluate(model, val, cfg.batch_size, device)
            row = {f"train_{k}": v / n for k, v in sums.items()}
            row["train_patch_shape_accuracy"] = patch_hits[0] / max(1, patch_hits[1])
            row["val_mean_accuracy"] = ev["mean_accuracy"]
            row["val_min_accuracy"] = ev["min_accuracy"]
            row["elapsed_s"] = time.perf_counter() - t_start
            history.append({"epoch": epoch + 1, **row})
            log(row, epoch + 1)
            bar.set_postfix(
                loss=f"{row['train_loss']:.3f}", val_min_acc=f"{ev['min_accuracy']:.3f}"
            )
        bar.close()
        t_train = time.perf_counter() - t_start - t_data
        final = _evaluate(model, val, cfg.batch_size, device)
    finally:
        torch.set_num_threads(threads_before)

    metrics = {
        "val_accuracy": final["accuracy"],
        "val_auroc": final["auroc"],
        "val_mean_accuracy": final["mean_accuracy"],
        "val_min_accuracy": final["min_accuracy"],
        "val_exact_match": final["exact_match"],
        "val_shape_min_accuracy": min(final["accuracy"][s] for s in SHAPES),
        "val_colour_min_accuracy": min(final["accuracy"][c] for c in COLOURS),
        "n_train": int(len(train.labels)),
        "n_val": int(len(val.labels)),
        "steps": step,
        "data_s": round(t_data, 3),
        "train_s": round(t_train, 3),
        "device": device,
        "history": history,
        # where it was written is no property of the model (and would differ between copies)
        # objective and mask_ratio are left out for "supervised" (they do not apply), so a
        # supervised backbone's metrics.json reads as it did before the other objectives existed
        "config": {
            k: v
            for k, v in to_dict(cfg).items()
            if k != "out_dir"
            and not (k in ("objective", "mask_ratio") and cfg.objective == "supervised")
        },
    }
    _save(model, cfg, metrics)
    log(
        {f"val_accuracy_{c}": v for c, v in final["accuracy"].items()}
        | {f"val_auroc_{c}": v for c, v in final["auroc"].items()},
        cfg.epochs,
    )
    return metrics


TIMING_KEYS = ("data_s", "train_s", "elapsed_s")
"""Wall-clock seconds: they go to MLflow, never into a DVC-tracked file (whose hash they would
change on every run, invalidating every later stage)."""


def tracked_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` without timings (also inside `history`): what metrics.json and the DVC metric
    hold, identical for identical training."""
    out = {k: v for k, v in metrics.items() if k not in TIMING_KEYS}
    if "history" in out:
        out["history"] = [
            {k: v for k, v in row.items() if k not in TIMING_KEYS} for row in out["history"]
        ]
    return out


def _save(model: Any, cfg: BackboneConfig, metrics: dict[str, Any]) -> None:
    """Save model, processor and metrics.json into out_dir via a temporary sibling directory."""
    out_dir = Path(cfg.out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.to("cpu").save_pretrained(tmp)
    build_processor(cfg.image_size).save_pretrained(tmp)
    metrics["weights_sha256"] = weights_sha256(str(tmp))
    (tmp / "metrics.json").write_text(
        json.dumps(tracked_metrics(metrics), sort_keys=True, indent=2) + "\n"
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def main(argv: list[str] | None = None) -> int:
    """`python -m saev_core.demo_vit --data data/shapes --out artifacts/backbone`."""
    parser = argparse.ArgumentParser(
        prog="python -m saev_core.demo_vit",
        description="Train the demo ViT on the shapes world and save it as a transformers model.",
    )
    parser.add_argument("--data", help="shapes world directory (default from config)")
    parser.add_argument("--out", help="output directory (default from config)")
    parser.add_argument("--params", help="read the config from this params.yaml (section backbone)")
    parser.add_argument("--epochs", type=int, help="override epochs")
    parser.add_argument("--seed", type=int, help="override seed")
    parser.add_argument(
        "--objective", choices=("supervised", "clip", "mae"), help="override objective"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    from .config import from_dict, load_section

    overrides = {"data_dir": args.data, "out_dir": args.out, "epochs": args.epochs}
    overrides["seed"] = args.seed
    overrides["objective"] = args.objective
    try:
        if args.params:
            cfg = load_section(args.params, "backbone", BackboneConfig, **overrides)
        else:
            cfg = from_dict(BackboneConfig, {k: v for k, v in overrides.items() if v is not None})
        metrics = train_backbone(cfg, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in metrics.items() if k not in ("history", "config")}
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
