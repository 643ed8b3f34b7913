"""The SAE's configuration: `SAEConfig` (architecture and loss hyperparameters), `SAEOutput`
(what `SAE.forward` returns), the architecture names and the checkpoint file names."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor

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
