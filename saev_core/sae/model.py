"""The `SAE` module: parameters, normalisation, encode / decode, the loss terms of `forward`,
dead-latent tracking and the unit-norm decoder; the JumpReLU straight-through estimators. The
sparse-path losses live in `losses` and the checkpoint files in `checkpoint` (the methods
delegate there)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from saev_core import sparse_code
from saev_core.sae import checkpoint, losses
from saev_core.sae.config import K_SPARSE, SAEConfig, SAEOutput
from saev_core.sae.losses import _aux_error


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """`h * H(h - theta)`; d/dh = H(h - theta), d/dtheta = -(theta/eps) K((h - theta)/eps).

    Rajamanoharan et al. 2024 ("Jumping Ahead"), eq. 11 with the rectangle kernel K.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return h * (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        h, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_h = (h > theta).to(grad.dtype) * grad
        grad_theta = -(theta / eps) * _rectangle((h - theta) / eps) * grad
        return grad_h, grad_theta.reshape(-1, theta.shape[-1]).sum(dim=0), None


class _Step(torch.autograd.Function):
    """`H(h - theta)`; d/dh = 0, d/dtheta = -(1/eps) K((h - theta)/eps) (Rajamanoharan et al. 2024, eq. 12)."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        h, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_theta = -(1.0 / eps) * _rectangle((h - theta) / eps) * grad
        return None, grad_theta.reshape(-1, theta.shape[-1]).sum(dim=0), None


class SAE(nn.Module):
    """Sparse autoencoder `f = act((norm(x) - b_dec) W_enc + b_enc)`, `x_hat = unnorm(f W_dec + b_dec)`."""

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.extra: dict[str, Any] = {}
        d_model, d_sae = cfg.d_model, cfg.d_sae
        # Gao et al. 2024, A.1: decoder rows random unit vectors, encoder its transpose (scaled).
        W_dec = torch.randn(d_sae, d_model, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W_dec.T * cfg.encoder_scale())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(W_dec)
        # b_dec = 0 is the mean of the inputs once they are mean-centred; the trainer moves it to
        # the geometric median of a sample (Bricken et al. 2023).
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        if cfg.arch == "jumprelu":
            # theta = exp(log_threshold) stays positive (Rajamanoharan et al. 2024, section 4).
            init = math.log(cfg.jumprelu_init_threshold)
            self.log_threshold = nn.Parameter(torch.full((d_sae,), init))
        if cfg.arch in ("batchtopk", "matryoshka"):
            # Inference threshold; 0 = not yet estimated (then inference is plain ReLU).
            self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("norm_mean", torch.zeros(d_model))
        self.register_buffer("norm_scale", torch.tensor(1.0))
        # Tokens seen since each latent last fired; AuxK treats >= dead_after_tokens as dead.
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.int64))
        self.sparse_kernels = True
        "Train the k-sparse archs with `sparse_code`'s kernels; False runs the dense reference."

    # -- normalisation -------------------------------------------------------------------------

    @torch.no_grad()
    def set_normalisation(self, mean_d: Tensor, scale: float | Tensor) -> None:
        """Store the input normalisation `x_n = (x - mean_d) * scale` (see `fit_normalisation`)."""
        mean_d = torch.as_tensor(mean_d, dtype=torch.float32)
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if mean_d.shape != (self.cfg.d_model,):
            raise ValueError(
                f"norm mean must have shape ({self.cfg.d_model},), got {tuple(mean_d.shape)}"
            )
        if scale.numel() != 1 or not torch.isfinite(scale) or scale <= 0:
            raise ValueError(f"norm scale must be one finite positive number, got {scale}")
        if not torch.isfinite(mean_d).all():
            raise ValueError("norm mean contains non-finite values")
        self.norm_mean.copy_(mean_d)
        self.norm_scale.copy_(scale.reshape(()))

    def normalise(self, x_bd: Tensor) -> Tensor:
        return (x_bd - self.norm_mean) * self.norm_scale

    def unnormalise(self, x_bd: Tensor) -> Tensor:
        return x_bd / self.norm_scale + self.norm_mean

    # -- encode / decode -----------------------------------------------------------------------

    def pre_acts(self, x_n_bd: Tensor) -> Tensor:
        """Pre-activations `h = (x_n - b_dec) W_enc + b_enc` of already normalised inputs."""
        return self._pre_acts_centred(x_n_bd - self.b_dec)

    def _pre_acts_centred(self, x_c_bd: Tensor) -> Tensor:
        """`x_c W_enc + b_enc`; under autocast the bf16 matmul's output meets the fp32 bias, so h is fp32."""
        if x_c_bd.dim() == 2 and not torch.is_autocast_enabled(x_c_bd.device.type):
            return torch.addmm(self.b_enc, x_c_bd, self.W_enc)  # the bias in the same pass
        return x_c_bd @ self.W_enc + self.b_enc

    def jump_threshold(self) -> Tensor:
        """The inference threshold: per latent [d_sae] ('jumprelu') or one scalar (BatchTopK kinds)."""
        if self.cfg.arch == "jumprelu":
            return self.log_threshold.exp()
        return self.threshold

    def activate(self, h_bs: Tensor) -> Tensor:
        """The inference activation: per token, independent of the rest of the batch."""
        arch = self.cfg.arch
        if arch == "topk":
            # The top k of h, then ReLU on those k: the same codes as top k of relu(h), with no
            # full-width ReLU pass, and scattered in place into a fresh zero tensor.
            vals, idx = h_bs.topk(self.cfg.k, dim=-1, sorted=False)
            vals = torch.relu(vals) if self.cfg.topk_relu else vals
            return torch.zeros_like(h_bs).scatter_(-1, idx, vals)
        f_bs = torch.relu(h_bs)
        if arch != "relu":
            # JumpReLU at the learned threshold (BatchTopK: Bussmann et al. 2024, section 3).
            f_bs = f_bs * (h_bs > self.jump_threshold()).to(f_bs.dtype)
        return f_bs

    def train_activate(self, h_bs: Tensor) -> Tensor:
        """The training activation: batch-level top-k for BatchTopK kinds, JumpReLU with its STE."""
        arch = self.cfg.arch
        if arch == "jumprelu":
            return _JumpReLU.apply(h_bs, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth)
        if arch in ("batchtopk", "matryoshka"):
            f_flat = torch.relu(h_bs).flatten()
            n_keep = min(self.cfg.k * h_bs.shape[0], f_flat.numel())
            vals, idx = f_flat.topk(n_keep, sorted=False)
            return torch.zeros_like(f_flat).scatter(-1, idx, vals).reshape(h_bs.shape)
        return self.activate(h_bs)

    def encode(self, x_bd: Tensor) -> Tensor:
        """Latents `f_bs` of raw (input-space) activations `x_bd`."""
        return self.activate(self.pre_acts(self.normalise(x_bd)))

    def encode_sparse(self, x_bd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The positive codes of `encode(x)` as (rows, cols, vals), row-major like `nonzero`.

        A TopK code comes straight from its k entries per token, never as a dense [batch, d_sae]
        tensor to scan for non-zeros (the stats stage reads codes this way).
        """
        if x_bd.dim() != 2:
            raise ValueError(f"encode_sparse takes [batch, d_model], got {tuple(x_bd.shape)}")
        if self.cfg.arch != "topk":
            f_bs = self.encode(x_bd)
            rows, cols = torch.nonzero(f_bs > 0, as_tuple=True)
            return rows, cols, f_bs[rows, cols]
        code, vals = self._topk_code(x_bd)
        pos = vals > 0
        rows, cols, vals = code.rows[pos], code.cols[pos], vals[pos]
        order = torch.argsort(rows * self.cfg.d_sae + cols)
        return rows[order], cols[order], vals[order]

    def _topk_code(self, x_bd: Tensor) -> tuple[sparse_code.Code, Tensor]:
        """TopK's inference code of [batch, d_model] inputs as a sparse Code and its values
        (ReLU'd unless `topk_relu` is False)."""
        h = self.pre_acts(self.normalise(x_bd))
        code = sparse_code.top_k(h, self.cfg.k)
        vals = h[code.rows, code.cols]
        return code, torch.relu(vals) if self.cfg.topk_relu else vals

    def decode(self, f_bs: Tensor) -> Tensor:
        """Reconstruction in the input space: `unnorm(f W_dec + b_dec)`."""
        return self.unnormalise(f_bs @ self.W_dec + self.b_dec)

    def reconstruct(self, x_bd: Tensor) -> Tensor:
        """`decode(encode(x))`; a TopK code is decoded from its k rows of `W_dec`, not densely."""
        if self.cfg.arch != "topk":
            return self.decode(self.encode(x_bd))
        code, vals = self._topk_code(x_bd.reshape(-1, x_bd.shape[-1]))
        x_hat = self.unnormalise(sparse_code.decode(code, vals, self.W_dec) + self.b_dec)
        return x_hat.reshape(x_bd.shape)

    # -- loss ----------------------------------------------------------------------------------

    def forward(
        self,
        x_bd: Tensor,
        dead_mask: Tensor | None = None,
        sparsity_coeff: float | None = None,
        dense_f: bool = True,
    ) -> SAEOutput:
        """Encode, decode and compute the loss terms.

        In training mode the training activation is used (and BatchTopK's threshold estimate is
        updated); in eval mode the inference one. `dead_mask` [d_sae] marks latents for AuxK; by
        default those whose `tokens_since_fired` reached `cfg.dead_after_tokens`.
        `sparsity_coeff` overrides `cfg.l1_coeff` / `cfg.l0_coeff` (the sparsity warm-up).
        k-sparse archs train through `sparse_code` (same values and gradients, far fewer FLOPs);
        there `f` is detached, and `dense_f=False` skips building it (`f` is then None; the
        trainer needs only `l0` and `fired`).
        """
        sparse = self.sparse_kernels and self.cfg.arch in K_SPARSE and x_bd.dim() == 2
        if self.training and sparse:
            return self._forward_sparse(x_bd, dead_mask, dense_f)
        cfg = self.cfg
        x_n = self.normalise(x_bd)
        h = self.pre_acts(x_n)
        f = self.train_activate(h) if self.training else self.activate(h)
        x_hat_n = f @ self.W_dec + self.b_dec
        mse = (x_hat_n - x_n).pow(2).mean()
        l1 = f.sum(dim=-1).mean()
        zero = x_n.new_zeros(())
        recon, sparsity, aux, coeff = mse, zero, zero, 0.0
        if cfg.arch == "relu":
            coeff = cfg.l1_coeff if sparsity_coeff is None else sparsity_coeff
            if cfg.decoder_norm == "free":
                sparsity = (f * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
            else:
                sparsity = l1
        elif cfg.arch == "jumprelu":
            coeff = cfg.l0_coeff if sparsity_coeff is None else sparsity_coeff
            theta = self.log_threshold.exp()
            sparsity = _Step.apply(h, theta, cfg.jumprelu_bandwidth).sum(dim=-1).mean()
        else:
            if cfg.arch == "matryoshka":
                recon = self._matryoshka_recon(
                    x_n, lambda start, end: f[:, start:end] @ self.W_dec[start:end]
                )
            if cfg.aux_alpha > 0:
                if dead_mask is None:
                    dead_mask = self.dead_mask()
                aux = self.aux_loss(h, x_n - x_hat_n, dead_mask)
            if self.training and cfg.arch in ("batchtopk", "matryoshka"):
                self._update_threshold(f[f > 0])
        loss = recon + coeff * sparsity + cfg.aux_alpha * aux
        with torch.no_grad():
            active = f > 0
            l0 = active.sum(dim=-1).float().mean()
            fired = active.reshape(-1, active.shape[-1]).any(dim=0)
        return SAEOutput(
            self.unnormalise(x_hat_n), f, loss, mse, l1, aux, sparsity, recon, l0, fired
        )

    def _forward_sparse(self, x_bd: Tensor, dead_mask: Tensor | None, dense_f: bool) -> SAEOutput:
        """`forward` in training mode for the k-sparse archs, through `sparse_code`."""
        return losses.forward_sparse(self, x_bd, dead_mask, dense_f)

    def _aux_loss_sparse(
        self, h_bs: Tensor, x_c_bd: Tensor, e_bd: Tensor, dead_mask: Tensor
    ) -> Tensor:
        """`aux_loss` on the sparse kernels: the top `aux_k` dead latents per token."""
        return losses.aux_loss_sparse(self, h_bs, x_c_bd, e_bd, dead_mask)

    def _aux_loss_dead_dense(self, x_c_bd: Tensor, e_bd: Tensor, dead_idx: Tensor) -> Tensor:
        """AuxK over the dead columns only, recomputed densely with autograd."""
        return losses.aux_loss_dead_dense(self, x_c_bd, e_bd, dead_idx)

    def _matryoshka_recon(
        self, x_n_bd: Tensor, decode_block: Callable[[int, int], Tensor]
    ) -> Tensor:
        """Sum over nested prefixes m of mse(f[:, :m] W_dec[:m] + b_dec, x_n) (Bussmann et al. 2025)."""
        return losses.matryoshka_recon(self, x_n_bd, decode_block)

    @torch.no_grad()
    def _update_threshold(self, pos: Tensor) -> None:
        """Running average of the smallest activation BatchTopK kept (Bussmann et al. 2024, section 3).

        `pos` holds the batch's positive kept activations (any shape).
        """
        if pos.numel() == 0:
            return
        smallest = pos.min().float()
        if self.threshold <= 0:  # first estimate: take it as is, not averaged with 0
            self.threshold.copy_(smallest)
        else:
            m = self.cfg.threshold_momentum
            self.threshold.mul_(1 - m).add_(m * smallest)

    def aux_loss(self, h_bs: Tensor, e_bd: Tensor, dead_mask: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024, A.2): reconstruct the residual `e` from the top `aux_k` dead latents.

        `e` is detached so only the dead latents learn from this term; `e_hat` uses no bias, and
        the squared error is divided by the residual's total variance about its batch mean.
        """
        dead_idx = self._dead_indices(dead_mask)
        if dead_idx.numel() == 0:
            return h_bs.new_zeros(())
        # Work on the dead columns only: usually few, and then no top-k is needed at all.
        z = torch.relu(h_bs[:, dead_idx])
        if dead_idx.numel() > self.cfg.aux_k:
            vals, idx = z.topk(self.cfg.aux_k, dim=-1, sorted=False)
            z = torch.zeros_like(z).scatter(-1, idx, vals)
        return _aux_error(e_bd.detach(), z @ self.W_dec[dead_idx])

    def _dead_indices(self, dead_mask: Tensor) -> Tensor:
        """The latent indices `dead_mask` [d_sae] marks, refusing a mask of another shape."""
        if dead_mask.shape != (self.cfg.d_sae,):
            raise ValueError(
                f"dead_mask must have shape ({self.cfg.d_sae},), got {tuple(dead_mask.shape)}"
            )
        return dead_mask.nonzero().squeeze(1)

    # -- dead latents --------------------------------------------------------------------------

    def dead_mask(self) -> Tensor:
        """Latents that have not fired for `cfg.dead_after_tokens` tokens."""
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    @torch.no_grad()
    def update_firing(self, f_bs: Tensor) -> None:
        """Advance `tokens_since_fired` by the batch size, resetting latents that fired in `f_bs`."""
        self.record_firing((f_bs > 0).any(dim=0), f_bs.shape[0])

    @torch.no_grad()
    def record_firing(self, fired: Tensor, n_tokens: int) -> None:
        """`update_firing` from `SAEOutput.fired` [d_sae] and the batch's token count."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired, 0)

    # -- unit-norm decoder ---------------------------------------------------------------------

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the part of each `W_dec` row's gradient parallel to the row (call before the step)."""
        if self.W_dec.grad is None or self.cfg.decoder_norm != "unit":
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g = self.W_dec.grad
        g -= (g * w).sum(dim=1, keepdim=True) * w

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale every `W_dec` row to unit L2 norm (call after the step); no-op for a free decoder."""
        if self.cfg.decoder_norm == "unit":
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write `sae.safetensors` and `cfg.json` into `out_dir` atomically; returns `out_dir`.
        `extra` (JSON-able; e.g. shard manifest hash, layer, backbone) replaces `sae.extra`."""
        return checkpoint.save(self, out_dir, extra)

    def load_tensors(self, tensors: dict[str, Tensor], where: str) -> None:
        """Load a state dict, refusing missing, unexpected or mis-shaped tensors with a clear error."""
        checkpoint.load_tensors(self, tensors, where)

    @classmethod
    def load(cls, sae_dir: str | Path, device: str | torch.device = "cpu") -> SAE:
        """Read a directory written by `save` (in eval mode), refusing shapes that disagree with cfg.json."""
        return checkpoint.load(cls, sae_dir, device)
