"""`BackboneConfig` (the `backbone` section of params.yaml) and what is kept of the metrics.

`TIMING_KEYS` and `tracked_metrics` live here because both savers (`supervised._save`,
`objectives._save`) use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from saev_core.backbone.hooks import resolve_layer


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
    `saev_core.demo_vit.objectives`. The aux_* options apply to "supervised" only."""
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
