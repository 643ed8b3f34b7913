"""Linear probes on a frozen backbone's output: the downstream tasks interventions are judged by.

Two kinds (PAPER.md step 5):
- classification: multi-label (one sigmoid per label) on the output's CLS token or the mean of
  its patch tokens; labels are the images' labels (shapes concepts, image-folder classes, ...);
- segmentation: one softmax over background + classes per patch token; the target of a patch is
  the mask value covering most of it in the processor's resized and cropped view
  (`extract.patch_majority`), named through the record's
  `mask_labels` (shapes: an object's colour and shape; segmentation folders: classes.txt).

"The backbone's output" is the model's `last_hidden_state` (after its final norm where it has
one), so an SAE spliced at any block upstream changes what the probe reads. Features are computed
once with the backbone frozen, then the probe trains on them with AdamW. A probe directory holds
`probe.safetensors` (weight, bias) and `probe.json` (task, pooling, classes, the backbone and its
weights' sha256, the config and the held-out metrics). No pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

TASKS = ("classification", "segmentation")
BACKGROUND = "background"


@dataclass(frozen=True)
class ProbeConfig:
    """params.yaml section `probe`: linear probes on a backbone's output over an image source."""

    model: str = "artifacts/backbone"
    """The backbone (hub id or directory), loaded with `load_backbone`."""
    data: str = "data/shapes"
    """Image source (`load_records`): shapes world, image folder or segmentation folder."""
    out_dir: str = "artifacts/probes/demo"
    """Probes go to `<out_dir>/<task>/`."""
    tasks: tuple[str, ...] = TASKS
    """Which probes to train: classification and/or segmentation."""
    pooling: Literal["cls", "mean"] = "cls"
    """Classification input: the CLS token, or the mean of the patch tokens (models without CLS)."""
    labels: tuple[str, ...] = ()
    """Classification labels; empty = every label of the train split."""
    seg_classes: tuple[str, ...] = ()
    """Segmentation classes (besides background); empty = every mask label. Each mask value must
    carry at most one of them (shapes: pick the colours or the shapes)."""
    train_split: str = "train"
    """Split the probes learn from."""
    eval_split: str = "val"
    """Held-out split for the saved metrics."""
    val_fraction: float = 0.1
    """A source without its own val split: the share held out as val (the extract stage's
    `val_fraction`, so that the probes see the splits the shards have)."""
    max_images: int = 0
    """At most this many images per split (0 = all)."""
    epochs: int = 30
    """Passes over the cached features."""
    lr: float = 1e-2
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    batch_size: int = 64
    """Images per backbone forward pass while caching features."""
    seed: int = 0
    """Seed for initialisation and shuffling."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "cpu"
    """Where the backbone runs."""

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"probe.tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"probe.pooling must be cls or mean, got {self.pooling!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"probe.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_images < 0:
            raise ValueError(f"probe.max_images must be >= 0, got {self.max_images}")
        if not self.lr > 0:
            raise ValueError(f"probe.lr must be > 0, got {self.lr}")


class LinearProbe(nn.Module):
    """`logits = pool(h) W^T + b` (classification) or `h_patch W^T + b` per patch (segmentation)."""

    def __init__(self, d_model: int, classes: list[str], task: str, pooling: str, n_prefix: int):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"probe task must be one of {TASKS}, got {task!r}")
        self.classes, self.task, self.pooling, self.n_prefix = (
            list(classes),
            task,
            pooling,
            n_prefix,
        )
        self.linear = nn.Linear(d_model, len(classes))

    def inputs(self, hidden_btd: torch.Tensor) -> torch.Tensor:
        """What the probe reads from the backbone output: [B, D] pooled or [B, P, D] patches."""
        patches = hidden_btd[:, self.n_prefix :]
        if self.task == "segmentation" or self.pooling == "mean":
            return patches if self.task == "segmentation" else patches.mean(dim=1)
        if self.n_prefix < 1:
            raise ValueError("pooling 'cls' on a model without CLS token; use pooling: mean")
        return hidden_btd[:, 0]

    def forward(self, hidden_btd: torch.Tensor) -> torch.Tensor:
        return self.linear(self.inputs(hidden_btd).float())

    def probs(self, hidden_btd: torch.Tensor) -> torch.Tensor:
        """Sigmoid per label [B, C] (classification) or softmax per patch [B, P, C]."""
        logits = self(hidden_btd)
        return torch.sigmoid(logits) if self.task == "classification" else logits.softmax(-1)

    def save(self, out_dir: str | Path, meta: dict[str, Any]) -> Path:
        """probe.safetensors + probe.json, each written to a temporary name, then renamed."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        info = {
            "task": self.task,
            "pooling": self.pooling,
            "classes": self.classes,
            "n_prefix_tokens": self.n_prefix,
            "d_model": self.linear.in_features,
            **meta,
        }
        save_file(tensors, str(out_dir / "probe.safetensors.tmp"))
        (out_dir / "probe.json.tmp").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        os.replace(out_dir / "probe.safetensors.tmp", out_dir / "probe.safetensors")
        os.replace(out_dir / "probe.json.tmp", out_dir / "probe.json")
        return out_dir


def load_probe(probe_dir: str | Path) -> tuple[LinearProbe, dict[str, Any]]:
    """A probe saved by `LinearProbe.save`, and its probe.json."""
    from safetensors.torch import load_file

    probe_dir = Path(probe_dir)
    meta_path = probe_dir / "probe.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"probe not found: {meta_path}")
    meta = json.loads(meta_path.read_text())
    probe = LinearProbe(
        int(meta["d_model"]), meta["classes"], meta["task"], meta["pooling"],
        int(meta["n_prefix_tokens"]),
    )  # fmt: skip
    probe.load_state_dict(load_file(str(probe_dir / "probe.safetensors")))
    return probe.eval(), meta


# ---------------------------------------------------------------------------------------------
# targets


def segmentation_classes(records: list, wanted: tuple[str, ...] = ()) -> list[str]:
    """background + the segmentation classes: `wanted`, or every label found in the masks."""
    found = sorted({lab for r in records for labs in r.mask_labels.values() for lab in labs})
    if not found:
        raise ValueError("segmentation probe: no record has a mask with labelled values")
    # A wanted class absent from these masks stays in the list (the probe then never predicts
    # it), so that the class indices do not depend on which images were loaded.
    return [BACKGROUND, *(list(wanted) or found)]


def patch_targets(record: Any, classes: list[str], grid: tuple[int, int], geometry: Any):
    """Class index per patch [n_patches] (0 = background) from the record's mask, seen through
    `geometry` (`Backbone.geometry`: the processor's resize and crop; a plain (h, w) squashes)."""
    from saev_core.data.images import open_mask
    from saev_core.extract.chunks import patch_majority

    if geometry is None:
        raise ValueError(
            f"{record.mask_path}: cannot map the mask to patches, the backbone's processor "
            "geometry is unknown (see Backbone.geometry_error)"
        )
    values = patch_majority(open_mask(record), grid, geometry)
    lut = np.zeros(int(values.max(initial=0)) + 1, dtype=np.int64)
    index = {c: i for i, c in enumerate(classes)}
    for v, labs in record.mask_labels.items():
        hits = [index[lab] for lab in labs if lab in index]
        if len(hits) > 1:
            raise ValueError(
                f"{record.key}: mask value {v} carries several segmentation classes {labs}; "
                "set probe.seg_classes to one label group (e.g. the colours)"
            )
        if hits and v < len(lut):
            lut[v] = hits[0]
    return lut[values]


def miou(pred: np.ndarray, target: np.ndarray, n_classes: int) -> tuple[float, list[float]]:
    """Mean IoU over classes present in target or prediction, and IoU per class (nan if absent)."""
    conf = np.bincount(target.ravel() * n_classes + pred.ravel(), minlength=n_classes**2)
    return miou_from_confusion(conf.reshape(n_classes, n_classes))


def miou_from_confusion(conf: np.ndarray) -> tuple[float, list[float]]:
    """(mIoU, per-class IoU) from a [target, prediction] confusion matrix."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"), iou.tolist()


# ---------------------------------------------------------------------------------------------
# training


def backbone_outputs(backbone: Any, records: list, batch_size: int) -> torch.Tensor:
    """The backbone's `last_hidden_state` [n_images, n_tokens, d_model] (float32, CPU)."""
    from saev_core.backbone.hooks import preprocess
    from saev_core.data.images import open_image

    out = []
    with torch.inference_mode():
        for i in range(0, len(records), batch_size):
            px = preprocess(backbone, [open_image(r) for r in records[i : i + batch_size]])
            out.append(backbone.model(pixel_values=px).last_hidden_state.float().cpu())
    return torch.cat(out)


def fit_probe(
    probe: LinearProbe, h: torch.Tensor, y: torch.Tensor, cfg: ProbeConfig
) -> LinearProbe:
    """Train the probe's linear layer on cached backbone outputs `h` and targets `y`."""
    x = probe.inputs(h)
    if probe.task == "segmentation":
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss() if probe.task == "classification" else nn.CrossEntropyLoss()
    rows = 256
    probe.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), rows):
            idx = perm[i : i + rows]
            loss = loss_fn(probe.linear(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return probe.eval()


def evaluate_probe(probe: LinearProbe, h: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Held-out metrics: per-label accuracy and AUROC, or patch accuracy, IoU per class, mIoU."""
    from saev_core.demo_vit.data import auroc

    with torch.no_grad():
        p = probe.probs(h).numpy()
    y = y.numpy()
    if probe.task == "classification":
        acc = ((p > 0.5) == (y > 0.5)).mean(axis=0)
        return {
            "accuracy": dict(zip(probe.classes, map(float, acc), strict=True)),
            "auroc": {c: auroc(p[:, j], y[:, j]) for j, c in enumerate(probe.classes)},
            "mean_accuracy": float(acc.mean()),
        }
    pred = p.argmax(-1)
    m, iou = miou(pred, y, len(probe.classes))
    return {
        "patch_accuracy": float((pred == y).mean()),
        "iou": dict(zip(probe.classes, iou, strict=True)),
        "miou": m,
    }


def train_probes(cfg: ProbeConfig) -> dict[str, dict[str, Any]]:
    """Train every probe of `cfg` on the train split, save it with its held-out metrics."""
    from saev_core.backbone.load import load_backbone
    from saev_core.config import to_dict
    from saev_core.data.records import load_records

    torch.manual_seed(cfg.seed)
    bb = load_backbone(cfg.model, device=None if cfg.device == "auto" else cfg.device)
    splits = {}
    for split in (cfg.train_split, cfg.eval_split):
        recs = load_records(cfg.data, [split], cfg.val_fraction)
        splits[split] = recs[: cfg.max_images] if cfg.max_images else recs
    hidden = {s: backbone_outputs(bb, recs, cfg.batch_size) for s, recs in splits.items()}
    results = {}
    for task in cfg.tasks:
        if task == "classification":
            classes = list(cfg.labels) or sorted(
                {lab for r in splits[cfg.train_split] for lab in r.labels}
            )
            if not classes:
                raise ValueError(f"probe: no image of {cfg.data} has a label")
            targets = {
                s: torch.tensor([[float(c in r.labels) for c in classes] for r in recs])
                for s, recs in splits.items()
            }
        else:
            classes = segmentation_classes(splits[cfg.train_split], cfg.seg_classes)
            targets = {
                s: torch.from_numpy(
                    np.stack([patch_targets(r, classes, bb.grid, bb.geometry) for r in recs])
                )
                for s, recs in splits.items()
            }
        probe = LinearProbe(bb.d_model, classes, task, cfg.pooling, bb.n_prefix_tokens)
        fit_probe(probe, hidden[cfg.train_split], targets[cfg.train_split], cfg)
        metrics = evaluate_probe(probe, hidden[cfg.eval_split], targets[cfg.eval_split])
        meta = {
            "model": str(cfg.model),
            "weights_sha256": bb.weights_sha256,
            "data": str(cfg.data),
            "n_train": len(splits[cfg.train_split]),
            "n_eval": len(splits[cfg.eval_split]),
            "config": to_dict(cfg),
            "metrics": metrics,
        }
        probe.save(Path(cfg.out_dir) / task, meta)
        results[task] = metrics
    return results
