"""A sparse autoencoder over ViT activations: TopK (with AuxK) or ReLU + L1, one `nn.Module`.

Shapes: `x_bd` is [batch, d_model], `f_bs` is [batch, d_sae]. The SAE owns its input
normalisation (paper: "inputs are mean-centred and scaled so the average norm is sqrt(d)"):
`encode` normalises and `decode` un-normalises, so `decode(encode(x))` compares with `x` directly
and a loaded checkpoint needs no hidden constants (the paper's code lost them; see PAPER.md).
All loss terms are computed in the normalised space.

A checkpoint is a directory with `sae.safetensors` (every parameter and buffer) and `cfg.json`
(the `SAEConfig`, the normalisation constants and any `extra` the caller records). No pickle.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from saev_core.config import from_dict, to_dict

WEIGHTS_NAME = "sae.safetensors"
CFG_NAME = "cfg.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SAEConfig:
    """Architecture and loss hyperparameters of one SAE."""

    arch: Literal["topk", "relu"]
    "Activation: 'topk' keeps the k largest ReLU pre-activations; 'relu' is ReLU with an L1 penalty."
    d_model: int
    "Width of the input activations."
    d_sae: int
    "Number of latents (features)."
    k: int = 32
    "Active latents per token for 'topk' (paper's later versions: 32); unused by 'relu'."
    l1_coeff: float = 0.05
    "L1 coefficient lambda for 'relu', against the per-element MSE below; unused by 'topk'."
    aux_k: int = 512
    "Dead latents used by the AuxK loss (Gao et al. 2024, A.2: 512)."
    aux_alpha: float = 1 / 32
    "Weight of the AuxK loss (Gao et al. 2024, A.2: 1/32); 0 turns AuxK off."
    dead_after_tokens: int = 10_000_000
    "Tokens without firing after which a latent counts as dead for AuxK (Gao et al.: 10M)."
    decoder_norm: Literal["unit"] = "unit"
    "Decoder constraint: 'unit' keeps every row of W_dec at unit L2 norm."

    def __post_init__(self) -> None:
        if self.arch not in ("topk", "relu"):
            raise ValueError(f"arch must be 'topk' or 'relu', got {self.arch!r}")
        if self.decoder_norm != "unit":
            raise ValueError(f"decoder_norm must be 'unit', got {self.decoder_norm!r}")
        for name in ("d_model", "d_sae", "k", "aux_k", "dead_after_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.arch == "topk" and self.k > self.d_sae:
            raise ValueError(f"k={self.k} must be <= d_sae={self.d_sae}")
        for name in ("l1_coeff", "aux_alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


class SAEOutput(NamedTuple):
    """What `SAE.forward` returns; every loss term is a scalar in the normalised space."""

    x_hat: Tensor
    "Reconstruction [batch, d_model] in the input space."
    f: Tensor
    "Latent activations [batch, d_sae]."
    loss: Tensor
    "mse + l1_coeff * l1 ('relu') or mse + aux_alpha * aux ('topk')."
    mse: Tensor
    "Mean over batch and d_model of the squared error (about the FVU, since inputs have unit variance per dim)."
    l1: Tensor
    "Mean over batch of sum_j f_j (reported for both archs)."
    aux: Tensor
    "AuxK loss before aux_alpha: ||e - e_hat||^2 / ||e - mean(e)||^2; 0 for 'relu' or when none is dead."


class SAE(nn.Module):
    """Sparse autoencoder `f = act((norm(x) - b_dec) W_enc + b_enc)`, `x_hat = unnorm(f W_dec + b_dec)`."""

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.extra: dict[str, Any] = {}
        d_model, d_sae = cfg.d_model, cfg.d_sae
        # Gao et al. 2024, A.1: decoder rows random unit vectors, encoder its transpose.
        W_dec = torch.randn(d_sae, d_model, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(W_dec)
        # b_dec = 0 is the mean of the inputs once they are mean-centred.
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("norm_mean", torch.zeros(d_model))
        self.register_buffer("norm_scale", torch.tensor(1.0))
        # Tokens seen since each latent last fired; AuxK treats >= dead_after_tokens as dead.
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.int64))

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
        return (x_n_bd - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, h_bs: Tensor) -> Tensor:
        """ReLU; for 'topk' then keep the k largest per row (zeros elsewhere)."""
        f_bs = torch.relu(h_bs)
        if self.cfg.arch == "topk":
            vals, idx = f_bs.topk(self.cfg.k, dim=-1, sorted=False)
            f_bs = torch.zeros_like(f_bs).scatter(-1, idx, vals)
        return f_bs

    def encode(self, x_bd: Tensor) -> Tensor:
        """Latents `f_bs` of raw (input-space) activations `x_bd`."""
        return self.activate(self.pre_acts(self.normalise(x_bd)))

    def decode(self, f_bs: Tensor) -> Tensor:
        """Reconstruction in the input space: `unnorm(f W_dec + b_dec)`."""
        return self.unnormalise(f_bs @ self.W_dec + self.b_dec)

    # -- loss ----------------------------------------------------------------------------------

    def forward(
        self, x_bd: Tensor, dead_mask: Tensor | None = None, l1_coeff: float | None = None
    ) -> SAEOutput:
        """Encode, decode and compute the loss terms.

        `dead_mask` [d_sae] marks latents for AuxK; by default those whose `tokens_since_fired`
        reached `cfg.dead_after_tokens`. `l1_coeff` overrides `cfg.l1_coeff` (sparsity warm-up).
        """
        x_n = self.normalise(x_bd)
        h = self.pre_acts(x_n)
        f = self.activate(h)
        x_hat_n = f @ self.W_dec + self.b_dec
        mse = (x_hat_n - x_n).pow(2).mean()
        l1 = f.sum(dim=-1).mean()
        aux = x_n.new_zeros(())
        if self.cfg.arch == "relu":
            coeff = self.cfg.l1_coeff if l1_coeff is None else l1_coeff
            loss = mse + coeff * l1
        else:
            if self.cfg.aux_alpha > 0:
                if dead_mask is None:
                    dead_mask = self.dead_mask()
                aux = self.aux_loss(h, x_n - x_hat_n, dead_mask)
            loss = mse + self.cfg.aux_alpha * aux
        return SAEOutput(self.unnormalise(x_hat_n), f, loss, mse, l1, aux)

    def aux_loss(self, h_bs: Tensor, e_bd: Tensor, dead_mask: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024, A.2): reconstruct the residual `e` from the top `aux_k` dead latents.

        `e` is detached so only the dead latents learn from this term; `e_hat` uses no bias, and
        the squared error is divided by the residual's total variance about its batch mean.
        """
        if dead_mask.shape != (self.cfg.d_sae,):
            raise ValueError(
                f"dead_mask must have shape ({self.cfg.d_sae},), got {tuple(dead_mask.shape)}"
            )
        dead_idx = dead_mask.nonzero().squeeze(1)
        if dead_idx.numel() == 0:
            return h_bs.new_zeros(())
        e = e_bd.detach()
        # Work on the dead columns only: usually few, and then no top-k is needed at all.
        z = torch.relu(h_bs[:, dead_idx])
        if dead_idx.numel() > self.cfg.aux_k:
            vals, idx = z.topk(self.cfg.aux_k, dim=-1, sorted=False)
            z = torch.zeros_like(z).scatter(-1, idx, vals)
        e_hat = z @ self.W_dec[dead_idx]
        num = (e - e_hat).pow(2).sum()
        denom = (e - e.mean(dim=0)).pow(2).sum()
        # A batch whose residual has no variance (one token, or perfect reconstruction) gives 0.
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        return torch.where(denom > 0, num / safe, torch.zeros_like(num))

    # -- dead latents --------------------------------------------------------------------------

    def dead_mask(self) -> Tensor:
        """Latents that have not fired for `cfg.dead_after_tokens` tokens."""
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    @torch.no_grad()
    def update_firing(self, f_bs: Tensor) -> None:
        """Advance `tokens_since_fired` by the batch size, resetting latents that fired in `f_bs`."""
        fired = (f_bs > 0).any(dim=0)
        self.tokens_since_fired += f_bs.shape[0]
        self.tokens_since_fired.masked_fill_(fired, 0)

    # -- unit-norm decoder ---------------------------------------------------------------------

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the part of each `W_dec` row's gradient parallel to the row (call before the step)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g = self.W_dec.grad
        g -= (g * w).sum(dim=1, keepdim=True) * w

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale every `W_dec` row to unit L2 norm (call after the step)."""
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

    @classmethod
    def load(cls, sae_dir: str | Path, device: str | torch.device = "cpu") -> SAE:
        """Read a directory written by `save`, refusing files whose shapes disagree with cfg.json."""
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
        tensors = load_file(str(weights_path))
        expected = sae.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{weights_path}: tensors do not match cfg.json: missing {missing}, unexpected {unexpected}"
            )
        for name, want in expected.items():
            got = tensors[name]
            if got.shape != want.shape:
                raise ValueError(
                    f"{weights_path}: {name} has shape {tuple(got.shape)}, but cfg.json "
                    f"(d_model={cfg.d_model}, d_sae={cfg.d_sae}) needs {tuple(want.shape)}"
                )
        sae.load_state_dict(tensors)
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
        return sae.to(device)
