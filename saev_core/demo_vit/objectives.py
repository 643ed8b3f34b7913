"""Demo backbones with other training objectives than the supervised demo ViT (issue 15, point 2).

The paper's claim is that the objective shapes what a ViT learns. To test it in the shapes world,
`BackboneConfig.objective` picks one of three objectives for the same vision transformer (hidden
128, 4 blocks, 4 heads, MLP 256, patch 8 on 64 px), the same images, augmentation (flips, shifts),
optimiser, schedule, epochs and batch size:
  - "supervised": today's `ViTForImageClassification` on the 8 concept labels
    (`saev_core.demo_vit.supervised`);
  - "clip": language supervision. A `CLIPModel` whose vision tower is that ViT and whose text
    tower (2 blocks) reads the image's caption (`saev_core.shapes.read_captions`); the loss is
    CLIP's symmetric contrastive loss over the batch, with images whose captions are identical
    counted as matches of each other (a small world repeats captions often);
  - "mae": no labels and no text. `ViTMAEForPreTraining` reconstructs the 75% of patches it did
    not see (He et al. 2022), with a 2-block decoder of width 64 that is dropped by the loader.
Each is saved like a hub checkpoint (model, processor, and for CLIP the tokenizer, trained
offline here as a CLIP byte-level BPE over the world's captions) and reads back with the same
`load_backbone` as any hub model: the vision tower of the CLIPModel, and the encoder of the MAE
with no masking and the patches in their original order.

The starting weights follow the supervised ViT's (`init`, `patch_init`): MAE's encoder is a ViT
and takes `local_attention_init` and `pca_patch_embedding_init` as they are; CLIP's tower gets
the same numbers copied in from a ViT initialised that way (`clip._clip_vision_init`).

This module holds the MAE parts and the training loop for "clip" and "mae"; the CLIP parts
are in `saev_core.demo_vit.clip`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saev_core.demo_vit.config import BackboneConfig

from saev_core.backbone.model import noop, pick_device, weights_sha256
from saev_core.demo_vit.clip import (
    MAX_TEXT_TOKENS,
    _caption_ids,
    _captions_for,
    _clip_eval,
    _clip_vision_init,
    build_clip,
    caption_tokenizer,
    clip_embeddings,
    clip_image_processor,
    contrastive_loss,
)
from saev_core.demo_vit.init import _vit_like_init

OBJECTIVES = ("supervised", "clip", "mae")
"""What `BackboneConfig.objective` accepts."""


MAE_DECODER = dict(
    decoder_hidden_size=64,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=4,
    decoder_intermediate_size=128,
)
"""The MAE decoder (used only in training): narrow and shallow, as in the MAE paper's ablation."""


def build_mae(cfg: BackboneConfig) -> Any:
    """A freshly initialised `ViTMAEForPreTraining` whose encoder has the demo ViT's size."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        mask_ratio=cfg.mask_ratio,
        norm_pix_loss=True,
        **MAE_DECODER,
    )
    return ViTMAEForPreTraining(config)


def _mae_eval(model: Any, pixels: Any, seed: int, device: str) -> dict:
    """Val reconstruction loss on masked patches, with a fixed mask per image."""
    import torch

    from saev_core.demo_vit.data import _normalise

    gen = torch.Generator().manual_seed(seed + 1)
    n_patches = model.config.image_size // model.config.patch_size
    noise = torch.rand(len(pixels), n_patches**2, generator=gen)
    total = 0.0
    with torch.inference_mode():
        for s in range(0, len(pixels), 128):
            out = model(
                pixel_values=_normalise(pixels[s : s + 128].to(device)),
                noise=noise[s : s + 128].to(device),
            )
            total += float(out.loss) * len(pixels[s : s + 128])
    return {"val_loss": total / len(pixels)}


@dataclass
class _Pixels:
    pixels: Any  # uint8 [n, 3, H, W]
    class_maps: Any  # uint8 [n, 2, H, W]: 1 on any object's mask, else 0 (bounds the shifts)
    image_ids: list[int]


def _load_pixels(data_dir: Path, split: str, progress: bool) -> _Pixels:
    """One split's images and where objects are, in image_id order; no labels needed, so any
    shapes world variant reads (the forms world's labels include "circle:word" and the like)."""
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image
    from tqdm import tqdm

    images = pd.read_csv(data_dir / "images.csv", keep_default_na=False)
    for column in ("image_id", "split", "image", "mask"):
        if column not in images.columns:
            raise ValueError(f"{data_dir}/images.csv has no column {column!r}")
    images = images[images["split"] == split].sort_values("image_id")
    if images.empty:
        raise ValueError(f"{data_dir}/images.csv has no images in split {split!r}")
    pixels, on_object = [], []
    for rel_img, rel_mask in tqdm(
        zip(images["image"], images["mask"], strict=True),
        total=len(images),
        desc=f"read {split}",
        disable=not progress,
    ):
        with Image.open(data_dir / rel_img) as im:
            pixels.append(np.asarray(im.convert("RGB")))
        with Image.open(data_dir / rel_mask) as m:
            on_object.append(np.asarray(m) > 0)
    px = np.stack(pixels).transpose(0, 3, 1, 2)
    obj = np.stack(on_object).astype(np.uint8)[:, None]
    return _Pixels(
        pixels=torch.from_numpy(np.ascontiguousarray(px)),
        class_maps=torch.from_numpy(np.ascontiguousarray(np.repeat(obj, 2, axis=1))),
        image_ids=[int(i) for i in images["image_id"]],
    )


def _schedule(cfg: BackboneConfig, total: int) -> Callable[[int], float]:
    warmup = max(1, int(cfg.warmup_frac * total))

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))

    return lr_at


def _optimiser(cfg: BackboneConfig, params: list) -> Any:
    import torch

    decay = [p for p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in params if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )


def train_objective(
    cfg: BackboneConfig,
    log: Callable[[dict[str, float], int], None] = noop,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the `cfg.objective` ("clip" or "mae") backbone on `cfg.data_dir`, save it to
    `cfg.out_dir` like a hub checkpoint (appearing complete or not at all), return its metrics.

    metrics.json holds the config, val metrics of the objective itself (CLIP: caption retrieval;
    MAE: reconstruction loss) and the weights' sha256, and no timings (`TIMING_KEYS`).
    """
    import torch
    from tqdm import tqdm

    from saev_core.config import to_dict
    from saev_core.demo_vit.data import _augment, _normalise
    from saev_core.shapes.world import read_world

    if cfg.objective not in ("clip", "mae"):
        raise ValueError(f"train_objective trains clip or mae, got objective {cfg.objective!r}")
    t_start = time.perf_counter()
    data_dir = Path(cfg.data_dir)
    world = read_world(data_dir)
    if world["config"]["image_size"] != cfg.image_size:
        raise ValueError(
            f"image_size {cfg.image_size} does not match the world's {world['config']['image_size']}"
        )
    device = pick_device(None if cfg.device == "auto" else cfg.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        train = _load_pixels(data_dir, "train", progress)
        val = _load_pixels(data_dir, "val", progress)
        torch.manual_seed(cfg.seed)
        init_pixels = _normalise(train.pixels[:1000])
        tokenizer = None
        if cfg.objective == "clip":
            train_caps = _captions_for(data_dir, train.image_ids)
            val_caps = _captions_for(data_dir, val.image_ids)
            tokenizer = caption_tokenizer(train_caps)
            tok_args = dict(padding="max_length", truncation=True, return_tensors="pt")
            train_tok = tokenizer(train_caps, max_length=MAX_TEXT_TOKENS, **tok_args)
            val_tok = tokenizer(val_caps, max_length=MAX_TEXT_TOKENS, **tok_args)
            train_ids, val_ids = _caption_ids(train_caps), _caption_ids(val_caps)
            model = build_clip(cfg, tokenizer)
            _clip_vision_init(cfg, model, init_pixels)
        else:
            model = build_mae(cfg)
            _vit_like_init(cfg, model, init_pixels)
        model = model.to(device)
        t_data = time.perf_counter() - t_start

        opt = _optimiser(cfg, list(model.parameters()))
        n = len(train.pixels)
        total = math.ceil(n / cfg.batch_size) * cfg.epochs
        lr_at = _schedule(cfg, total)
        gen = torch.Generator().manual_seed(cfg.seed)
        step, history = 0, []
        bar = tqdm(total=total, desc=f"train {cfg.objective} backbone", disable=not progress)
        for epoch in range(cfg.epochs):
            model.train()
            perm = torch.randperm(n, generator=gen)
            flips = (torch.rand(n, generator=gen) < 0.5) & cfg.hflip
            loss_sum = 0.0
            for start in range(0, n, cfg.batch_size):
                idx = perm[start : start + cfg.batch_size]
                pixels, _ = _augment(
                    train.pixels[idx], train.class_maps[idx], flips[idx], cfg.max_shift, gen
                )
                x = _normalise(pixels.to(device))
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                if cfg.objective == "clip":
                    img, txt = clip_embeddings(
                        model,
                        x,
                        train_tok["input_ids"][idx].to(device),
                        train_tok["attention_mask"][idx].to(device),
                    )
                    loss = contrastive_loss(img, txt, model.logit_scale, train_ids[idx].to(device))
                else:
                    loss = model(pixel_values=x).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += loss.item() * len(idx)
                bar.update(1)
            model.eval()
            if cfg.objective == "clip":
                ev = _clip_eval(model, val.pixels, val_tok, val_ids, device)
            else:
                ev = _mae_eval(model, val.pixels, cfg.seed, device)
            row = {"train_loss": loss_sum / n, **ev, "elapsed_s": time.perf_counter() - t_start}
            history.append({"epoch": epoch + 1, **row})
            log(row, epoch + 1)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}")
        bar.close()
        t_train = time.perf_counter() - t_start - t_data
    finally:
        torch.set_num_threads(threads_before)

    final = {k: v for k, v in history[-1].items() if k.startswith("val_")}
    metrics = {
        "objective": cfg.objective,
        **final,
        "n_train": int(n),
        "n_val": int(len(val.pixels)),
        "steps": step,
        "data_s": round(t_data, 3),
        "train_s": round(t_train, 3),
        "device": device,
        "history": history,
        "config": {k: v for k, v in to_dict(cfg).items() if k != "out_dir"},
    }
    if cfg.objective == "clip":
        metrics["logit_scale"] = float(model.logit_scale.detach().exp())
    _save(model, cfg, metrics, tokenizer)
    return metrics


def _save(model: Any, cfg: BackboneConfig, metrics: dict[str, Any], tokenizer: Any) -> None:
    """Model, processor (CLIP: image processor + tokenizer) and metrics.json, via a temporary
    sibling directory so that out_dir appears complete or not at all."""
    from saev_core.demo_vit.config import tracked_metrics
    from saev_core.demo_vit.init import build_processor

    out_dir = Path(cfg.out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.to("cpu").save_pretrained(tmp)
    if tokenizer is not None:
        from transformers import CLIPProcessor

        CLIPProcessor(
            image_processor=clip_image_processor(cfg.image_size), tokenizer=tokenizer
        ).save_pretrained(tmp)
    else:
        build_processor(cfg.image_size).save_pretrained(tmp)
    metrics["weights_sha256"] = weights_sha256(str(tmp))
    (tmp / "metrics.json").write_text(
        json.dumps(tracked_metrics(metrics), sort_keys=True, indent=2) + "\n"
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
