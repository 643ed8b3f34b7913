"""Sparse training kernels for the k-sparse SAEs (TopK, BatchTopK, Matryoshka).

A k-sparse SAE keeps k of `d_sae` latents per token, yet a dense training step pays for all of
them: the decoder multiplies a mostly-zero `f` [batch, d_sae] by `W_dec`, and autograd sends a
mostly-zero gradient back through the encoder matmul, so a step costs about 12 B d S FLOPs where
only the encoder's forward matmul (2 B d S) needs every latent. Here the selected latents are a
`Code` (coordinates of the kept entries, row by row) and everything after the selection touches
only those entries (Gao et al. 2024, section 5.3 and their `kernels.py`, sketched on
`embedding_bag` rather than Triton):

- `gather_pre_acts` reads the kept pre-activations out of a `h` computed without autograd; its
  backward adds each entry's gradient into `W_enc`'s column, `b_enc` and `b_dec`, O(nnz x d).
- `decode` is `embedding_bag(cols, W_dec, per_sample_weights=vals)`: the sum of the kept decoder
  rows, whose backward is also O(nnz x d).

Same values and gradients as the dense path up to float summation order in fp32;
`tests/test_sae.py` checks them against it for every k-sparse arch. Under bf16 autocast the
decoder here runs in fp32 (the dense path multiplies in bf16), so x_hat differs by bf16 rounding.
On CUDA, `index_add_` adds `b_enc`'s gradient with atomics: not bit-reproducible run to run.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Code(NamedTuple):
    """Which latents are kept: entry i is (rows[i], cols[i]); rows ascending, `offsets` per row."""

    rows: Tensor
    "[nnz] int64 token index of each kept entry, non-decreasing."
    cols: Tensor
    "[nnz] int64 latent index of each kept entry."
    offsets: Tensor
    "[batch] int64 start of each token's entries (`embedding_bag` offsets)."
    shape: tuple[int, int]
    "(batch, d_sae) of the dense activations this stands for."


def _offsets(rows: Tensor, n_rows: int) -> Tensor:
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cumsum(counts, 0) - counts


def per_row(idx_bm: Tensor, cols_of: Tensor | None, d_sae: int) -> Code:
    """A Code keeping `idx_bm[b, :]` in row b (indices into `cols_of` when given, else latents)."""
    n_rows, m = idx_bm.shape
    cols = idx_bm.reshape(-1) if cols_of is None else cols_of[idx_bm.reshape(-1)]
    rows = torch.arange(n_rows, device=idx_bm.device).repeat_interleave(m)
    offsets = torch.arange(0, n_rows * m, m, device=idx_bm.device) if m else _offsets(rows, n_rows)
    return Code(rows, cols, offsets, (n_rows, d_sae))


def top_k(h_bs: Tensor, k: int) -> Code:
    """The k largest pre-activations of each token (TopK)."""
    _, idx = h_bs.topk(k, dim=-1, sorted=False)
    return per_row(idx, None, h_bs.shape[1])


def batch_top_k(h_bs: Tensor, n_keep: int) -> Code:
    """The `n_keep` largest pre-activations of the whole batch (BatchTopK)."""
    n_rows, d_sae = h_bs.shape
    flat = h_bs.reshape(-1)
    n_keep = min(n_keep, flat.numel())
    kept = _top_by_threshold(flat, n_keep, d_sae)
    if kept is None:
        kept = flat.topk(n_keep, sorted=False).indices
    kept = kept.sort().values
    rows = torch.div(kept, d_sae, rounding_mode="floor")
    return Code(rows, kept - rows * d_sae, _offsets(rows, n_rows), (n_rows, d_sae))


def _top_by_threshold(flat: Tensor, n_keep: int, d_sae: int) -> Tensor | None:
    """Indices of the `n_keep` largest of `flat`, found among the values above a sampled cut.

    A top-k over a whole batch of pre-activations (67M values at batch 4096, d_sae 16k) costs
    more than the encoder matmul. A strided sample of about 1M values puts a cut a little below
    the n_keep-th largest; when at least `n_keep` values clear it, the top n_keep are among them,
    exactly. Otherwise (an unlucky sample) returns None and the caller takes the full top-k.
    """
    stride = max(1, flat.numel() // (1 << 20))
    while math.gcd(stride, d_sae) != 1:  # a stride sharing a factor with d_sae samples few latents
        stride += 1
    sample = flat[::stride]
    rank = int(1.5 * n_keep / stride) + 32
    if stride == 1 or rank >= sample.numel():
        return None
    cut = sample.topk(rank, sorted=False).values.min()
    candidates = (flat >= cut).nonzero().squeeze(1)
    if candidates.numel() < n_keep:
        return None
    return candidates[flat[candidates].topk(n_keep, sorted=False).indices]


class _GatherPreActs(torch.autograd.Function):
    """`h[rows, cols]` of `h = x_c W_enc + b_enc` (with `x_c = x_n - b_dec`), gradients O(nnz x d)."""

    @staticmethod
    def forward(ctx: Any, h, rows, cols, x_c, W_enc, b_enc, b_dec) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(rows, cols, x_c, W_enc)
        return h[rows, cols]

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # noqa: ANN205
        rows, cols, x_c, W_enc = ctx.saved_tensors
        g = grad.to(W_enc.dtype)
        d_model, d_sae = W_enc.shape
        grad_b_enc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        grad_W_t = None
        if ctx.needs_input_grad[4]:
            # Column s of W_enc collects g_i * x_c[row_i] over the entries i with cols[i] = s:
            # a [d_sae, batch] sparse matrix (CSR, entries sorted by latent) times x_c.
            order = torch.argsort(cols, stable=True)
            crow = torch.zeros(d_sae + 1, dtype=torch.int64, device=g.device)
            crow[1:] = torch.cumsum(torch.bincount(cols, minlength=d_sae), 0)
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                g_sb = torch.sparse_csr_tensor(
                    crow, rows[order], g[order], (d_sae, x_c.shape[0]), check_invariants=False
                )
                grad_W_t = g_sb @ x_c.to(g.dtype)
        # x_c = x_n - b_dec, so b_dec receives minus the sum over tokens of dL/dx_c.
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.needs_input_grad[6] else None
        # W_enc is stored as the transpose of a [d_sae, d_model] tensor (SAE.__init__ clones
        # W_dec.T), so this transposed view already has the parameter's layout: no copy.
        grad_W = grad_W_t.t() if grad_W_t is not None else None
        return None, None, None, None, grad_W, grad_b_enc, grad_b_dec


def gather_pre_acts(
    h_bs: Tensor, code: Code, x_c_bd: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor
) -> Tensor:
    """The kept pre-activations [nnz], differentiable in W_enc, b_enc and b_dec.

    `h_bs` must be `x_c_bd @ W_enc + b_enc` computed without autograd, `x_c_bd = x_n - b_dec`.
    """
    return _GatherPreActs.apply(h_bs, code.rows, code.cols, x_c_bd, W_enc, b_enc, b_dec)


def decode(code: Code, vals: Tensor, W_dec: Tensor) -> Tensor:
    """`sum_i vals_i W_dec[cols_i]` per token, [batch, d_model] (no bias)."""
    return F.embedding_bag(
        code.cols, W_dec, code.offsets, mode="sum", per_sample_weights=vals.to(W_dec.dtype)
    )


@torch.no_grad()
def to_dense(code: Code, vals: Tensor) -> Tensor:
    """The dense activations [batch, d_sae] (detached)."""
    f = torch.zeros(code.shape, dtype=vals.dtype, device=vals.device)
    f[code.rows, code.cols] = vals.detach()
    return f


@torch.no_grad()
def fired(code: Code, vals: Tensor) -> Tensor:
    """[d_sae] bool: the latents with a positive activation on some token."""
    out = torch.zeros(code.shape[1], dtype=torch.bool, device=vals.device)
    out[code.cols[vals > 0]] = True
    return out
