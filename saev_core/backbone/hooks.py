"""A backbone's blocks and tokens: find the blocks, hook them, pick tokens, preprocess images.

The block list is the `nn.ModuleList` with `config.num_hidden_layers` entries (STACK.md: block
paths moved in transformers 5); `record_blocks` hooks it for the residual stream. `token_indices`
turns a token policy into positions of the layout CLS (if any), registers, patches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

from saev_core.backbone.model import Backbone

TOKEN_POLICIES = ("all", "cls", "registers", "patches")
"""Token policies: every token, the CLS token, the register tokens, or the patch tokens."""


def token_indices(backbone: Backbone, policy: str) -> np.ndarray:
    """Positions on a block output's token axis that `policy` keeps, as int32, in order.

    The layout is the one recorded in shard manifests: token 0 is CLS (when the model has one),
    then the registers, then the patches in row-major order.
    """
    import numpy as np

    if policy not in TOKEN_POLICIES:
        raise ValueError(f"token policy must be one of {'|'.join(TOKEN_POLICIES)}, got {policy!r}")
    n_cls = int(backbone.has_cls)
    start, stop = {
        "all": (0, backbone.n_tokens),
        "cls": (0, n_cls),
        "registers": (n_cls, backbone.n_prefix_tokens),
        "patches": (backbone.n_prefix_tokens, backbone.n_tokens),
    }[policy]
    if stop <= start:
        raise ValueError(
            f"token policy {policy!r} selects no token of {backbone.name}: "
            f"it has {describe_tokens(backbone)}"
        )
    return np.arange(start, stop, dtype=np.int32)


def describe_tokens(backbone: Backbone) -> str:
    """The token layout in words, e.g. "a CLS token, 4 registers and 256 patches"."""
    cls = "a CLS token" if backbone.has_cls else "no CLS token"
    registers = f"{backbone.n_registers} registers" if backbone.n_registers else "no registers"
    return f"{cls}, {registers} and {backbone.n_patches} patches"


def resolve_layer(layer: int, n_layers: int) -> int:
    """Block index `layer` in 0..n_layers-1; negative counts from the end (-1 = last block)."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer must be an int, got {layer!r}")
    if not -n_layers <= layer < n_layers:
        raise ValueError(
            f"layer {layer} out of range for a model with {n_layers} blocks "
            f"(use 0..{n_layers - 1} or -{n_layers}..-1)"
        )
    return layer % n_layers


def find_blocks(model: Any, n_layers: int) -> Any:
    """The one `nn.ModuleList` of `n_layers` same-type modules in `model` (its blocks)."""
    from torch import nn

    found = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers > 0:
            if len({type(m) for m in module}) == 1:
                found.append((path, module))
    if len(found) != 1:
        paths = [p for p, _ in found]
        raise ValueError(
            f"expected one ModuleList of {n_layers} blocks in {type(model).__name__}, "
            f"found {len(found)}: {paths}"
        )
    return found[0][1]


def classifier_blocks(model: Any) -> Any:
    """Blocks of an image classifier; `classifier_blocks(m)[i]` is `load_backbone(...).blocks[i]`."""
    return find_blocks(model, _vision_config(model).num_hidden_layers)


def _vision_config(model: Any) -> Any:
    config = model.config
    return getattr(config, "vision_config", None) or config


def _patch_size(model: Any) -> int:
    """The patch side from the config, else from the stride of the first Conv2d (patch embed)."""
    from torch import nn

    p = getattr(_vision_config(model), "patch_size", None)
    if isinstance(p, (tuple, list)):
        if len(set(p)) != 1:
            raise ValueError(f"non-square patches {p} are not supported")
        p = p[0]
    if isinstance(p, int) and p > 0:
        return p
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.stride[0])
    raise ValueError(f"cannot tell the patch size of {type(model).__name__}")


def block_output(output: Any) -> Any:
    """The hidden states from a block's forward output (a tensor in transformers 5, or a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def record_blocks(
    backbone: Backbone | Any, layers: Sequence[int], detach: bool = True
) -> Iterator[dict[int, Any]]:
    """Record the residual stream after each block in `layers` during forward passes in the block.

    `backbone` is a `Backbone` or an `nn.ModuleList` of blocks (e.g. `classifier_blocks(m)`).
    The dict maps each resolved layer index to the [batch, tokens, d_model] output of that block
    in the latest forward pass (detached unless `detach=False`); negative indices count from the
    end.
    """
    blocks = backbone.blocks if isinstance(backbone, Backbone) else backbone
    resolved = [resolve_layer(layer, len(blocks)) for layer in layers]
    acts: dict[int, Any] = {}
    handles = []

    def hook_for(i: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            out = block_output(output)
            acts[i] = out.detach() if detach else out

        return hook

    try:
        for i in dict.fromkeys(resolved):
            handles.append(blocks[i].register_forward_hook(hook_for(i)))
        yield acts
    finally:
        for h in handles:
            h.remove()


def preprocess(backbone: Backbone, images: list[Image.Image]) -> torch.Tensor:
    """Images to `pixel_values` [batch, 3, H, W] in the backbone's dtype and on its device."""
    import torch

    if not images:
        raise ValueError("preprocess needs at least one image")
    images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
    pixel_values = backbone.processor(images=images, return_tensors="pt")["pixel_values"]
    return pixel_values.to(device=backbone.device, dtype=getattr(torch, backbone.dtype))
