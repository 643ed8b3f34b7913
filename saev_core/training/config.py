"""The train stage's configuration: `TrainConfig` (params.yaml `train.sae`), sweeps of them.

`sweep_configs` builds a sweep's members from overrides of a base config; `check_shared` refuses
members that disagree on `SHARED_FIELDS` (they share one pass over the data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

from saev_core.config import from_dict
from saev_core.sae.config import ARCHS, K_SPARSE, SAEConfig

LogFn = Callable[[dict[str, float], int], None]


# Fields every member of a sweep must share: they describe the one pass over the data.
SHARED_FIELDS = ("batch_size", "n_epochs", "norm_max_tokens", "device", "precision")


def noop_log(metrics: dict[str, float], step: int) -> None:
    """The default `log` callback: records nothing."""


@dataclass(frozen=True)
class TrainConfig:
    """`params.yaml` section `train.sae`: one SAE's architecture and optimisation."""

    arch: Literal["relu", "topk", "batchtopk", "jumprelu", "matryoshka"] = "topk"
    "SAE architecture (see saev_core/sae/): 'relu' (+L1), 'topk', 'batchtopk', 'jumprelu', 'matryoshka'."
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
