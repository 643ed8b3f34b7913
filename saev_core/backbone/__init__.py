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

- `model`: `Backbone`, `noop`, `pick_device`, `DTYPES`, `resolve_dtype`, `weights_sha256`.
- `hooks`: `TOKEN_POLICIES`, `token_indices`, `describe_tokens`, `resolve_layer`, `find_blocks`,
  `classifier_blocks`, `block_output`, `record_blocks`, `preprocess`.
- `load`: `CLS_PARAMETER_NAMES`, `load_backbone`, `keep_patch_order`, `load_classifier`.
"""

# ruff: noqa: F401  (re-exports: the public names of saev_core.backbone)
from .hooks import (
    classifier_blocks,
    find_blocks,
    preprocess,
    record_blocks,
    resolve_layer,
    token_indices,
)
from .load import CLS_PARAMETER_NAMES, keep_patch_order, load_backbone, load_classifier
from .model import Backbone, noop, pick_device, resolve_dtype, weights_sha256
