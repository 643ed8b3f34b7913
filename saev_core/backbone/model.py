"""The loaded backbone and what it is loaded with: `Backbone`, device and dtype, the weights hash.

`Backbone` holds the vision tower, its processor, its blocks and the measured token layout (CLS if
any, then registers, then patches in row-major order; `saev_core.backbone.load` fills it in).
Weights load in float16 on CUDA and float32 elsewhere unless `dtype` says otherwise
(`resolve_dtype`). `weights_sha256` names the weights a backbone was loaded from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saev_core.geometry import Geometry
from saev_core.hashing import sha256_file_cached


def noop(metrics: dict[str, float], step: int) -> None:
    """The default tracking callback: does nothing."""


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
