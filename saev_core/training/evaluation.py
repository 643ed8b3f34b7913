"""Held-out evaluation of a trained SAE (`evaluate`: L0, FVU, dead and dense features) and the
dense-feature rules (`dense_fractions`, relative and absolute).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saev_core.sae.model import SAE
from saev_core.training.schedule import _checked

DENSE_FACTOR = 10.0
"""A feature is dense when it fires this many times more often than the mean feature."""


def dense_fractions(
    freq: np.ndarray, dense_threshold: float = 0.01, dense_factor: float = DENSE_FACTOR
) -> dict[str, float]:
    """The share of dense features, relative (`dense_frac`) and absolute (`dense_frac_abs`).

    Absolute: fires on more than `dense_threshold` of tokens (the paper's 1%). That rule says
    little about a TopK SAE whose mean firing rate k / d_sae is itself near or above 1% (16 of
    1,024 is 1.6%: then a third of the features are "dense" by arithmetic alone). Relative: fires
    on more than `dense_factor` x the mean firing rate, mean(freq) = L0 / d_sae (k / d_sae for
    TopK). A feature 10x above the mean takes the share of ten average features, one decade up on
    the log-density histogram: it is dense whatever k and d_sae, so runs of different width and
    sparsity compare. Also returns `dense_threshold_rel`, the relative rule's threshold.
    """
    freq = np.asarray(freq, dtype=np.float64)
    if not 0 <= dense_threshold <= 1:
        raise ValueError(f"dense_threshold must be in [0, 1], got {dense_threshold}")
    if not dense_factor > 0:
        raise ValueError(f"dense_factor must be > 0, got {dense_factor}")
    rate = dense_factor * float(freq.mean()) if len(freq) else 0.0
    return {
        "dense_frac": float(np.mean(freq > rate)) if len(freq) else 0.0,
        "dense_frac_abs": float(np.mean(freq > dense_threshold)) if len(freq) else 0.0,
        "dense_threshold_rel": rate,
    }


@torch.no_grad()
def evaluate(
    sae: SAE,
    batches: Iterable[Tensor],
    dense_threshold: float = 0.01,
    progress: bool = False,
    dense_factor: float = DENSE_FACTOR,
) -> dict[str, Any]:
    """Stream `batches` once through `sae` and measure it in the input space.

    Returns floats `l0` (mean active features per token), `fvu` (sum ||x - x_hat||^2 /
    sum ||x - mean(x)||^2, mean over all tokens), `mse` (per element), `dead_frac` (never fires
    here), `dense_frac` (fires on more than `dense_factor` x the mean firing rate L0 / d_sae),
    `dense_frac_abs` (fires on more than `dense_threshold` of tokens) and `dense_threshold_rel` (the
    relative threshold; see `dense_fractions`), the int `n_tokens`, and numpy arrays `freq`
    [d_sae] (fraction of tokens each feature fires on) and `mean_act` [d_sae] (mean activation
    when firing; 0 for features that never fire).
    """
    if not 0 <= dense_threshold <= 1:
        raise ValueError(f"dense_threshold must be in [0, 1], got {dense_threshold}")
    if not dense_factor > 0:
        raise ValueError(f"dense_factor must be > 0, got {dense_factor}")
    device = sae.W_enc.device
    d_model, d_sae = sae.cfg.d_model, sae.cfg.d_sae
    n = 0
    n_active = 0
    err_sum = 0.0
    shift = None  # total variance about a shift near the mean avoids cancellation in float64
    sum_d = torch.zeros(d_model, dtype=torch.float64, device=device)
    sq_sum = 0.0
    fire_s = torch.zeros(d_sae, dtype=torch.float64, device=device)
    act_s = torch.zeros(d_sae, dtype=torch.float64, device=device)
    for x_bd in tqdm(batches, desc="evaluate SAE", disable=not progress, unit="batch"):
        x_bd = _checked(x_bd, d_model, device)
        f_bs = sae.encode(x_bd)
        x_hat = sae.decode(f_bs)
        x64 = x_bd.double()
        if shift is None:
            shift = x64.mean(dim=0)
        centred = x64 - shift
        sum_d += centred.sum(dim=0)
        sq_sum += centred.pow(2).sum().item()
        err_sum += (x64 - x_hat.double()).pow(2).sum().item()
        active = f_bs > 0
        n_active += int(active.sum())
        fire_s += active.sum(dim=0).double()
        act_s += f_bs.sum(dim=0).double()
        n += x_bd.shape[0]
    if n == 0:
        raise ValueError("evaluate got no tokens")
    total_var = sq_sum - (sum_d.pow(2).sum().item() / n)
    freq = (fire_s / n).cpu().numpy()
    mean_act = (act_s / fire_s.clamp_min(1)).cpu().numpy()
    return {
        "l0": n_active / n,
        "fvu": err_sum / total_var if total_var > 0 else float("nan"),
        "mse": err_sum / (n * d_model),
        "dead_frac": float(np.mean(freq == 0)),
        **dense_fractions(freq, dense_threshold, dense_factor),
        "n_tokens": n,
        "freq": freq,
        "mean_act": mean_act,
    }
