"""Vision transformer backbones: load any ViT by hub id or directory and hook its blocks.

Loading is one code path for a hub id and a local directory (tests save tiny models to a temporary
folder and load them exactly as a hub id would be): `transformers.AutoModel`, the vision tower of a
CLIP/SigLIP model, and the block list found as the `nn.ModuleList` with
`config.num_hidden_layers` entries (STACK.md: block paths moved in transformers 5). Token layout
(CLS if any, then registers, then patches in row-major order) is measured with one forward pass
rather than read from per-family tables, and checked against the weights (is there a CLS vector?)
and the config (`num_register_tokens`); `token_indices` turns a token policy into positions.
Weights load in float16 on CUDA and float32 elsewhere unless `dtype` says otherwise. The
processor's resize and centre crop are read into `Backbone.geometry` (`saev_core.geometry`), the
map from original pixels to the input that masks and overlays follow.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

from saev_core.geometry import Geometry, read_geometry
from saev_core.hashing import sha256_file_cached


def noop(metrics: dict[str, float], step: int) -> None:
    """The default tracking callback: does nothing."""


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class Backbone:
    """A vision transformer ready for activation recording."""

    model: Any
    """The vision tower, a torch `nn.Module` in eval mode; call as `model(pixel_values=...)`."""
    processor: Any
    """The model's own image processor (`AutoImageProcessor`)."""
    blocks: Any
    """The `nn.ModuleList` of transformer blocks; hook `blocks[i]` for the residual stream."""
    n_layers: int
    """Number of blocks."""
    d_model: int
    """Width of the residual stream."""
    n_prefix_tokens: int
    """Tokens before the patches: CLS (if any) plus registers (0 for SigLIP)."""
    has_cls: bool
    """Whether token 0 is a CLS token (SigLIP has none)."""
    n_registers: int
    """Register tokens right after CLS (DINOv2 with registers: `config.num_register_tokens`)."""
    n_patches: int
    """Patch tokens per image (grid[0] * grid[1])."""
    grid: tuple[int, int]
    """Patches per column and per row, for the processor's output size."""
    patch_size: int
    """Side of a patch in px of the processed image."""
    image_size: tuple[int, int]
    """Height and width of the processed image in px."""
    name: str
    """The hub id or directory it was loaded from."""
    weights_sha256: str
    """sha256 of the weights file (one file), or of `sha256sum`-style lines (several)."""
    device: str
    """Where the model lives."""
    dtype: str
    """Floating-point type of the weights and of `preprocess`'s output: float32|float16|bfloat16."""
    geometry: Geometry | None = None
    """The processor's resize and centre crop (`saev_core.geometry`): where original pixels land;
    None when `saev_core.geometry` cannot follow this processor (`geometry_error` says why)."""
    geometry_error: str = ""
    """Why `geometry` is None: masks, boxes and probe targets then refuse to map to patches."""

    @property
    def n_tokens(self) -> int:
        """Tokens per image in the residual stream."""
        return self.n_prefix_tokens + self.n_patches


def pick_device(device: str | None = None) -> str:
    """`device` if given, else CUDA if available, else MPS, else CPU."""
    import torch

    if device:
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


DTYPES = ("auto", "float32", "float16", "bfloat16")
"""What `load_backbone(dtype=...)` accepts; "auto" is float16 on CUDA and float32 elsewhere."""


def resolve_dtype(dtype: str, device: str) -> str:
    """The weight dtype to load on `device`: `dtype`, or for "auto" float16 on CUDA else float32."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {'|'.join(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    # Half precision halves memory and roughly doubles throughput on CUDA; CPU and MPS kernels
    # for float16 are slow or incomplete, so they stay in float32.
    return "float16" if device.startswith("cuda") else "float32"


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


def weights_sha256(name_or_path: str) -> str:
    """sha256 of the weights of a directory, or of a hub id's cached snapshot (never downloads).

    One weights file: its plain sha256 (`sha256sum model.safetensors` agrees). Several (shards):
    sha256 of the `sha256sum`-style lines `<hex>  <name>\\n` sorted by name. safetensors files
    win over .bin files, as in `from_pretrained`.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name_or_path, local_files_only=True))
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weights in {path}")
    digests = [(sha256_file_cached(f), f.name) for f in files]
    if len(digests) == 1:
        return digests[0][0]
    lines = "".join(f"{h}  {n}\n" for h, n in digests)
    return hashlib.sha256(lines.encode()).hexdigest()


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
