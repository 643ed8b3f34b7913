"""Splice SAEs into a backbone's forward pass and edit their features there.

- `layout`: where the tokens of a block output are and which an edit touches (`TokenLayout`,
  `measure_layout`, `patches_in_bbox`, `patches_in_mask`, `scope_tokens`, `SCOPES`).
- `splicing`: edits (`FeatureEdit`, `suppress`, `EDIT_OPS`), the splice itself (`Splice`,
  `splice`, `stacked_splice`, `feature_values`), random directions and bootstrap intervals.

The stage's params section (`InterveneConfig`) lives in `saev_core.hypotheses`.
"""

# ruff: noqa: F401  (re-exports: the public names of saev_core.intervene)

from .layout import (
    SCOPES,
    TokenLayout,
    measure_layout,
    patches_in_bbox,
    patches_in_mask,
    scope_tokens,
)
from .splicing import (
    EDIT_OPS,
    FeatureEdit,
    Splice,
    bootstrap_ci,
    bootstrap_ratio_ci,
    feature_values,
    random_direction,
    splice,
    stacked_splice,
    suppress,
)
