"""The train stage's library part: fit the input normalisation, train an SAE, evaluate it.

Data arrives as iterables of float32 tensors `x_bd` [batch, d_model]; the caller builds them
(shard loader, shuffling) and passes `make_batches(epoch)`, so nothing here reads files.
Tracking reaches this module only through `log(metrics, step)`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saev_core.sae import SAE, SAEConfig

LogFn = Callable[[dict[str, float], int], None]


def noop_log(metrics: dict[str, float], step: int) -> None:
    """The default `log` callback: records nothing."""


@dataclass(frozen=True)
class TrainConfig:
    """`params.yaml` section `train`: one SAE's architecture and optimisation."""

    arch: Literal["topk", "relu"] = "topk"
    "SAE activation: 'topk' (with AuxK) or 'relu' (with an L1 penalty)."
    expansion: int = 8
    "d_sae = expansion * d_model, unless d_sae is given."
    d_sae: int | None = None
    "Number of latents; overrides expansion when set."
    k: int = 32
    "Active latents per token for 'topk' (paper's later versions: 32)."
    l1_coeff: float = 0.05
    "L1 coefficient for 'relu' (on the per-element MSE); 0.05 measured to give L0 ~ 20 at d_sae 1024."
    l1_warmup_steps: int = 0
    "Steps over which the L1 coefficient ramps linearly from 0 to l1_coeff; 0 = no warm-up."
    lr: float = 2e-3
    "Peak Adam learning rate; 2e-3 measured best for d_sae 1024 in ~200 steps (paper: 4e-4 at 24,576)."
    warmup_steps: int = 50
    "Steps of linear learning-rate warm-up from 0 (paper: 500, for runs of thousands of steps)."
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    "After warm-up: cosine decay to lr_end_frac * lr at the last step, or constant."
    lr_end_frac: float = 0.1
    "Final learning rate as a fraction of lr for the cosine schedule."
    batch_size: int = 4096
    "Tokens per training batch (the caller's loader builds batches of this size)."
    n_epochs: int = 3
    "Passes over the training activations."
    aux_k: int = 512
    "Dead latents used by AuxK (Gao et al. 2024, A.2: 512)."
    aux_alpha: float = 1 / 32
    "Weight of the AuxK loss (Gao et al. 2024, A.2: 1/32); 0 turns AuxK off."
    dead_after_tokens: int = 10_000_000
    "Tokens without firing after which a latent counts as dead for AuxK (Gao et al.: 10M)."
    grad_clip: float = 1.0
    "Clip the global gradient norm to this value; 0 disables clipping."
    norm_max_tokens: int = 100_000
    "Tokens (from epoch 0's batches) used to fit the input mean and scale."
    seed: int = 0
    "Seed for the SAE's initial weights."
    device: str = "auto"
    "'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'."
    dense_threshold: float = 0.01
    "A feature firing on more than this fraction of tokens counts as dense (paper: 1%)."
    log_every: int = 10
    "Call log(...) every this many steps (and at the last step)."

    def __post_init__(self) -> None:
        if self.arch not in ("topk", "relu"):
            raise ValueError(f"arch must be 'topk' or 'relu', got {self.arch!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(
                f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}"
            )
        positive_ints = ["expansion", "k", "batch_size", "n_epochs", "aux_k"]
        positive_ints += ["dead_after_tokens", "norm_max_tokens", "log_every"]
        for name in positive_ints:
            _check_int(name, getattr(self, name), low=1)
        for name in ("warmup_steps", "l1_warmup_steps", "seed"):
            _check_int(name, getattr(self, name), low=0)
        if self.d_sae is not None:
            _check_int("d_sae", self.d_sae, low=1)
            if self.arch == "topk" and self.k > self.d_sae:
                raise ValueError(f"k={self.k} must be <= d_sae={self.d_sae}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("l1_coeff", "aux_alpha", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("lr_end_frac", "dense_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not (
            self.device in ("auto", "cpu", "mps")
            or self.device == "cuda"
            or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}"
            )

    def sae_config(self, d_model: int) -> SAEConfig:
        """The `SAEConfig` for inputs of width `d_model` (raises ValueError naming k if k > d_sae)."""
        d_sae = self.d_sae if self.d_sae is not None else self.expansion * d_model
        return SAEConfig(
            arch=self.arch,
            d_model=d_model,
            d_sae=d_sae,
            k=self.k,
            l1_coeff=self.l1_coeff,
            aux_k=self.aux_k,
            aux_alpha=self.aux_alpha,
            dead_after_tokens=self.dead_after_tokens,
        )


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lr_at(step: int, n_steps: int, cfg: TrainConfig) -> float:
    """Learning rate at `step` (0-based) of `n_steps`: linear warm-up, then cosine or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    n_decay = max(n_steps - cfg.warmup_steps - 1, 1)
    progress = min((step - cfg.warmup_steps) / n_decay, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.lr_end_frac + (1 - cfg.lr_end_frac) * cosine)


def l1_coeff_at(step: int, cfg: TrainConfig) -> float:
    """Sparsity warm-up: the L1 coefficient ramps linearly from 0 at step 0 to `l1_coeff`."""
    if cfg.l1_warmup_steps == 0:
        return cfg.l1_coeff
    return cfg.l1_coeff * min(step / cfg.l1_warmup_steps, 1.0)


def _checked(x_bd: Any, d_model: int, device: torch.device) -> Tensor:
    x_bd = torch.as_tensor(x_bd)
    if x_bd.ndim != 2 or x_bd.shape[1] != d_model:
        raise ValueError(f"batches must have shape [batch, {d_model}], got {tuple(x_bd.shape)}")
    return x_bd.to(device=device, dtype=torch.float32)


def fit_normalisation(batches: Iterable[Tensor], max_tokens: int) -> tuple[Tensor, float]:
    """Mean `mean_d` and scalar `scale` with mean ||(x - mean_d) * scale|| = sqrt(d_model).

    Reads batches until `max_tokens` tokens are in hand (the last batch is cut), so it is cheap
    on large data; statistics are accumulated in float64.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    chunks: list[Tensor] = []
    n = 0
    for x_bd in batches:
        x_bd = torch.as_tensor(x_bd)
        if x_bd.ndim != 2:
            raise ValueError(f"batches must be 2-D [batch, d_model], got {tuple(x_bd.shape)}")
        if chunks and x_bd.shape[1] != chunks[0].shape[1]:
            raise ValueError(f"batch width {x_bd.shape[1]} != first batch's {chunks[0].shape[1]}")
        take = x_bd[: max_tokens - n].detach().to("cpu", torch.float64)
        chunks.append(take)
        n += take.shape[0]
        if n >= max_tokens:
            break
    if n == 0:
        raise ValueError("fit_normalisation got no tokens")
    x = torch.cat(chunks)
    if not torch.isfinite(x).all():
        raise ValueError("fit_normalisation: activations contain NaN or inf")
    mean_d = x.mean(dim=0)
    mean_norm = (x - mean_d).norm(dim=1).mean().item()
    if mean_norm <= 0:
        raise ValueError("fit_normalisation: every token is identical; cannot scale")
    scale = math.sqrt(x.shape[1]) / mean_norm
    return mean_d.float(), scale


def train_sae(
    make_batches: Callable[[int], Iterable[Tensor]],
    d_model: int,
    cfg: TrainConfig,
    log: LogFn = noop_log,
    progress: bool = True,
    n_steps: int | None = None,
) -> tuple[SAE, dict[str, Any]]:
    """Train an SAE with Adam; returns it (in eval mode, on `cfg.device`) and a summary dict.

    `make_batches(epoch)` must return a fresh iterable of `x_bd` for that epoch, shuffled by the
    caller. Epoch 0's iterable is read once first to fit the normalisation (up to
    `cfg.norm_max_tokens` tokens). The cosine schedule needs the total step count: pass `n_steps`,
    or it is taken as n_epochs x len(epoch 0's iterable), counting epoch 0 once if it has no len.
    Every step: forward, backward, drop gradient parallel to decoder rows, clip, Adam step,
    renormalise decoder rows, update the tokens-since-fired counters that define dead latents.
    """
    device = resolve_device(cfg.device)
    sae_cfg = cfg.sae_config(d_model)
    mean_d, scale = fit_normalisation(make_batches(0), cfg.norm_max_tokens)
    if mean_d.shape != (d_model,):
        raise ValueError(f"batches have width {mean_d.shape[0]}, but d_model={d_model}")
    first = make_batches(0)
    if n_steps is None:
        try:
            per_epoch = len(first)  # type: ignore[arg-type]
        except TypeError:  # a generator: count one epoch, then ask for a fresh one
            per_epoch, first = sum(1 for _ in first), make_batches(0)
        n_steps = per_epoch * cfg.n_epochs
    if n_steps < 1:
        raise ValueError("make_batches produced no batches")

    sae = SAE(sae_cfg, generator=torch.Generator().manual_seed(cfg.seed))
    sae.set_normalisation(mean_d, scale)
    sae.to(device).train()
    opt = torch.optim.Adam(sae.parameters(), lr=lr_at(0, n_steps, cfg))

    step, n_tokens, logged = 0, 0, -1
    last = _Running()  # last epoch's token-weighted training metrics

    def report(metrics: dict[str, Tensor], step: int) -> None:
        nonlocal logged
        values = {k: float(v) for k, v in metrics.items()}
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"training loss is {values['loss']} at step {step}")
        values["dead_frac"] = float(sae.dead_mask().float().mean())
        values["lr"] = opt.param_groups[0]["lr"]
        values["l1_coeff"] = l1_coeff_at(step, cfg)
        log(values, step)
        bar.set_postfix(fvu=f"{values['fvu']:.3f}", l0=f"{values['l0']:.1f}")
        logged = step

    t0 = time.perf_counter()
    bar = tqdm(total=n_steps, desc="train SAE", disable=not progress, unit="step")
    for epoch in range(cfg.n_epochs):
        last = _Running()
        for x_bd in first if epoch == 0 else make_batches(epoch):
            x_bd = _checked(x_bd, d_model, device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, n_steps, cfg)
            out = sae(x_bd, l1_coeff=l1_coeff_at(step, cfg))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            sae.remove_parallel_grads()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
            opt.step()
            sae.normalise_decoder()
            sae.update_firing(out.f)

            with torch.no_grad():
                metrics = _batch_metrics(x_bd, out)
            last.add(metrics, x_bd.shape[0])
            n_tokens += x_bd.shape[0]
            if step % cfg.log_every == 0 or step == n_steps - 1:
                report(metrics, step)
            bar.update(1)
            step += 1
    bar.close()
    if step == 0:
        raise ValueError("make_batches produced no batches")
    if logged != step - 1:
        report(metrics, step - 1)
    seconds = time.perf_counter() - t0
    sae.eval()
    summary: dict[str, Any] = {
        "n_steps": step,
        "n_tokens": n_tokens,
        "d_model": d_model,
        "d_sae": sae_cfg.d_sae,
        "norm_scale": scale,
        "dead_frac": float(sae.dead_mask().float().mean()),
        "train_seconds": seconds,
        "tokens_per_s": n_tokens / seconds if seconds > 0 else float("nan"),
        **{f"last_epoch_{k}": v for k, v in last.means().items()},
    }
    return sae, summary


def _batch_metrics(x_bd: Tensor, out: Any) -> dict[str, Tensor]:
    """Training-batch metrics; FVU against the batch mean (scale-free, so any space gives it)."""
    err = (x_bd - out.x_hat).pow(2).sum()
    var = (x_bd - x_bd.mean(dim=0)).pow(2).sum()
    return {
        "loss": out.loss.detach(),
        "mse": out.mse.detach(),
        "l1": out.l1.detach(),
        "aux": out.aux.detach(),
        "l0": (out.f > 0).sum(dim=-1).float().mean(),
        "fvu": err / var.clamp_min(1e-12),
    }


class _Running:
    """Token-weighted means of per-batch metrics."""

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


@torch.no_grad()
def evaluate(
    sae: SAE,
    batches: Iterable[Tensor],
    dense_threshold: float = 0.01,
    progress: bool = False,
) -> dict[str, Any]:
    """Stream `batches` once through `sae` and measure it in the input space.

    Returns floats `l0` (mean active features per token), `fvu` (sum ||x - x_hat||^2 /
    sum ||x - mean(x)||^2, mean over all tokens), `mse` (per element), `dead_frac` (never fires
    here), `dense_frac` (fires on more than `dense_threshold` of tokens), the int `n_tokens`, and
    numpy arrays `freq` [d_sae] (fraction of tokens each feature fires on) and `mean_act` [d_sae]
    (mean activation when firing; 0 for features that never fire).
    """
    if not 0 <= dense_threshold <= 1:
        raise ValueError(f"dense_threshold must be in [0, 1], got {dense_threshold}")
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
        "dense_frac": float(np.mean(freq > dense_threshold)),
        "n_tokens": n,
        "freq": freq,
        "mean_act": mean_act,
    }
