"""The shapes world as tensors for the demo ViT: splits, dense patch targets, normalisation,
augmentation (flips, shifts) and evaluation (`auroc`, per-concept accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch


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

    from saev_core.shapes.config import COLOURS, CONCEPTS, FORMS, SHAPES

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

    from saev_core.shapes.config import CONCEPTS

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
