"""The "clip" objective's parts: caption tokenizer, image processor, the `CLIPModel` with the demo
ViT as vision tower, its starting weights, captions, the contrastive loss and retrieval eval.

`objectives.train_objective` trains it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from saev_core.demo_vit.config import BackboneConfig

from saev_core.demo_vit.init import _vit_like_init

TEXT_LAYERS = 2
"""Blocks of CLIP's text tower (same width, heads and MLP as the vision tower)."""


MAX_TEXT_TOKENS = 32
"""CLIP text positions: the longest forms-world caption is about 20 tokens with BOS and EOS."""


PROJECTION_DIM = 64
"""Width of CLIP's joint image-text embedding."""


TOKENIZER_VOCAB = 512
"""Upper bound on the caption tokenizer's vocabulary: 256 byte symbols, 2 specials, merges."""


def caption_tokenizer(captions: list[str]) -> Any:
    """A `CLIPTokenizer` (CLIP's normaliser, pre-tokeniser and BOS/EOS) whose byte-level BPE
    vocabulary and merges are trained on `captions`, offline and deterministically.

    Every byte is in the vocabulary, so any text encodes; words frequent in the captions become
    single tokens. BOS is id 0 and EOS (also the pad token) id 1: CLIP's text tower pools at the
    first EOS, and treats an eos_token_id of 2 as a legacy checkpoint.
    """
    import tempfile

    from tokenizers import pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    if not captions:
        raise ValueError("caption_tokenizer needs at least one caption")
    base = CLIPTokenizer()
    specials = [base.bos_token, base.eos_token]
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    backend = base.backend_tokenizer
    backend.train_from_iterator(sorted(captions), trainer)
    with tempfile.TemporaryDirectory() as tmp:
        backend.model.save(tmp)
        # BpeTrainer numbers the word-final symbols ("a</w>") in the order it meets them in a
        # hash map, new on every call (huggingface/tokenizers#1794); the merges and the tokens
        # are the same every time. Number them here: the specials, the base symbols sorted, then
        # each merge's result in merge order.
        vocab_path = Path(tmp, "vocab.json")
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = Path(tmp, "merges.txt").read_text(encoding="utf-8").splitlines()
        merged = ["".join(line.split(" ")) for line in lines if line and not line.startswith("#")]
        symbols = sorted(set(vocab) - set(specials) - set(merged))
        order = dict.fromkeys(specials + symbols + merged)
        if set(order) != set(vocab):  # pragma: no cover - a tokenizers release saving otherwise
            raise RuntimeError(f"caption_tokenizer: merges.txt and vocab.json disagree in {tmp}")
        vocab_path.write_text(json.dumps({t: i for i, t in enumerate(order)}), encoding="utf-8")
        tok = CLIPTokenizer(
            vocab=str(vocab_path),
            merges=os.path.join(tmp, "merges.txt"),
            model_max_length=MAX_TEXT_TOKENS,
        )
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1), (tok.bos_token_id, tok.eos_token_id)
    return tok


def clip_image_processor(image_size: int) -> Any:
    """CLIP's image processor set to the demo ViT's preprocessing: `image_size` px, [-1, 1]."""
    try:  # transformers 5 without torchvision: the PIL processor, named directly to stay quiet
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - other transformers builds
        from transformers import CLIPImageProcessor as Processor
    return Processor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def build_clip(cfg: BackboneConfig, tokenizer: Any) -> Any:
    """A freshly initialised `CLIPModel`: the demo ViT's size as vision tower, a small text tower."""
    from transformers import CLIPConfig, CLIPModel

    common = dict(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        dropout=0.0,
        attention_dropout=0.0,
    )
    vision = dict(
        common,
        num_hidden_layers=cfg.num_hidden_layers,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    text = dict(
        common,
        num_hidden_layers=TEXT_LAYERS,
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_TEXT_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPModel(
        CLIPConfig(vision_config=vision, text_config=text, projection_dim=PROJECTION_DIM)
    )


def _clip_vision_init(cfg: BackboneConfig, clip: Any, pixels: torch.Tensor) -> None:
    """Copy the supervised ViT's starting weights into CLIP's vision tower.

    A `ViTModel` of the same size is initialised by `_vit_like_init`; its position embeddings
    and attention query/key weights (for init "local" or "sincos") and its PCA patch embedding
    (for patch_init "pca") are copied. CLIP's patch convolution has no bias, so the PCA bias
    (the same for every patch) goes into the patch tokens' position embeddings, which add the
    same way. The rest keeps CLIP's own initialisation.
    """
    import torch
    from transformers import ViTConfig, ViTModel

    from saev_core.backbone.hooks import find_blocks

    vit = ViTModel(
        ViTConfig(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
        ),
        add_pooling_layer=False,
    )
    _vit_like_init(cfg, vit, pixels)
    emb = clip.vision_model.embeddings
    with torch.no_grad():
        pe = emb.position_embedding.weight.clone()
        if cfg.init != "transformers":
            pe.copy_(vit.embeddings.position_embeddings[0])
            blocks = find_blocks(clip.vision_model, cfg.num_hidden_layers)
            vit_blocks = find_blocks(vit, cfg.num_hidden_layers)
            for block, vit_block in zip(blocks, vit_blocks, strict=True):
                for name in ("q_proj", "k_proj"):
                    src, dst = getattr(vit_block.attention, name), getattr(block.self_attn, name)
                    dst.weight.copy_(src.weight)
                    dst.bias.copy_(src.bias)
        if cfg.patch_init == "pca":
            proj = vit.embeddings.patch_embeddings.projection
            emb.patch_embedding.weight.copy_(proj.weight)
            pe[1:] += proj.bias
        emb.position_embedding.weight.copy_(pe)


def _captions_for(data_dir: Path, ids: list[int]) -> list[str]:
    from saev_core.shapes.world import read_captions

    captions = read_captions(data_dir)
    missing = [i for i in ids if i not in captions]
    if missing:
        raise ValueError(
            f"{data_dir}: no caption for image_id(s) {missing[:5]} (of {len(missing)})"
        )
    return [captions[i] for i in ids]


def _caption_ids(captions: list[str]) -> Any:
    import torch

    index = {c: i for i, c in enumerate(sorted(set(captions)))}
    return torch.tensor([index[c] for c in captions])


def clip_embeddings(
    model: Any, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text embeddings of a CLIPModel ([n, d] each)."""
    import torch.nn.functional as F

    img = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
    txt = model.text_projection(
        model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    )
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def contrastive_loss(
    img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, caption_ids: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with every pair of identical captions a positive.

    `caption_ids` [n] numbers the distinct captions; image i's target is uniform over the texts
    whose caption equals its own (with no repeats this is CLIP's identity target).
    """
    import torch.nn.functional as F

    logits = logit_scale.exp().clamp(max=100.0) * img @ txt.T
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _clip_eval(model: Any, pixels: Any, tokens: dict, caption_ids: Any, device: str) -> dict:
    """Val retrieval: for each image, is its own caption the best of the distinct captions?"""
    import torch

    from saev_core.demo_vit.data import _normalise

    with torch.inference_mode():
        imgs, txts = [], []
        for s in range(0, len(pixels), 128):
            i, t = clip_embeddings(
                model,
                _normalise(pixels[s : s + 128].to(device)),
                tokens["input_ids"][s : s + 128].to(device),
                tokens["attention_mask"][s : s + 128].to(device),
            )
            imgs.append(i.cpu())
            txts.append(t.cpu())
        img, txt = torch.cat(imgs), torch.cat(txts)
        sim = img @ txt.T
        same = caption_ids[:, None] == caption_ids[None, :]
        # one text per distinct caption: its first occurrence
        first = {}
        for j, c in enumerate(caption_ids.tolist()):
            first.setdefault(c, j)
        cols = torch.tensor(list(first.values()))
        best = cols[sim[:, cols].argmax(dim=1)]
        top1 = (caption_ids[best] == caption_ids).float().mean()
        matched = sim[same].mean()
        mismatched = sim[~same].mean() if (~same).any() else torch.tensor(float("nan"))
    return {
        "val_caption_top1": float(top1),
        "val_n_captions": len(first),
        "val_matched_similarity": float(matched),
        "val_mismatched_similarity": float(mismatched),
    }
