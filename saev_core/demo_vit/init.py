"""The demo ViT, its image processor and its starting weights.

`build_classifier`, `build_processor`; the starting weights that made shape learnable
(`local_attention_init`, `pca_patch_embedding_init`, `sincos_position_embeddings`) and
`_vit_like_init`, which applies them to any ViT-shaped model (the MAE encoder, and the ViT
whose numbers `clip._clip_vision_init` copies into CLIP's vision tower).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from saev_core.demo_vit.config import BackboneConfig

from saev_core.backbone.hooks import find_blocks


def sincos_position_embeddings(d_model: int, grid: int) -> torch.Tensor:
    """2-D sin-cos position embeddings [1, 1 + grid^2, d_model] with a zero row for CLS.

    As in MAE (He et al. 2022): half the channels encode the column, half the row, each as
    sin/cos at d_model/4 frequencies from 1 down to 1/10000.
    """
    import torch

    quarter = d_model // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for pos in (cols.reshape(-1), rows.reshape(-1)):
        angles = pos[:, None] * omega[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    pe = torch.cat([torch.zeros(1, d_model, dtype=torch.float64), torch.cat(parts, dim=1)])
    return pe[None].float()


# Offsets (rows, columns) of the neighbour each head starts looking at: head h of block l takes
# entry (l * n_heads + h) mod 8, so 4 heads cover the 4-neighbourhood in even blocks and the
# diagonals in odd ones; two blocks together see a 3x3 patch window, like a 3x3 convolution.
NEIGHBOURS = ((0, -1), (0, 1), (-1, 0), (1, 0), (-1, -1), (-1, 1), (1, -1), (1, 1))


def local_attention_init(model: Any, grid: int, sharpness: float = 1.0) -> None:
    """Start each attention head of a ViT looking at one neighbouring patch.

    Why: a ViT from scratch has no notion of "next to"; on the shapes world it learned colour at
    once but shape only slowly. Starting attention as a convolution (Cordonnier et al. 2020, "On
    the relationship between self-attention and convolutional layers"; Zheng et al. 2024,
    "convolutional initialization" of ViTs) raised the worst shape's val accuracy from 0.90 to
    0.96 in the same 8 epochs (module docstring). Only the initial weights change; the
    architecture stays a plain `ViTForImageClassification`.

    How: position embeddings become Fourier features of the patch's column x and row y at
    frequencies w_k = k pi / grid (k = 1..K), as [sin, cos] pairs, followed by their negatives
    so that every token has mean 0 and LayerNorm only rescales them. For a head with offset
    (dy, dx), W_k copies these features and W_q rotates each pair by the phase w_k dx (or w_k dy),
    so that q_i . k_j = sum_k cos(w_k (x_j - x_i - dx)) + cos(w_k (y_j - y_i - dy)), a Dirichlet
    kernel that peaks where patch j is patch i moved by the offset. Other weights keep
    transformers' initialisation; CLS keeps a zero position embedding.
    """
    import torch

    config = model.config
    d_model, n_heads = config.hidden_size, config.num_attention_heads
    d_head = d_model // n_heads
    n_freq = min(grid, d_head // 4, d_model // 8)
    n_feat = 4 * n_freq  # [sin, cos] x n_freq for columns, then for rows
    if n_freq < 1:
        raise ValueError(f"local attention init needs d_model // n_heads >= 4, got {d_head}")
    w = torch.arange(1, n_freq + 1, dtype=torch.float64) * math.pi / grid
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    feats = []
    for pos in (cols.reshape(-1), rows.reshape(-1)):
        angle = pos[:, None] * w[None, :]
        feats.append(
            torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1).reshape(-1, 2 * n_freq)
        )
    fourier = torch.cat(feats, dim=1)  # [grid^2, n_feat]
    pe = torch.zeros(1 + grid * grid, d_model, dtype=torch.float64)
    pe[1:, :n_feat] = fourier
    pe[1:, n_feat : 2 * n_feat] = -fourier

    vit = getattr(model, "vit", model)
    with torch.no_grad():
        vit.embeddings.position_embeddings.copy_(pe[None].float())
        for li, block in enumerate(find_blocks(vit, config.num_hidden_layers)):
            q_w, k_w = block.attention.q_proj.weight, block.attention.k_proj.weight
            q_w[:, :n_feat] = 0.0
            k_w[:, :n_feat] = 0.0
            for h in range(n_heads):
                dy, dx = NEIGHBOURS[(li * n_heads + h) % len(NEIGHBOURS)]
                rot = torch.zeros(n_feat, n_feat, dtype=torch.float64)
                for axis, delta in ((0, dx), (1, dy)):
                    for f in range(n_freq):
                        i = 2 * (axis * n_freq + f)
                        c, s = math.cos(w[f] * delta), math.sin(w[f] * delta)
                        # [sin a, cos a] -> [sin(a + phase), cos(a + phase)]
                        rot[i : i + 2, i : i + 2] = torch.tensor(
                            [[c, s], [-s, c]], dtype=torch.float64
                        )
                out = slice(h * d_head, h * d_head + n_feat)
                q_w[out, :n_feat] = (sharpness * rot).float()
                k_w[out, :n_feat] = torch.eye(n_feat)


def pca_patch_embedding_init(model: Any, pixel_values: torch.Tensor, patch_size: int) -> None:
    """Start the patch embedding as PCA whitening of patches from `pixel_values` [n, 3, H, W].

    Why: raw patches vary most in their mean colour; a random projection passes that on and
    hides the low-variance directions that carry edges and corners (shape). Whitening gives every
    one of the top-d_model principal directions unit variance from the first step.
    """
    import torch

    vit = getattr(model, "vit", model)
    proj = vit.embeddings.patch_embeddings.projection
    d_model = proj.out_channels
    n, c, h, w = pixel_values.shape
    patches = pixel_values.double().reshape(
        n, c, h // patch_size, patch_size, w // patch_size, patch_size
    )
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(-1, c * patch_size * patch_size)
    mean = patches.mean(dim=0)
    cov = torch.cov((patches - mean).T)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    top = evecs[:, -d_model:].flip(-1).T  # [d_model, c * p * p], largest variance first
    scale = 1.0 / torch.sqrt(evals[-d_model:].flip(-1) + 1e-3)
    weight = top * scale[:, None]
    with torch.no_grad():
        proj.weight.copy_(weight.reshape(d_model, c, patch_size, patch_size).float())
        proj.bias.copy_((-weight @ mean).float())


def build_classifier(cfg: BackboneConfig) -> Any:
    """A freshly initialised multi-label `ViTForImageClassification` over the 8 concepts."""
    from transformers import ViTConfig, ViTForImageClassification

    from saev_core.shapes.config import CONCEPTS

    config = ViTConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        problem_type="multi_label_classification",
        id2label=dict(enumerate(CONCEPTS)),
        label2id={c: i for i, c in enumerate(CONCEPTS)},
    )
    return ViTForImageClassification(config)


def build_processor(image_size: int) -> Any:
    """The image processor saved with the demo ViT: resize to `image_size`, scale to [-1, 1]."""
    try:  # transformers 5 without torchvision: the PIL processor, named directly to stay quiet
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - other transformers builds
        from transformers import ViTImageProcessor as Processor
    return Processor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def _vit_like_init(cfg: BackboneConfig, model: Any, pixels: torch.Tensor) -> None:
    """The supervised ViT's starting weights (`cfg.init`, `cfg.patch_init`) on a ViT-shaped
    model: a `ViTModel`, or a model holding one as `.vit` (ViTMAEForPreTraining)."""
    import torch

    grid = cfg.image_size // cfg.patch_size
    if cfg.patch_init == "pca":
        pca_patch_embedding_init(model, pixels, cfg.patch_size)
    if cfg.init == "sincos":
        with torch.no_grad():
            getattr(model, "vit", model).embeddings.position_embeddings.copy_(
                sincos_position_embeddings(cfg.hidden_size, grid)
            )
    elif cfg.init == "local":
        local_attention_init(model, grid, cfg.attn_sharpness)
