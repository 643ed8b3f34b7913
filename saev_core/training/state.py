"""The running state of one SAE in a sweep: `_Member` (config, SAE, optimizer, log) and
`_Running` (token-weighted metric means). Both the loop and the checkpoints use them, so they sit
apart from either.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saev_core.sae.model import SAE
from saev_core.training.config import LogFn, TrainConfig


class _Member:
    """One SAE of a sweep with its optimizer and running metrics."""

    def __init__(self, cfg: TrainConfig, sae: SAE, log: LogFn):
        self.cfg, self.sae, self.log = cfg, sae, log
        self.opt: torch.optim.Adam  # made once the SAE is on its device
        self.running = _Running()
        self.logged = -1
        self.metrics: dict[str, Tensor] = {}


class _Running:
    """Token-weighted means of per-batch metrics (state kept as floats across a resume)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor | float] = {}
        self.n = 0

    def add(self, metrics: dict[str, Tensor], n: int) -> None:
        # Kept as tensors: no device sync per step.
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * n
        self.n += n

    def means(self) -> dict[str, float]:
        return {k: float(v) / self.n for k, v in self.sums.items()} if self.n else {}

    def state(self) -> dict[str, Any]:
        return {"n": self.n, "sums": {k: float(v) for k, v in self.sums.items()}}

    def load(self, state: dict[str, Any]) -> None:
        self.n = int(state["n"])
        self.sums = {k: float(v) for k, v in state["sums"].items()}
