"""The demo ViT: a small transformers ViT trained on the shapes world (the `backbone` stage).

`train_supervised` (the "supervised" objective of `train.train_backbone`): a small `ViTForImageClassification` (hidden 128, 4 blocks, 4 heads, MLP 256,
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

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saev_core.demo_vit.config import BackboneConfig

from saev_core.backbone.hooks import classifier_blocks, record_blocks, resolve_layer
from saev_core.backbone.model import noop, pick_device, weights_sha256
from saev_core.demo_vit.config import tracked_metrics
from saev_core.demo_vit.data import (
    _augment,
    _evaluate,
    _load_split,
    _normalise,
    patch_class_fractions,
)
from saev_core.demo_vit.init import (
    build_classifier,
    build_processor,
    local_attention_init,
    pca_patch_embedding_init,
    sincos_position_embeddings,
)


def train_supervised(
    cfg: BackboneConfig,
    log: Callable[[dict[str, float], int], None] = noop,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the demo ViT on the world in `cfg.data_dir`, save it to `cfg.out_dir`, return metrics.

    The "supervised" objective (`train.train_backbone` dispatches the others to
    `objectives.train_objective`).

    The saved directory holds the classifier (safetensors + config.json with id2label), its image
    processor and metrics.json (per-concept val accuracy and AUROC); it loads with both
    `load_backbone(out_dir)` and `load_classifier(out_dir)`. It appears complete or not at all.
    The returned metrics also hold timings (`TIMING_KEYS`, for MLflow); metrics.json does not,
    so the same config on the same machine writes the same bytes.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from saev_core.config import to_dict
    from saev_core.shapes.config import COLOURS, CONCEPTS, SHAPES
    from saev_core.shapes.world import read_world

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
