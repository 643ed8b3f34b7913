"""Loading: any ViT by hub id or directory (`load_backbone`), and the demo classifier.

One code path for a hub id and a local directory (tests save tiny models to a temporary folder and
load them exactly as a hub id would be): `transformers.AutoModel`, or the vision tower of a
CLIP/SigLIP model. The token layout is measured with one forward pass rather than read from
per-family tables, and checked against the weights (is there a CLS vector?) and the config
(`num_register_tokens`). The processor's resize and centre crop are read into `Backbone.geometry`
(`saev_core.geometry`), the map from original pixels to the input that masks and overlays follow.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from saev_core.backbone.hooks import (
    _patch_size,
    _vision_config,
    find_blocks,
    preprocess,
    record_blocks,
)
from saev_core.backbone.model import Backbone, pick_device, resolve_dtype, weights_sha256
from saev_core.geometry import read_geometry

# Names of the learned CLS vector in transformers' embeddings: `cls_token` (ViT, DINOv2, BEiT),
# `class_embedding` (CLIP). SigLIP holds neither and has no CLS token.
CLS_PARAMETER_NAMES = ("cls_token", "class_embedding")


def load_backbone(name_or_path: str, device: str | None = None, dtype: str = "auto") -> Backbone:
    """Load a ViT-style vision model (hub id or directory) with its processor, blocks and layout.

    `device=None` picks CUDA, MPS or CPU; `dtype` is one of `DTYPES` ("auto": float16 on CUDA).
    A hub id resolves through the Hugging Face cache like any `from_pretrained` call, so with
    HF_HUB_OFFLINE=1 it only reads what is already cached. A ViTMAE checkpoint (facebook/vit-mae-*,
    or the demo MAE of `saev_core.demo_vit.objectives`) loads as its encoder over every patch, in
    order (`keep_patch_order`).
    """
    import torch
    from PIL import Image
    from transformers import MODEL_MAPPING, AutoConfig, AutoImageProcessor, AutoModel

    name_or_path = str(name_or_path)
    if not Path(name_or_path).is_dir() and _looks_like_path(name_or_path):
        raise FileNotFoundError(f"backbone directory not found: {name_or_path}")
    device = pick_device(device)
    dtype = resolve_dtype(dtype, device)
    config = AutoConfig.from_pretrained(name_or_path)
    # A full CLIPModel/SiglipModel checkpoint: build only its vision tower (CLIPVisionModel, ...),
    # whose weight names match the checkpoint's, so the text tower is never read into memory.
    vision_config = getattr(config, "vision_config", None)
    if vision_config is not None and type(vision_config) in MODEL_MAPPING:
        config = vision_config
    kwargs = {}
    if config.model_type == "vit":
        kwargs["add_pooling_layer"] = False  # unused here; would be initialised at random
    if config.model_type == "vit_mae":
        config.mask_ratio = 0.0  # an MAE checkpoint (ours, facebook/vit-mae-*): every patch
    # A classifier checkpoint (the demo ViT) has head weights AutoModel does not use; transformers
    # reports those loudly. Report only what matters: weights the model needed and did not find.
    # transformers 5 loads in the checkpoint's own dtype unless told, so always say which.
    with _transformers_quiet():
        model, info = AutoModel.from_pretrained(
            name_or_path,
            config=config,
            dtype=getattr(torch, dtype),
            output_loading_info=True,
            **kwargs,
        )
    if info.get("missing_keys"):
        warnings.warn(
            f"{name_or_path}: weights not in the checkpoint, left at random init: "
            f"{sorted(info['missing_keys'])}",
            stacklevel=2,
        )
    if isinstance(getattr(model, "vision_model", None), torch.nn.Module):
        model = model.vision_model  # a multimodal model without an AutoModel class for its tower
    if config.model_type == "vit_mae":
        keep_patch_order(model)
    model = model.eval().to(device)
    processor = AutoImageProcessor.from_pretrained(name_or_path)
    # Checked against the processor itself; a processor it cannot follow still extracts.
    geometry, geometry_error = read_geometry(processor)
    vcfg = _vision_config(model)
    n_layers = int(vcfg.num_hidden_layers)
    blocks = find_blocks(model, n_layers)
    patch_size = _patch_size(model)

    # Measure the token layout on one blank image: the processor fixes the input size (DINOv2
    # crops to 224 while its config says 518), and the model fixes how many prefix tokens it adds.
    probe = Image.new("RGB", (32, 32), (128, 128, 128))
    backbone = Backbone(
        model=model,
        processor=processor,
        blocks=blocks,
        n_layers=n_layers,
        d_model=int(vcfg.hidden_size),
        n_prefix_tokens=0,
        has_cls=False,
        n_registers=0,
        n_patches=0,
        grid=(0, 0),
        patch_size=patch_size,
        image_size=(0, 0),
        name=name_or_path,
        weights_sha256=weights_sha256(name_or_path),
        device=device,
        dtype=dtype,
        geometry=geometry,
        geometry_error=geometry_error,
    )
    pixel_values = preprocess(backbone, [probe])
    h, w = pixel_values.shape[-2:]
    if geometry is not None and geometry.input_size(*probe.size) != (h, w):
        raise ValueError(
            f"{name_or_path}: its processor makes a {h}x{w} input from a {probe.size[1]}x"
            f"{probe.size[0]} image, but its settings {geometry.to_dict()} say "
            f"{geometry.input_size(*probe.size)}; saev_core.geometry cannot follow this processor"
        )
    with torch.inference_mode(), record_blocks(backbone, [0]) as acts:
        model(pixel_values=pixel_values)
    n_tokens = acts[0].shape[1]
    grid = (h // patch_size, w // patch_size)
    n_patches = grid[0] * grid[1]
    if n_tokens < n_patches:
        raise ValueError(
            f"{name_or_path}: block 0 gives {n_tokens} tokens, fewer than {n_patches} patches"
        )
    backbone.image_size = (int(h), int(w))
    backbone.grid = grid
    backbone.n_patches = n_patches
    backbone.n_prefix_tokens = n_tokens - n_patches
    backbone.has_cls, backbone.n_registers = _prefix_layout(backbone, vcfg)
    return backbone


def keep_patch_order(model: Any) -> None:
    """Make a `ViTMAEModel` see every patch in its original (row-major) order, always.

    ViTMAE's embeddings shuffle the patches by argsort of random noise, then keep the first
    (1 - mask_ratio) of them; even at mask_ratio 0 the tokens come out in a random order that
    changes every call. Noise that increases along the patches makes that argsort the identity,
    so with `config.mask_ratio = 0` (set by `load_backbone`) the encoder is a plain ViT over all
    patches. A forward pre-hook supplies it on every call, whatever the caller passed.
    """
    import torch

    embeddings = model.embeddings
    # exactly 0: ViTMAE keeps int(L * (1 - r)) patches, L - 1 for any 0 < r <= 1/L as well
    if float(model.config.mask_ratio) != 0.0:
        raise ValueError(
            f"keep_patch_order needs config.mask_ratio exactly 0 (every patch kept; ViTMAE keeps "
            f"int(L * (1 - mask_ratio)) of L patches), got {model.config.mask_ratio}"
        )

    def in_order(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        pixel_values = args[0] if args else kwargs["pixel_values"]
        n_patches = (pixel_values.shape[-2] // module.patch_size) * (
            pixel_values.shape[-1] // module.patch_size
        )
        noise = torch.arange(n_patches, device=pixel_values.device, dtype=torch.float32)
        kwargs["noise"] = noise.expand(pixel_values.shape[0], n_patches)
        return args[:1], kwargs

    embeddings.register_forward_pre_hook(in_order, with_kwargs=True)


def _prefix_layout(backbone: Backbone, config: Any) -> tuple[bool, int]:
    """(has CLS, number of registers) from the weights and config, checked against the measure.

    A forward pass counts the prefix tokens but cannot say which is which; the model says whether
    it holds a CLS vector, and the config how many registers follow it. They must add up.
    """
    has_cls = any(
        name.rsplit(".", 1)[-1] in CLS_PARAMETER_NAMES
        for name, _ in backbone.model.named_parameters()
    )
    n_registers = int(getattr(config, "num_register_tokens", 0) or 0)
    if int(has_cls) + n_registers != backbone.n_prefix_tokens:
        cls = "a CLS token" if has_cls else "no CLS token"
        raise ValueError(
            f"{backbone.name} ({config.model_type}): block 0 gives {backbone.n_prefix_tokens} "
            f"token(s) before its {backbone.n_patches} patches, but the model has {cls} "
            f"(a parameter named {' or '.join(CLS_PARAMETER_NAMES)}) and {n_registers} registers "
            f"(config.num_register_tokens); the layout CLS, registers, patches does not fit it"
        )
    return has_cls, n_registers


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _looks_like_path(name: str) -> bool:
    """True for names that cannot be hub ids ("org/name" or "name"), e.g. "./x", "/a/b", "a/b/c"."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def load_classifier(path: str | Path, device: str | None = None) -> tuple[Any, dict[int, str]]:
    """The demo classifier (`AutoModelForImageClassification`, eval mode) and its id2label."""
    from transformers import AutoModelForImageClassification

    if not Path(path).is_dir():
        raise FileNotFoundError(f"classifier directory not found: {path}")
    model = AutoModelForImageClassification.from_pretrained(str(path))
    model = model.eval().to(pick_device(device))
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    return model, id2label
