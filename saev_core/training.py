"""The train stage's library part: fit the input normalisation, train one SAE or a sweep, evaluate.

Data arrives as iterables of tensors `x_bd` [batch, d_model] (any float dtype; cast on the
device); the caller builds them (shard loader, shuffling) and passes `make_batches(epoch)`, so
nothing here reads files. A sweep (`train_saes`) trains many SAEs in lock-step on the same
batches, so the data is read once for all of them. Runs checkpoint every `checkpoint_every`
steps (weights, Adam state, step, dead-latent counters, loader position) and resume from the
last checkpoint: `make_batches(epoch)` must give the same batches for the same epoch (the shard
loader does, per seed), so resuming skips the batches of the epoch already trained on.
Tracking reaches this module only through `log(metrics, step)`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saev_core.config import from_dict, to_dict
from saev_core.sae import ARCHS, K_SPARSE, SAE, SAEConfig

LogFn = Callable[[dict[str, float], int], None]

# Fields every member of a sweep must share: they describe the one pass over the data.
SHARED_FIELDS = ("batch_size", "n_epochs", "norm_max_tokens", "device", "precision")


def noop_log(metrics: dict[str, float], step: int) -> None:
    """The default `log` callback: records nothing."""


@dataclass(frozen=True)
class TrainConfig:
    """`params.yaml` section `train.sae`: one SAE's architecture and optimisation."""

    arch: Literal["relu", "topk", "batchtopk", "jumprelu", "matryoshka"] = "topk"
    "SAE architecture (see saev_core/sae.py): 'relu' (+L1), 'topk', 'batchtopk', 'jumprelu', 'matryoshka'."
    expansion: int = 8
    "d_sae = expansion * d_model, unless d_sae is given."
    d_sae: int | None = None
    "Number of latents; overrides expansion when set."
    k: int = 32
    "Active latents per token for the k-sparse archs (paper's later versions: 32)."
    topk_relu: bool = True
    "'topk': ReLU on the kept values; False keeps them signed (saev's TopK, `mask * h`)."
    l1_coeff: float = 0.05
    "L1 coefficient for 'relu' (against the per-element MSE of normalised inputs)."
    l0_coeff: float = 1e-3
    "L0 coefficient for 'jumprelu' (against the per-element MSE of normalised inputs); demo: 1e-3 -> L0 ~16.7 (SAEConfig)."
    sparsity_warmup_steps: int = 0
    "Steps over which the sparsity coefficient (l1_coeff or l0_coeff) ramps linearly from 0; 0 = no warm-up."
    encoder_init_scale: float | None = None
    "W_enc starts as this times W_dec's transpose (pre-activation std ~ this); None: 0.5 k-sparse, 1.0 else (SAEConfig)."
    decoder_norm: Literal["unit", "free"] = "unit"
    "'unit': unit-norm decoder rows with the parallel gradient removed; 'free' ('relu'): L1 scaled by ||W_dec_j||."
    jumprelu_bandwidth: float = 0.2
    "JumpReLU straight-through estimator bandwidth, in normalised pre-activation units (std ~1; see SAEConfig)."
    jumprelu_init_threshold: float = 1.0
    "Initial JumpReLU threshold, in normalised pre-activation units (see SAEConfig)."
    threshold_momentum: float = 0.1
    "BatchTopK/Matryoshka: running-average weight of each batch's smallest kept activation."
    matryoshka_prefixes: tuple[int, ...] = ()
    "Matryoshka prefix sizes ending at d_sae; () = (d_sae/16, d_sae/4, d_sae)."
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
    "Tokens (from epoch 0's batches) used to fit the input mean and scale and b_dec."
    b_dec_init: Literal["geometric_median", "zero"] = "geometric_median"
    "b_dec at the geometric median of the normalisation sample (Bricken et al. 2023), or 0 (= the mean)."
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    "bf16 autocast for the forward pass: 'auto' = on CUDA with bf16 support, else fp32. Weights stay fp32."
    sparse_kernels: bool = True
    "Train k-sparse archs with sparse kernels (saev_core/sparse_code.py; same gradients, ~4x faster at k=32, d_sae 16k); False = dense reference."
    checkpoint_every: int = 500
    "Write a resumable checkpoint every this many steps (needs a checkpoint directory); 0 = never."
    seed: int = 0
    "Seed for the SAE's initial weights (and, in the train stage, the data order: seed + epoch)."
    device: str = "auto"
    "'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'."
    dense_threshold: float = 0.01
    "Absolute dense rule, reported as dense_frac_abs: fires on more than this fraction of tokens (paper: 1%); dense_frac is relative (training.dense_fractions)."
    log_every: int = 10
    "Call log(...) every this many steps (and at the last step)."

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        choices = {
            "lr_schedule": ("cosine", "constant"),
            "decoder_norm": ("unit", "free"),
            "b_dec_init": ("geometric_median", "zero"),
            "precision": ("auto", "fp32", "bf16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.sparse_kernels, bool):
            raise ValueError(f"sparse_kernels must be true or false, got {self.sparse_kernels!r}")
        positive_ints = ["expansion", "k", "batch_size", "n_epochs", "aux_k"]
        positive_ints += ["dead_after_tokens", "norm_max_tokens", "log_every"]
        for name in positive_ints:
            _check_int(name, getattr(self, name), low=1)
        for name in ("warmup_steps", "sparsity_warmup_steps", "seed", "checkpoint_every"):
            _check_int(name, getattr(self, name), low=0)
        if self.d_sae is not None:
            _check_int("d_sae", self.d_sae, low=1)
            if self.arch in K_SPARSE and self.k > self.d_sae:
                raise ValueError(f"k={self.k} must be <= d_sae={self.d_sae}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("l1_coeff", "l0_coeff", "aux_alpha", "grad_clip"):
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
        if self.d_sae is not None:
            self.sae_config(1)  # architecture checks that need no d_model fail here, not later

    def sae_config(self, d_model: int) -> SAEConfig:
        """The `SAEConfig` for inputs of width `d_model` (raises ValueError naming k if k > d_sae)."""
        d_sae = self.d_sae if self.d_sae is not None else self.expansion * d_model
        values = {name: getattr(self, name) for name in SAE_FIELDS}
        values["matryoshka_prefixes"] = tuple(self.matryoshka_prefixes)
        return SAEConfig(d_model=d_model, d_sae=d_sae, **values)


# The SAEConfig fields a TrainConfig repeats under the same name and default, so `train.sae` in
# params.yaml is one flat section; `tests/test_training.py` checks that none is missing.
SAE_FIELDS = tuple(f.name for f in fields(SAEConfig) if f.name not in ("d_model", "d_sae"))


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def sweep_configs(
    base: dict[str, Any], members: dict[str, dict[str, Any]]
) -> dict[str, TrainConfig]:
    """`{name: TrainConfig}` for a sweep: each member's overrides on top of `base`.

    Refuses members that disagree on `SHARED_FIELDS` (they share one pass over the data).
    """
    cfgs = {}
    for name, overrides in members.items():
        if not isinstance(overrides, dict):
            raise ValueError(
                f"sweep member {name!r}: expected a mapping of overrides, got {overrides!r}"
            )
        cfgs[name] = from_dict(TrainConfig, {**base, **overrides}, where=f"sweep member {name!r}")
    check_shared(list(cfgs.values()), list(cfgs))
    return cfgs


def check_shared(cfgs: Sequence[TrainConfig], names: Sequence[str] | None = None) -> None:
    """Raise ValueError if the configs of one sweep differ in a field of `SHARED_FIELDS`."""
    names = list(names) if names is not None else [str(i) for i in range(len(cfgs))]
    for field_name in SHARED_FIELDS:
        values = {getattr(c, field_name) for c in cfgs}
        if len(values) > 1:
            per = {n: getattr(c, field_name) for n, c in zip(names, cfgs, strict=True)}
            raise ValueError(
                f"sweep members must share {field_name} (they train on one pass of the data): {per}"
            )


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to autocast to bf16: asked for, or 'auto' on a CUDA device that supports it."""
    if precision == "bf16":
        return True
    if precision == "auto" and device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False


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


def sparsity_coeff_at(step: int, cfg: TrainConfig) -> float:
    """Sparsity warm-up: `l1_coeff` ('relu') or `l0_coeff` ('jumprelu') ramps linearly from 0 at step 0."""
    full = {"relu": cfg.l1_coeff, "jumprelu": cfg.l0_coeff}.get(cfg.arch, 0.0)
    if cfg.sparsity_warmup_steps == 0:
        return full
    return full * min(step / cfg.sparsity_warmup_steps, 1.0)


def _checked(x_bd: Any, d_model: int, device: torch.device) -> Tensor:
    x_bd = torch.as_tensor(x_bd)
    if x_bd.ndim != 2 or x_bd.shape[1] != d_model:
        raise ValueError(f"batches must have shape [batch, {d_model}], got {tuple(x_bd.shape)}")
    return x_bd.to(device=device, dtype=torch.float32, non_blocking=True)


def take_tokens(batches: Iterable[Tensor], max_tokens: int) -> Tensor:
    """The first `max_tokens` tokens of `batches` as one float64 CPU tensor (the last batch is cut)."""
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
        raise ValueError("got no tokens")
    x = torch.cat(chunks)
    if not torch.isfinite(x).all():
        raise ValueError("activations contain NaN or inf")
    return x


def fit_normalisation(batches: Iterable[Tensor], max_tokens: int) -> tuple[Tensor, float]:
    """Mean `mean_d` and scalar `scale` with mean ||(x - mean_d) * scale|| = sqrt(d_model).

    Reads batches until `max_tokens` tokens are in hand (the last batch is cut), so it is cheap
    on large data; statistics are accumulated in float64.
    """
    try:
        x = take_tokens(batches, max_tokens)
    except ValueError as e:
        raise ValueError(f"fit_normalisation: {e}") from e
    return _normalisation_of(x)


def _normalisation_of(x: Tensor) -> tuple[Tensor, float]:
    mean_d = x.mean(dim=0)
    mean_norm = (x - mean_d).norm(dim=1).mean().item()
    if mean_norm <= 0:
        raise ValueError("fit_normalisation: every token is identical; cannot scale")
    return mean_d.float(), math.sqrt(x.shape[1]) / mean_norm


def geometric_median(x_nd: Tensor, n_iter: int = 200, tol: float = 1e-9) -> Tensor:
    """The point minimising the sum of Euclidean distances to the rows of `x_nd` (Weiszfeld).

    Bricken et al. 2023 initialise b_dec here: unlike the mean it ignores outlying tokens.
    """
    x = x_nd.double()
    y = x.mean(dim=0)
    for _ in range(n_iter):
        # A zero distance (y on a data point) would divide by zero; a floor keeps it finite.
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_next = (w[:, None] * x).sum(dim=0) / w.sum()
        done = (y_next - y).norm() <= tol * max(1.0, float(y.norm()))
        y = y_next
        if done:
            break
    return y.to(x_nd.dtype)


# -- checkpoints ------------------------------------------------------------------------------

STATE_NAME = "state.json"


def _write_checkpoint(ckpt_dir: Path, members: list[_Member], state: dict[str, Any]) -> None:
    """Write one resumable checkpoint atomically: a fresh folder renamed over the old one."""
    from safetensors.torch import save_file

    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir.parent / f".{ckpt_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for i, m in enumerate(members):
        tensors = {k: v.detach().cpu().contiguous() for k, v in m.sae.state_dict().items()}
        save_file(tensors, str(tmp / f"sae-{i}.safetensors"))
        # Adam's state is tensors and numbers only, so `weights_only=True` reads it back.
        torch.save(m.opt.state_dict(), tmp / f"optim-{i}.pt")
    state = {**state, "running": [m.running.state() for m in members]}
    (tmp / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n")
    old = ckpt_dir.parent / f".{ckpt_dir.name}.old-{os.getpid()}"
    if ckpt_dir.exists():
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    if old.exists():
        shutil.rmtree(old)


# Fields of TrainConfig that change how a run is computed, logged or placed, not what it
# trains: a checkpoint resumes across a change of any of them.
# (`dense_threshold` is read by `evaluate`, after training.)
NOT_IN_FINGERPRINT = (
    "sparse_kernels",
    "log_every",
    "checkpoint_every",
    "device",
    "dense_threshold",
)


def checkpoint_fingerprint(
    d_model: int, cfgs: Sequence[TrainConfig], data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the data it was trained on (shard manifest
    sha256, layer, token policy, split: whatever the caller passes as `data`), d_model and every
    config field that changes the result (not those in `NOT_IN_FINGERPRINT`)."""
    configs = [{k: v for k, v in to_dict(c).items() if k not in NOT_IN_FINGERPRINT} for c in cfgs]
    # through JSON, as state.json holds it, so a fingerprint compares equal to its own copy
    return json.loads(json.dumps({"data": data or {}, "d_model": d_model, "configs": configs}))


def _show_data(key: str, value: Any) -> str:
    if value is None:
        return f"no {key}"
    if key == "manifest_sha256":
        return f"shard manifest sha256 {str(value)[:12]}"
    return f"{key} {value}"


def why_not_resume(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """Why a checkpoint with fingerprint `old` cannot resume a run with fingerprint `new`, in
    words (`checkpoint is for layer 3, this run is layer 4`); None when it can."""
    if not isinstance(old, dict) or "data" not in old:
        return "checkpoint was written by an older saev without a data fingerprint"
    for key in sorted(set(old["data"]) | set(new["data"])):
        a, b = old["data"].get(key), new["data"].get(key)
        if a != b:
            return f"checkpoint is for {_show_data(key, a)}, this run is {_show_data(key, b)}"
    if old.get("d_model") != new["d_model"]:
        return f"checkpoint is for d_model {old.get('d_model')}, this run is {new['d_model']}"
    olds, news = old.get("configs") or [], new["configs"]
    if len(olds) != len(news):
        return f"checkpoint holds {len(olds)} SAEs, this run trains {len(news)}"
    for i, (a, b) in enumerate(zip(olds, news, strict=True)):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                which = f" (SAE {i + 1} of {len(news)})" if len(news) > 1 else ""
                return (
                    f"checkpoint is for {key}={a.get(key)!r}, "
                    f"this run is {key}={b.get(key)!r}{which}"
                )
    return None


def read_checkpoint_state(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The `state.json` of a checkpoint folder, or None if there is none."""
    path = Path(ckpt_dir) / STATE_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _restore(ckpt_dir: Path, members: list[_Member], device: torch.device) -> None:
    from safetensors.torch import load_file

    state = json.loads((ckpt_dir / STATE_NAME).read_text())
    for i, m in enumerate(members):
        m.sae.load_tensors(
            load_file(str(ckpt_dir / f"sae-{i}.safetensors"), device=str(device)), str(ckpt_dir)
        )
        opt_state = torch.load(ckpt_dir / f"optim-{i}.pt", weights_only=True, map_location=device)
        m.opt.load_state_dict(opt_state)
        m.running.load(state["running"][i])


# -- training ---------------------------------------------------------------------------------


class _Member:
    """One SAE of a sweep with its optimizer and running metrics."""

    def __init__(self, cfg: TrainConfig, sae: SAE, log: LogFn):
        self.cfg, self.sae, self.log = cfg, sae, log
        self.opt: torch.optim.Adam  # made once the SAE is on its device
        self.running = _Running()
        self.logged = -1
        self.metrics: dict[str, Tensor] = {}


def train_saes(
    make_batches: Callable[[int], Iterable[Tensor]],
    d_model: int,
    cfgs: Sequence[TrainConfig],
    logs: Sequence[LogFn] | None = None,
    progress: bool = True,
    n_steps: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool | Literal["auto"] = "auto",
    data: dict[str, Any] | None = None,
    norm_sample: Callable[[int], Any] | None = None,
) -> list[tuple[SAE, dict[str, Any]]]:
    """Train one SAE per config in lock-step on one pass of `make_batches`; returns (SAE, summary) each.

    `make_batches(epoch)` must return a fresh iterable of `x_bd` for that epoch, shuffled by the
    caller, the same batches for the same epoch. Epoch 0's iterable is read once first to fit
    the normalisation and b_dec (up to `norm_max_tokens` tokens), unless `norm_sample(n)` gives
    those n tokens [n, d] instead (the train stage: `loaders.sample_rows`, a sample of the whole
    shard set rather than of the first window's row groups). The cosine schedule needs the
    total step count: pass `n_steps`, or it is taken as n_epochs x len(epoch 0's iterable).
    Every step, for every SAE: forward (bf16 autocast if enabled), backward, drop the gradient
    parallel to decoder rows, clip, Adam step, renormalise decoder rows, update the
    tokens-since-fired counters that define dead latents.

    With `checkpoint_dir`, a checkpoint is written every `checkpoint_every` steps; `resume`
    True continues from it (error if it is missing or from other configs), 'auto' continues
    when one from the same configs and data exists, False starts afresh. `data` says what the
    batches are (the train stage passes the shard manifest's sha256, layer, token policy and
    split): a checkpoint of other data is never resumed. Whether it resumes, and if not why,
    is printed (`resuming from step 400 of 508`).
    """
    cfgs = list(cfgs)
    if not cfgs:
        raise ValueError("train_saes needs at least one TrainConfig")
    check_shared(cfgs)
    logs = list(logs) if logs is not None else [noop_log] * len(cfgs)
    if len(logs) != len(cfgs):
        raise ValueError(f"got {len(logs)} log callbacks for {len(cfgs)} configs")
    lead = cfgs[0]
    device = resolve_device(lead.device)
    bf16 = use_bf16(lead.precision, device)
    # Impossible configs (k > d_sae, bad prefixes) fail here, before any data is read.
    sae_cfgs = [c.sae_config(d_model) for c in cfgs]
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    fingerprint = checkpoint_fingerprint(d_model, cfgs, data)
    state = read_checkpoint_state(ckpt_dir) if ckpt_dir is not None and resume else None
    why = why_not_resume(state.get("fingerprint"), fingerprint) if state is not None else None
    if why is not None:
        if resume is True:
            raise ValueError(
                f"checkpoint {ckpt_dir} was written for other configs or data ({why}); "
                "delete it or pass resume=False"
            )
        print(f"{why}: starting over (checkpoint {ckpt_dir})")
        state = None
    if resume is True and state is None:
        raise ValueError(f"resume=True but there is no checkpoint in {checkpoint_dir}")

    members = []
    for cfg, sae_cfg, log in zip(cfgs, sae_cfgs, logs, strict=True):
        sae = SAE(sae_cfg, generator=torch.Generator().manual_seed(cfg.seed))
        sae.sparse_kernels = cfg.sparse_kernels
        members.append(_Member(cfg, sae, log))

    first: Iterable[Tensor] | None = None
    if state is None:
        batches0 = [norm_sample(lead.norm_max_tokens)] if norm_sample else make_batches(0)
        sample = take_tokens(batches0, lead.norm_max_tokens)
        if sample.shape[1] != d_model:
            raise ValueError(f"batches have width {sample.shape[1]}, but d_model={d_model}")
        mean_d, scale = _normalisation_of(sample)
        b_dec = None
        if any(c.b_dec_init == "geometric_median" for c in cfgs):
            # Weiszfeld is O(n) per iteration: 16k tokens pin the median well enough.
            b_dec = geometric_median(((sample[:16384] - mean_d.double()) * scale).float())
        for m in members:
            m.sae.set_normalisation(mean_d, scale)
            if m.cfg.b_dec_init == "geometric_median":
                with torch.no_grad():
                    m.sae.b_dec.copy_(b_dec)
        first = make_batches(0)
        if n_steps is None:
            try:
                per_epoch = len(first)  # type: ignore[arg-type]
            except TypeError:  # a generator: count one epoch, then ask for a fresh one
                per_epoch, first = sum(1 for _ in first), make_batches(0)
            n_steps = per_epoch * lead.n_epochs
        step, epoch0, skip, n_tokens = 0, 0, 0, 0
    else:
        if n_steps is not None and n_steps != state["n_steps"]:
            raise ValueError(f"n_steps={n_steps} but the checkpoint has {state['n_steps']}")
        n_steps = int(state["n_steps"])
        step, epoch0, skip = int(state["step"]), int(state["epoch"]), int(state["batch"])
        n_tokens = int(state["n_tokens"])
    if n_steps < 1:
        raise ValueError("make_batches produced no batches")
    for m in members:
        m.sae.to(device).train()
        # Adam's state must sit with the parameters; rebuild after the move.
        m.opt = make_adam(m.sae, lr_at(0, n_steps, m.cfg), device)
    if state is not None:
        _restore(ckpt_dir, members, device)  # type: ignore[arg-type]
        print(f"resuming from step {step} of {n_steps} (checkpoint {ckpt_dir})")
    resumed_from, tokens_before = step, n_tokens

    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    t0 = time.perf_counter()
    bar = tqdm(total=n_steps, initial=step, desc="train SAE", disable=not progress, unit="step")
    for epoch in range(epoch0, lead.n_epochs):
        batches = first if (epoch == 0 and first is not None) else make_batches(epoch)
        for m in members:
            if epoch != epoch0 or skip == 0:
                m.running = _Running()
        for i_batch, x_bd in enumerate(batches):
            if epoch == epoch0 and i_batch < skip:
                continue  # trained on before the checkpoint: same order, so skip it
            x_bd = _checked(x_bd, d_model, device)
            for m in members:
                _train_step(m, x_bd, step, n_steps, autocast)
            n_tokens += x_bd.shape[0]
            for m in members:
                if step % m.cfg.log_every == 0 or step == n_steps - 1:
                    _report(m, step)
            bar.update(1)
            step += 1
            if ckpt_dir is not None and lead.checkpoint_every and step % lead.checkpoint_every == 0:
                position = {"step": step, "epoch": epoch, "batch": i_batch + 1}
                _write_checkpoint(
                    ckpt_dir,
                    members,
                    {
                        "fingerprint": fingerprint,
                        "n_steps": n_steps,
                        "n_tokens": n_tokens,
                        **position,
                    },
                )
        skip = 0
    bar.close()
    if step == 0:
        raise ValueError("make_batches produced no batches")
    seconds = time.perf_counter() - t0
    results = []
    for m in members:
        if m.logged != step - 1 and m.metrics:
            _report(m, step - 1)
        m.sae.eval()
        summary: dict[str, Any] = {
            "n_steps": step,
            "n_tokens": n_tokens,
            "d_model": d_model,
            "d_sae": m.sae.cfg.d_sae,
            "norm_scale": float(m.sae.norm_scale),
            "dead_frac": float(m.sae.dead_mask().float().mean()),
            "resumed_from_step": resumed_from,
            "train_seconds": seconds,
            "tokens_per_s": (n_tokens - tokens_before) / seconds if seconds > 0 else float("nan"),
            "bf16": bf16,
            **{f"last_epoch_{k}": v for k, v in m.running.means().items()},
        }
        results.append((m.sae, summary))
    return results


def make_adam(sae: SAE, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam over the SAE's parameters, fused into one kernel per tensor on CPU and CUDA (about
    2x faster a step than the per-op default at d_sae 1,024; the same update up to rounding)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(sae.parameters(), lr=lr, fused=fused or None)


def _train_step(
    m: _Member, x_bd: Tensor, step: int, n_steps: int, autocast: contextlib.AbstractContextManager
) -> None:
    cfg, sae, opt = m.cfg, m.sae, m.opt
    for group in opt.param_groups:
        group["lr"] = lr_at(step, n_steps, cfg)
    with autocast:
        out = sae(x_bd, sparsity_coeff=sparsity_coeff_at(step, cfg), dense_f=False)
    opt.zero_grad(set_to_none=True)
    out.loss.float().backward()
    sae.remove_parallel_grads()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    opt.step()
    sae.normalise_decoder()
    sae.record_firing(out.fired, x_bd.shape[0])
    with torch.no_grad():
        m.metrics = _batch_metrics(x_bd, out)
    m.running.add(m.metrics, x_bd.shape[0])


def _report(m: _Member, step: int) -> None:
    values = {k: float(v) for k, v in m.metrics.items()}
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(f"training loss is {values['loss']} at step {step}")
    values["dead_frac"] = float(m.sae.dead_mask().float().mean())
    values["lr"] = m.opt.param_groups[0]["lr"]
    values["sparsity_coeff"] = sparsity_coeff_at(step, m.cfg)
    m.log(values, step)
    m.logged = step


def train_sae(
    make_batches: Callable[[int], Iterable[Tensor]],
    d_model: int,
    cfg: TrainConfig,
    log: LogFn = noop_log,
    progress: bool = True,
    n_steps: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool | Literal["auto"] = "auto",
) -> tuple[SAE, dict[str, Any]]:
    """Train one SAE (a sweep of one; see `train_saes`); returns it in eval mode and a summary."""
    [(sae, summary)] = train_saes(
        make_batches, d_model, [cfg], [log], progress, n_steps, checkpoint_dir, resume
    )
    return sae, summary


def _batch_metrics(x_bd: Tensor, out: Any) -> dict[str, Tensor]:
    """Training-batch metrics; FVU against the batch mean (scale-free, so any space gives it)."""
    x_hat = out.x_hat.float()
    err = (x_bd - x_hat).pow(2).sum()
    var = (x_bd - x_bd.mean(dim=0)).pow(2).sum()
    return {
        "loss": out.loss.detach().float(),
        "mse": out.mse.detach().float(),
        "l1": out.l1.detach().float(),
        "aux": out.aux.detach().float(),
        "sparsity": out.sparsity.detach().float(),
        "l0": out.l0.float(),
        "fvu": err / var.clamp_min(1e-12),
    }


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
