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
of 16k latents); `sparse_kernels = False` keeps the dense reference path
(`SAE.forward` in `model.py`).

Shapes: `x_bd` is [batch, d_model], `f_bs` is [batch, d_sae]. The SAE owns its input
normalisation (paper: "inputs are mean-centred and scaled so the average norm is sqrt(d)"):
`encode` normalises and `decode` un-normalises, so `decode(encode(x))` compares with `x` directly
and a loaded checkpoint needs no hidden constants (the paper's code lost them; see PAPER.md).
All loss terms are computed in the normalised space. `encode` is always the inference path
(batch-independent); only `forward` in training mode uses the batch-coupled training activation.

A checkpoint is a directory with `sae.safetensors` (every parameter and buffer) and `cfg.json`
(the `SAEConfig`, the normalisation constants and any `extra` the caller records). No pickle.

- `config`: `SAEConfig`, `SAEOutput`, `ARCHS`, `K_SPARSE`, `DENSE_AUX_FACTOR` and the checkpoint
  names `WEIGHTS_NAME`, `CFG_NAME`, `FORMAT_VERSION`.
- `model`: `SAE` (the `nn.Module`) and the JumpReLU straight-through estimators.
- `losses`: the sparse-path training losses `SAE.forward` delegates to (AuxK, Matryoshka).
- `checkpoint`: `SAE.save` / `SAE.load` / `SAE.load_tensors`, the checkpoint files.
- `checks`: provenance checks of an SAE against shards, a backbone and stats
  (`activation_space`, `sae_sha256`, `check_sae_matches`, `check_sae_model`,
  `check_stats_match`).
"""

# ruff: noqa: F401  (re-exports: the public names of saev_core.sae)
from .checks import (
    activation_space,
    check_sae_matches,
    check_sae_model,
    check_stats_match,
    sae_sha256,
)
from .config import (
    ARCHS,
    CFG_NAME,
    DENSE_AUX_FACTOR,
    FORMAT_VERSION,
    K_SPARSE,
    WEIGHTS_NAME,
    SAEConfig,
    SAEOutput,
)
from .model import SAE
