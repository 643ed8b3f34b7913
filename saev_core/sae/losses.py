"""The SAE's sparse-path training losses, as functions of the `SAE` (its methods delegate here):
`forward_sparse` (training-mode `forward` of the k-sparse archs through `sparse_code`), AuxK on
the sparse kernels or densely over the dead columns, and the Matryoshka nested-prefix loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from saev_core import sparse_code
from saev_core.sae.config import DENSE_AUX_FACTOR, SAEOutput


def _aux_error(e_bd: Tensor, e_hat_bd: Tensor) -> Tensor:
    """AuxK's `||e - e_hat||^2 / ||e - mean(e)||^2`; 0 for a residual with no variance (one token,
    or perfect reconstruction)."""
    num = (e_bd - e_hat_bd).pow(2).sum()
    denom = (e_bd - e_bd.mean(dim=0)).pow(2).sum()
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, num / safe, torch.zeros_like(num))


def forward_sparse(sae: Any, x_bd: Tensor, dead_mask: Tensor | None, dense_f: bool) -> SAEOutput:
    """`forward` in training mode for the k-sparse archs, through `sparse_code`."""
    cfg, sc = sae.cfg, sparse_code
    x_n = sae.normalise(x_bd)
    with torch.no_grad():  # the one dense matmul; gradients reach it through gather_pre_acts
        x_c = x_n - sae.b_dec
        h = sae._pre_acts_centred(x_c)
    n_rows = x_bd.shape[0]
    if cfg.arch == "topk":
        code = sc.top_k(h, cfg.k)
    else:
        code = sc.batch_top_k(h, cfg.k * n_rows)
    vals = sc.gather_pre_acts(h, code, x_c, sae.W_enc, sae.b_enc, sae.b_dec)
    vals = torch.relu(vals) if cfg.topk_relu else vals  # False only for arch 'topk'
    x_hat_n = sc.decode(code, vals, sae.W_dec) + sae.b_dec
    mse = (x_hat_n - x_n).pow(2).mean()
    l1 = vals.sum() / n_rows
    recon = mse
    if cfg.arch == "matryoshka":
        recon = sae._matryoshka_recon(
            x_n,
            lambda start, end: sparse_code.decode(
                code, vals * ((code.cols >= start) & (code.cols < end)), sae.W_dec
            ),
        )
    aux = x_n.new_zeros(())
    if cfg.aux_alpha > 0:
        if dead_mask is None:
            dead_mask = sae.dead_mask()
        aux = sae._aux_loss_sparse(h, x_c, x_n - x_hat_n, dead_mask)
    if cfg.arch in ("batchtopk", "matryoshka"):
        sae._update_threshold(vals[vals > 0].detach())
    loss = recon + cfg.aux_alpha * aux
    with torch.no_grad():
        l0 = (vals > 0).sum().float() / n_rows
        fired = sc.fired(code, vals)
    f = sc.to_dense(code, vals) if dense_f else None
    zero = x_n.new_zeros(())
    return SAEOutput(sae.unnormalise(x_hat_n), f, loss, mse, l1, aux, zero, recon, l0, fired)


def aux_loss_sparse(
    sae: Any, h_bs: Tensor, x_c_bd: Tensor, e_bd: Tensor, dead_mask: Tensor
) -> Tensor:
    """`aux_loss` on the sparse kernels: the top `aux_k` dead latents per token.

    With few dead latents (at most `DENSE_AUX_FACTOR` x `aux_k`, the usual case) the dead
    columns are recomputed densely with autograd instead: a [batch, n_dead] matmul is 2-10x
    cheaper than sorting batch x aux_k sparse entries (bench/train.py); same loss and
    gradients up to float summation order (tests/test_sae.py).
    """
    dead_idx = sae._dead_indices(dead_mask)
    if dead_idx.numel() == 0:
        return h_bs.new_zeros(())
    if dead_idx.numel() <= DENSE_AUX_FACTOR * sae.cfg.aux_k:
        return sae._aux_loss_dead_dense(x_c_bd, e_bd, dead_idx)
    h_dead = h_bs[:, dead_idx]
    m = min(sae.cfg.aux_k, dead_idx.numel())
    _, local = h_dead.topk(m, dim=-1, sorted=False)
    code = sparse_code.per_row(local, dead_idx, sae.cfg.d_sae)
    z = torch.relu(sparse_code.gather_pre_acts(h_bs, code, x_c_bd, sae.W_enc, sae.b_enc, sae.b_dec))
    return _aux_error(e_bd.detach(), sparse_code.decode(code, z, sae.W_dec))


def aux_loss_dead_dense(sae: Any, x_c_bd: Tensor, e_bd: Tensor, dead_idx: Tensor) -> Tensor:
    """AuxK over the dead columns only, `relu((x_n - b_dec) W_enc[:, dead] + b_enc[dead])`,
    recomputed with autograd (`x_c_bd` is detached), the top `aux_k` kept per token."""
    # x_c + b_dec - b_dec: the value of x_c, with the gradient b_dec gets through it
    x_c = x_c_bd - (sae.b_dec - sae.b_dec.detach())
    h = torch.addmm(sae.b_enc[dead_idx], x_c, sae.W_enc[:, dead_idx])
    z = torch.relu(h)
    if dead_idx.numel() > sae.cfg.aux_k:
        with torch.no_grad():
            _, local = h.topk(sae.cfg.aux_k, dim=-1, sorted=False)
            keep = torch.zeros_like(h).scatter_(-1, local, 1.0)
        z = z * keep
    return _aux_error(e_bd.detach(), z @ sae.W_dec[dead_idx])


def matryoshka_recon(
    sae: Any, x_n_bd: Tensor, decode_block: Callable[[int, int], Tensor]
) -> Tensor:
    """Sum over nested prefixes m of mse(f[:, :m] W_dec[:m] + b_dec, x_n) (Bussmann et al. 2025).

    The paper's loss sums the prefixes' errors (not their mean), so the full dictionary's error
    counts once at full weight and `aux_alpha` keeps the meaning it has for the other archs.
    `decode_block(start, end)` is `f[:, start:end] W_dec[start:end]`, densely or sparsely.
    """
    x_hat = sae.b_dec.expand_as(x_n_bd)
    total = x_n_bd.new_zeros(())
    start = 0
    prefixes = sae.cfg.prefixes()
    for end in prefixes:
        # Cumulative: each block adds its latents' contribution to the previous prefix.
        x_hat = x_hat + decode_block(start, end)
        total = total + (x_hat - x_n_bd).pow(2).mean()
        start = end
    return total
