"""The demo ViT and its training objectives (the `backbone` stage).

- `config`: `BackboneConfig`, `TIMING_KEYS`, `tracked_metrics`.
- `data`: the shapes world as tensors, augmentation, `auroc`, `patch_class_fractions`.
- `init`: `build_classifier`, `build_processor` and the starting weights
  (`local_attention_init`, `pca_patch_embedding_init`, `sincos_position_embeddings`, `NEIGHBOURS`).
- `supervised`: `train_supervised`, the "supervised" objective.
- `clip`: the "clip" objective's model, tokenizer, loss and eval.
- `objectives`: the "mae" objective's model and the training loop for "clip" and "mae".
- `train`: `train_backbone`, which dispatches on `cfg.objective`.
"""

# ruff: noqa: F401  (re-exports: the public names of saev_core.demo_vit)
from .config import TIMING_KEYS, BackboneConfig, tracked_metrics
from .data import auroc, patch_class_fractions
from .init import (
    NEIGHBOURS,
    build_classifier,
    build_processor,
    local_attention_init,
    pca_patch_embedding_init,
    sincos_position_embeddings,
)
from .train import train_backbone
