"""The extract stage's settings (`ExtractConfig`), the names of its staging files, and the error
raised when an existing shard set was made otherwise (`ShardSetMismatch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saev_core.data.images import VAL_FRACTION

PLAN = "plan.json"
CHUNKS = "chunks"
SKIPPED = "skipped.json"
CONVERTED = "converted.json"
# Reasons older versions skipped images for that `read_image` now converts.
_CONVERTED_NOW = ("CMYK colour: converting", "16-bit or float pixels (mode I;16")


@dataclass(frozen=True)
class ExtractConfig:
    """params.yaml section `extract`."""

    model: str = "artifacts/backbone"
    """Hub id or local directory of the backbone (the same loader handles both)."""
    data: str = "data/shapes"
    """Image source: shapes world, image folder, segmentation folder or saved HF dataset."""
    out_dir: str = "artifacts/activations/shapes"
    """The shard set; new images are appended to a matching one, see the module docstring."""
    layers: tuple[int, ...] = (2,)
    """Blocks whose output (residual stream) is recorded; negative indices count from the end."""
    tokens: Literal["all", "cls", "registers", "patches"] = "all"
    """Token policy: every token, only CLS, only the register tokens, or only the patches."""
    dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of the vectors."""
    precision: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """dtype the model computes in: 'auto' = float16 on CUDA, float32 elsewhere."""
    batch_size: int = 64
    """Images per forward pass."""
    splits: tuple[str, ...] = ("train", "val", "test")
    """Which splits of the source to extract."""
    val_fraction: float = VAL_FRACTION
    """Share of train images held out as val (by a stable hash of each image's key) when the
    source has no val split, e.g. a flat class-folder set; 0 = none. Ignored when it has one."""
    images_per_row_group: int = 128
    """Whole images per Parquet row group (the unit of per-image reading)."""
    shuffle_seed: int | None = 0
    """Images of each split are written in an order permuted by this seed (a hash of the seed
    and each image's key), so that files and row groups of a class-sorted source (ImageNet-style
    class folders) mix classes and a training batch covers many of them; None keeps the source's
    order. Recorded in the manifest as part of the set's identity."""
    images_per_file: int = 4096
    """Whole images per shard file; also the unit of resumption after a crash."""
    device: str = "auto"
    """'auto' (CUDA, then MPS, then CPU), or a torch device string."""
    n_workers: int = 4
    """Threads that decode and preprocess the next batch while the model runs this one."""
    max_pixels: int = 64_000_000
    """Images with more pixels than this are skipped (decompression-bomb guard)."""
    strict: bool = False
    """Stop at the first bad image instead of skipping it and listing it in skipped.json; also
    refuse CMYK and 16-bit grey images instead of converting them."""
    overwrite: bool = False
    """Replace an existing shard set that was made differently instead of refusing."""

    def __post_init__(self):
        if not self.layers:
            raise ValueError("extract.layers: give at least one layer")
        for name in (
            "batch_size",
            "images_per_row_group",
            "images_per_file",
            "n_workers",
            "max_pixels",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"extract.{name} must be positive, got {getattr(self, name)}")
        if self.shuffle_seed is not None and (
            isinstance(self.shuffle_seed, bool) or not isinstance(self.shuffle_seed, int)
        ):
            raise ValueError(
                f"extract.shuffle_seed must be an integer or null, got {self.shuffle_seed!r}"
            )
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"extract.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.tokens not in ("all", "cls", "registers", "patches"):
            raise ValueError(
                f"extract.tokens must be all|cls|registers|patches, got {self.tokens!r}"
            )
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"extract.dtype must be float16|float32, got {self.dtype!r}")
        if self.precision not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(
                f"extract.precision must be auto|float32|float16|bfloat16, got {self.precision!r}"
            )


class ShardSetMismatch(ValueError):
    """An existing shard set was made differently from what this run asks for."""
