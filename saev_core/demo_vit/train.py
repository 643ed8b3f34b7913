"""`train_backbone`: the `backbone` stage's entry point, which dispatches on `cfg.objective`.

"supervised" goes to `saev_core.demo_vit.supervised.train_supervised`, "clip" and "mae" to
`saev_core.demo_vit.objectives.train_objective`. Both are imported lazily, so importing the
package costs no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from saev_core.backbone.model import noop

if TYPE_CHECKING:
    from saev_core.demo_vit.config import BackboneConfig


def train_backbone(
    cfg: BackboneConfig,
    log: Callable[[dict[str, float], int], None] = noop,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the demo ViT on the world in `cfg.data_dir`, save it to `cfg.out_dir`, return metrics.

    `cfg.objective` "supervised" trains the classifier (`supervised.train_supervised`), "clip" or
    "mae" the other objectives (`objectives.train_objective`).
    """
    if cfg.objective != "supervised":
        from saev_core.demo_vit.objectives import train_objective

        return train_objective(cfg, log, progress)
    from saev_core.demo_vit.supervised import train_supervised

    return train_supervised(cfg, log, progress)
