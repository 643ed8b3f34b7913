"""A sparse autoencoder over ViT activations, one `nn.Module` for every architecture researchers use.

Architectures (`SAEConfig.arch`), which differ only in the activation and the sparsity term:

- `relu`: ReLU + L1 (the paper). With `decoder_norm="unit"` the decoder rows are kept at unit norm
  and the gradient parallel to each row is removed (Bricken et al. 2023); with `"free"` the rows
  are unconstrained and the L1 term weights each latent by its decoder norm (Anthropic, "April
  2024 update": `sum_j f_j ||W_dec_j||`).
- `topk`: keep the k largest pre-activations per token (Gao et al. 2024).
- `batchtopk`: keep the `k x batch` largest over the whole batch while training (Bussmann et al.
  2024); inference is a JumpReLU at a threshold learned as a running average of the smallest
  kept activation, so a token's code does not depend on its batch.
- `jumprelu`: `f = h * H(h - theta)` with a learned per-latent threshold, trained with the
  straight-through estimator of Rajamanoharan et al. 2024 and an L0 penalty.
- `matryoshka`: BatchTopK whose loss sums the reconstruction error of nested prefixes of the
  dictionary (Bussmann et al. 2025), so early latents learn general features.

The k-sparse ones (`topk`, `batchtopk`, `matryoshka`) get the AuxK loss for dead latents (Gao et
al. 2024, A.2), dead meaning "no firing for `dead_after_tokens` tokens", and train through the
sparse kernels of `saev_core/sparse_code.py` (same loss and gradients, about 4x faster at k = 32
of 16k latents); `sparse_kernels = False` keeps the dense reference path below.

Shapes: `x_bd` is [batch, d_model], `f_bs` is [batch, d_sae]. The SAE owns its input
normalisation (paper: "inputs are mean-centred and scaled so the average norm is sqrt(d)"):
`encode` normalises and `decode` un-normalises, so `decode(encode(x))` compares with `x` directly
and a loaded checkpoint needs no hidden constants (the paper's code lost them; see PAPER.md).
All loss terms are computed in the normalised space. `encode` is always the inference path
(batch-independent); only `forward` in training mode uses the batch-coupled training activation.

A checkpoint is a directory with `sae.safetensors` (every parameter and buffer) and `cfg.json`
(the `SAEConfig`, the normalisation constants and any `extra` the caller records). No pickle.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from saev_core import sparse_code
from saev_core.config import from_dict, to_dict

WEIGHTS_NAME = "sae.safetensors"
CFG_NAME = "cfg.json"
FORMAT_VERSION = 1
ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
K_SPARSE = ("topk", "batchtopk", "matryoshka")
DENSE_AUX_FACTOR = 4
"""The sparse path computes AuxK densely over the dead columns while at most this many x aux_k
latents are dead (dense is faster up to ~8x on CPU; bench/train.py)."""


@dataclass(frozen=True)
class SAEConfig:
    """Architecture and loss hyperparameters of one SAE."""

    arch: Literal["relu", "topk", "batchtopk", "jumprelu", "matryoshka"]
    "Activation and sparsity mechanism (see the module docstring)."
    d_model: int
    "Width of the input activations."
    d_sae: int
    "Number of latents (features)."
    k: int = 32
    "Active latents per token for the k-sparse archs (paper's later versions: 32); else unused."
    topk_relu: bool = True
    """'topk': ReLU on the k kept values (Gao et al. 2024, SAELens). False keeps them signed,
    `mask * h` (saev's TopK), so a kept negative pre-activation stays in the code and the decode."""
    l1_coeff: float = 0.05
    "L1 coefficient lambda for 'relu', against the per-element MSE below; else unused."
    l0_coeff: float = 1e-3
    """L0 coefficient for 'jumprelu', against the per-element MSE; else unused. L0 falls as it
    rises: on the demo shards (params.yaml's train section, all tokens, d_sae 1,024, 762 steps of
    1,024 tokens, lr 2e-3, the default threshold and bandwidth) val L0 is 17.8 at 1e-4, 16.7 at
    1e-3 (FVU 0.115; TopK k = 16: 0.081), 15.3 at 2e-3, 14.1 at 3e-3, 9.0 at 1e-2, 6.2 at 3e-2
    and 5.3 at 0.1. In so short a run Adam moves log theta by at most about lr a step, so theta
    ends within about e^1 of `jumprelu_init_threshold`, which sets the rough L0; this
    coefficient refines it (longer runs give it more reach)."""
    aux_k: int = 512
    "Dead latents used by the AuxK loss (Gao et al. 2024, A.2: 512)."
    aux_alpha: float = 1 / 32
    "Weight of the AuxK loss (Gao et al. 2024, A.2: 1/32); 0 turns AuxK off."
    dead_after_tokens: int = 10_000_000
    "Tokens without firing after which a latent counts as dead for AuxK (Gao et al.: 10M)."
    encoder_init_scale: float | None = None
    """W_enc starts as this times W_dec's transpose (unit-norm rows), so the normalised inputs'
    pre-activations start with std about this value. None: 0.5 for the k-sparse archs, 1.0
    (Gao et al. 2024, A.1) for 'relu' and 'jumprelu' (whose threshold is set in these units).
    At 1.0 the k kept values (about 2 std each) over-shoot the input, more so as k grows: on the
    demo shards (patch tokens, d_sae 1,024) the untrained FVU is 0.73 / 0.79 / 1.27 / 2.81 at
    k = 8 / 16 / 32 / 64 (0.5: 0.71 / 0.56 / 0.44 / 0.47), and a run of 750 steps at lr 2e-3
    spends its budget undoing that: val FVU 0.115 / 0.085 / 0.077 / 0.058 at 1.0 against
    0.111 / 0.072 / 0.051 / 0.042 at 0.5 (bench/frontier.py); BatchTopK and Matryoshka at
    k = 32: 0.071 -> 0.053 and 0.064 -> 0.054. Features do not pay for it consistently: the
    demo's TopK k = 16 over 5 seeds (0-4) gives val FVU 0.070 at 0.5 against 0.083 at 1.0 on
    every seed, and each concept's best feature (chosen on val, image-level AUROC on test) a
    mean 0.918 against 0.938, 1.0 ahead on 3 seeds and behind on 2 (paired difference
    +0.020, 95% CI -0.026 to +0.066): a cost is neither shown nor excluded; the default rests on
    the FVU gain."""
    decoder_norm: Literal["unit", "free"] = "unit"
    "'unit': W_dec rows at unit norm, parallel gradient removed; 'free' ('relu' only): L1 x ||W_dec_j||."
    jumprelu_bandwidth: float = 0.2
    """Width epsilon of the rectangle kernel in the JumpReLU straight-through estimator, in units of
    the normalised pre-activations. Those are of order 1 (inputs of norm sqrt(d_model), unit-norm
    encoder columns: std about 1), so the 0.001 of Rajamanoharan et al. 2024 (and SAELens) puts
    almost no token in the kernel and no gradient reaches theta; 0.2 puts ~5% of a latent's
    tokens near theta there (0.1 trains the same on the demo)."""
    jumprelu_init_threshold: float = 1.0
    """Initial JumpReLU threshold theta, in units of the normalised pre-activations (std about 1):
    1.0 starts a latent firing on ~15% of tokens. 0.001 (Rajamanoharan et al. 2024) is ReLU
    there: the threshold cannot climb out of it in a run of hundreds of steps (L0 ~260 of 1,024
    whatever l0_coeff)."""
    threshold_momentum: float = 0.1
    "BatchTopK/Matryoshka: weight of each batch's smallest kept activation in the threshold's running average (saev: 0.1)."
    matryoshka_prefixes: tuple[int, ...] = ()
    "Matryoshka: increasing prefix sizes ending at d_sae; () = (d_sae/16, d_sae/4, d_sae)."

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.decoder_norm not in ("unit", "free"):
            raise ValueError(f"decoder_norm must be 'unit' or 'free', got {self.decoder_norm!r}")
        if self.decoder_norm == "free" and self.arch != "relu":
            raise ValueError(
                f"decoder_norm='free' (L1 scaled by decoder norm) is for arch 'relu', not {self.arch!r}"
            )
        for name in ("d_model", "d_sae", "k", "aux_k", "dead_after_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.topk_relu, bool):
            raise ValueError(f"topk_relu must be true or false, got {self.topk_relu!r}")
        if not self.topk_relu and self.arch != "topk":
            raise ValueError(f"topk_relu=False (signed TopK) is for arch 'topk', not {self.arch!r}")
        if self.arch in K_SPARSE and self.k > self.d_sae:
            raise ValueError(f"k={self.k} must be <= d_sae={self.d_sae}")
        for name in ("l1_coeff", "l0_coeff", "aux_alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold", "encoder_init_scale"):
            value = getattr(self, name)
            if value is None and name == "encoder_init_scale":
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not 0 < self.threshold_momentum <= 1:
            raise ValueError(f"threshold_momentum must be in (0, 1], got {self.threshold_momentum}")
        if self.matryoshka_prefixes:
            p = list(self.matryoshka_prefixes)
            if self.arch != "matryoshka":
                raise ValueError("matryoshka_prefixes is only used by arch 'matryoshka'")
            if any(not isinstance(v, int) or v < 1 for v in p) or p != sorted(set(p)):
                raise ValueError(f"matryoshka_prefixes must be increasing positive ints, got {p}")
            if p[-1] != self.d_sae:
                raise ValueError(f"matryoshka_prefixes must end at d_sae={self.d_sae}, got {p}")

    def encoder_scale(self) -> float:
        """`encoder_init_scale`, resolved: 0.5 for the k-sparse archs, else 1.0, unless set."""
        if self.encoder_init_scale is not None:
            return float(self.encoder_init_scale)
        return 0.5 if self.arch in K_SPARSE else 1.0

    def prefixes(self) -> list[int]:
        """Matryoshka prefix sizes, resolved (distinct, increasing, ending at d_sae)."""
        if self.matryoshka_prefixes:
            return list(self.matryoshka_prefixes)
        return sorted({max(1, self.d_sae // 16), max(1, self.d_sae // 4), self.d_sae})


class SAEOutput(NamedTuple):
    """What `SAE.forward` returns; every loss term is a scalar in the normalised space."""

    x_hat: Tensor
    "Reconstruction [batch, d_model] in the input space."
    f: Tensor | None
    "Latent activations [batch, d_sae] (the training activation in training mode); see `forward`."
    loss: Tensor
    "recon + coeff * sparsity + aux_alpha * aux."
    mse: Tensor
    "Mean over batch and d_model of the squared error of the full reconstruction (about the FVU)."
    l1: Tensor
    "Mean over batch of sum_j f_j (reported for every arch)."
    aux: Tensor
    "AuxK loss before aux_alpha: ||e - e_hat||^2 / ||e - mean(e)||^2; 0 unless k-sparse with dead latents."
    sparsity: Tensor
    "The penalised sparsity term before its coefficient: L1 ('relu'), L0 ('jumprelu'), else 0."
    recon: Tensor
    "The reconstruction term of the loss: mse, or for 'matryoshka' the sum of the prefixes' mse."
    l0: Tensor
    "Mean over batch of the number of positive latents (detached)."
    fired: Tensor
    "[d_sae] bool: latents positive on some token of the batch (detached)."


def _aux_error(e_bd: Tensor, e_hat_bd: Tensor) -> Tensor:
    """AuxK's `||e - e_hat||^2 / ||e - mean(e)||^2`; 0 for a residual with no variance (one token,
    or perfect reconstruction)."""
    num = (e_bd - e_hat_bd).pow(2).sum()
    denom = (e_bd - e_bd.mean(dim=0)).pow(2).sum()
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, num / safe, torch.zeros_like(num))


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
        cfg, sc = self.cfg, sparse_code
        x_n = self.normalise(x_bd)
        with torch.no_grad():  # the one dense matmul; gradients reach it through gather_pre_acts
            x_c = x_n - self.b_dec
            h = self._pre_acts_centred(x_c)
        n_rows = x_bd.shape[0]
        if cfg.arch == "topk":
            code = sc.top_k(h, cfg.k)
        else:
            code = sc.batch_top_k(h, cfg.k * n_rows)
        vals = sc.gather_pre_acts(h, code, x_c, self.W_enc, self.b_enc, self.b_dec)
        vals = torch.relu(vals) if cfg.topk_relu else vals  # False only for arch 'topk'
        x_hat_n = sc.decode(code, vals, self.W_dec) + self.b_dec
        mse = (x_hat_n - x_n).pow(2).mean()
        l1 = vals.sum() / n_rows
        recon = mse
        if cfg.arch == "matryoshka":
            recon = self._matryoshka_recon(
                x_n,
                lambda start, end: sparse_code.decode(
                    code, vals * ((code.cols >= start) & (code.cols < end)), self.W_dec
                ),
            )
        aux = x_n.new_zeros(())
        if cfg.aux_alpha > 0:
            if dead_mask is None:
                dead_mask = self.dead_mask()
            aux = self._aux_loss_sparse(h, x_c, x_n - x_hat_n, dead_mask)
        if cfg.arch in ("batchtopk", "matryoshka"):
            self._update_threshold(vals[vals > 0].detach())
        loss = recon + cfg.aux_alpha * aux
        with torch.no_grad():
            l0 = (vals > 0).sum().float() / n_rows
            fired = sc.fired(code, vals)
        f = sc.to_dense(code, vals) if dense_f else None
        zero = x_n.new_zeros(())
        return SAEOutput(self.unnormalise(x_hat_n), f, loss, mse, l1, aux, zero, recon, l0, fired)

    def _aux_loss_sparse(
        self, h_bs: Tensor, x_c_bd: Tensor, e_bd: Tensor, dead_mask: Tensor
    ) -> Tensor:
        """`aux_loss` on the sparse kernels: the top `aux_k` dead latents per token.

        With few dead latents (at most `DENSE_AUX_FACTOR` x `aux_k`, the usual case) the dead
        columns are recomputed densely with autograd instead: a [batch, n_dead] matmul is 2-10x
        cheaper than sorting batch x aux_k sparse entries (bench/train.py); same loss and
        gradients up to float summation order (tests/test_sae.py).
        """
        dead_idx = self._dead_indices(dead_mask)
        if dead_idx.numel() == 0:
            return h_bs.new_zeros(())
        if dead_idx.numel() <= DENSE_AUX_FACTOR * self.cfg.aux_k:
            return self._aux_loss_dead_dense(x_c_bd, e_bd, dead_idx)
        h_dead = h_bs[:, dead_idx]
        m = min(self.cfg.aux_k, dead_idx.numel())
        _, local = h_dead.topk(m, dim=-1, sorted=False)
        code = sparse_code.per_row(local, dead_idx, self.cfg.d_sae)
        z = torch.relu(
            sparse_code.gather_pre_acts(h_bs, code, x_c_bd, self.W_enc, self.b_enc, self.b_dec)
        )
        return _aux_error(e_bd.detach(), sparse_code.decode(code, z, self.W_dec))

    def _aux_loss_dead_dense(self, x_c_bd: Tensor, e_bd: Tensor, dead_idx: Tensor) -> Tensor:
        """AuxK over the dead columns only, `relu((x_n - b_dec) W_enc[:, dead] + b_enc[dead])`,
        recomputed with autograd (`x_c_bd` is detached), the top `aux_k` kept per token."""
        # x_c + b_dec - b_dec: the value of x_c, with the gradient b_dec gets through it
        x_c = x_c_bd - (self.b_dec - self.b_dec.detach())
        h = torch.addmm(self.b_enc[dead_idx], x_c, self.W_enc[:, dead_idx])
        z = torch.relu(h)
        if dead_idx.numel() > self.cfg.aux_k:
            with torch.no_grad():
                _, local = h.topk(self.cfg.aux_k, dim=-1, sorted=False)
                keep = torch.zeros_like(h).scatter_(-1, local, 1.0)
            z = z * keep
        return _aux_error(e_bd.detach(), z @ self.W_dec[dead_idx])

    def _matryoshka_recon(
        self, x_n_bd: Tensor, decode_block: Callable[[int, int], Tensor]
    ) -> Tensor:
        """Sum over nested prefixes m of mse(f[:, :m] W_dec[:m] + b_dec, x_n) (Bussmann et al. 2025).

        The paper's loss sums the prefixes' errors (not their mean), so the full dictionary's error
        counts once at full weight and `aux_alpha` keeps the meaning it has for the other archs.
        `decode_block(start, end)` is `f[:, start:end] W_dec[start:end]`, densely or sparsely.
        """
        x_hat = self.b_dec.expand_as(x_n_bd)
        total = x_n_bd.new_zeros(())
        start = 0
        prefixes = self.cfg.prefixes()
        for end in prefixes:
            # Cumulative: each block adds its latents' contribution to the previous prefix.
            x_hat = x_hat + decode_block(start, end)
            total = total + (x_hat - x_n_bd).pow(2).mean()
            start = end
        return total

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

        `extra` (JSON-able; e.g. shard manifest hash, layer, backbone) replaces `self.extra`.
        """
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if extra is not None:
            self.extra = dict(extra)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        meta = {
            "format_version": FORMAT_VERSION,
            "sae": to_dict(self.cfg),
            "norm_mean": self.norm_mean.cpu().tolist(),
            "norm_scale": float(self.norm_scale),
            "extra": self.extra,
        }
        weights_tmp = out_dir / (WEIGHTS_NAME + ".tmp")
        cfg_tmp = out_dir / (CFG_NAME + ".tmp")
        save_file(tensors, str(weights_tmp))
        cfg_tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(weights_tmp, out_dir / WEIGHTS_NAME)
        os.replace(cfg_tmp, out_dir / CFG_NAME)
        return out_dir

    def load_tensors(self, tensors: dict[str, Tensor], where: str) -> None:
        """Load a state dict, refusing missing, unexpected or mis-shaped tensors with a clear error."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{where}: tensors do not match the config: missing {missing}, unexpected {unexpected}"
            )
        for name, want in expected.items():
            got = tensors[name]
            if got.shape != want.shape:
                raise ValueError(
                    f"{where}: {name} has shape {tuple(got.shape)}, but cfg.json "
                    f"(d_model={self.cfg.d_model}, d_sae={self.cfg.d_sae}) needs {tuple(want.shape)}"
                )
        self.load_state_dict(tensors)

    @classmethod
    def load(cls, sae_dir: str | Path, device: str | torch.device = "cpu") -> SAE:
        """Read a directory written by `save` (in eval mode), refusing shapes that disagree with cfg.json."""
        from safetensors.torch import load_file

        sae_dir = Path(sae_dir)
        cfg_path, weights_path = sae_dir / CFG_NAME, sae_dir / WEIGHTS_NAME
        for path in (cfg_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"SAE checkpoint file not found: {path}")
        try:
            meta = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
        if not isinstance(meta, dict) or "sae" not in meta:
            raise ValueError(f"{cfg_path}: no 'sae' section; not an SAE checkpoint")
        cfg = from_dict(SAEConfig, meta["sae"], where=str(cfg_path))
        sae = cls(cfg)
        sae.load_tensors(load_file(str(weights_path)), str(weights_path))
        # cfg.json repeats the normalisation for readers without safetensors; they must agree.
        if "norm_mean" in meta and "norm_scale" in meta:
            json_mean = torch.tensor(meta["norm_mean"], dtype=torch.float32)
            if json_mean.shape != sae.norm_mean.shape or not (
                torch.allclose(json_mean, sae.norm_mean)
                and math.isclose(float(meta["norm_scale"]), float(sae.norm_scale), rel_tol=1e-6)
            ):
                raise ValueError(
                    f"{sae_dir}: norm_mean/norm_scale in {CFG_NAME} disagree with {WEIGHTS_NAME}"
                )
        sae.extra = dict(meta.get("extra") or {})
        return sae.to(device).eval()
