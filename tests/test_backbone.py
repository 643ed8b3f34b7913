"""Tests for backbone loading, block hooks and the demo ViT training, on tiny models."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from saev_core import demo_vit as dv  # noqa: E402
from saev_core.backbone import (  # noqa: E402
    classifier_blocks,
    load_backbone,
    load_classifier,
    preprocess,
    record_blocks,
    resolve_layer,
)
from saev_core.demo_vit import BackboneConfig, auroc  # noqa: E402
from saev_core.demo_vit import data as dv_data  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


def save_vit(path: Path, classifier: bool = False) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(**TINY, image_size=32, patch_size=8, num_labels=3)
    model = ViTForImageClassification(config) if classifier else ViTModel(config)
    model.save_pretrained(path)
    dv.build_processor(32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_vit(tmp_path_factory.mktemp("vit"))


def test_load_vit_and_layout(vit_dir: Path) -> None:
    backbone = load_backbone(str(vit_dir), device="cpu")
    assert backbone.n_layers == 2 and len(backbone.blocks) == 2
    assert backbone.d_model == 32
    assert backbone.n_prefix_tokens == 1
    assert backbone.grid == (4, 4) and backbone.n_patches == 16 and backbone.n_tokens == 17
    assert backbone.patch_size == 8 and backbone.image_size == (32, 32)
    assert not backbone.model.training
    expected = hashlib.sha256((vit_dir / "model.safetensors").read_bytes()).hexdigest()
    assert backbone.weights_sha256 == expected


@pytest.mark.parametrize("layer", [0, 1, -1, -2])
def test_record_blocks_matches_hidden_states(vit_dir: Path, layer: int) -> None:
    backbone = load_backbone(str(vit_dir), device="cpu")
    x = preprocess(backbone, images(3))
    assert x.shape == (3, 3, 32, 32)
    with torch.no_grad(), record_blocks(backbone, [layer]) as acts:
        out = backbone.model(pixel_values=x, output_hidden_states=True)
    i = resolve_layer(layer, 2)
    assert list(acts) == [i]
    assert acts[i].shape == (3, 17, 32)
    torch.testing.assert_close(acts[i], out.hidden_states[i + 1])
    # Hooks are gone after the block: a new forward pass does not touch the dict.
    acts.clear()
    with torch.no_grad():
        backbone.model(pixel_values=x)
    assert acts == {}


def test_record_blocks_handles_tuple_outputs() -> None:
    class TupleBlock(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
            return x * 2, None

    blocks = torch.nn.ModuleList([TupleBlock(), TupleBlock()])
    with record_blocks(blocks, [0, -1]) as acts:
        x = torch.ones(1, 2, 3)
        for block in blocks:
            x = block(x)[0]
    torch.testing.assert_close(acts[0], torch.full((1, 2, 3), 2.0))
    torch.testing.assert_close(acts[1], torch.full((1, 2, 3), 4.0))


def test_resolve_layer() -> None:
    assert resolve_layer(-1, 4) == 3
    assert resolve_layer(-4, 4) == 0
    assert resolve_layer(2, 4) == 2
    with pytest.raises(ValueError, match="layer 4 out of range"):
        resolve_layer(4, 4)
    with pytest.raises(ValueError, match="-5"):
        resolve_layer(-5, 4)


def test_dinov2_with_registers(tmp_path: Path) -> None:
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(**TINY, image_size=32, patch_size=8, num_register_tokens=4)
    Dinov2WithRegistersModel(config).save_pretrained(tmp_path)
    # DINOv2's processor shape: resize the short side, then centre-crop (here to 32 px).
    BitImageProcessor(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    ).save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path), device="cpu")
    assert backbone.n_prefix_tokens == 5  # CLS + 4 registers
    assert backbone.grid == (4, 4) and backbone.n_tokens == 21
    with torch.no_grad(), record_blocks(backbone, [-1]) as acts:
        out = backbone.model(
            pixel_values=preprocess(backbone, images(2, 48)), output_hidden_states=True
        )
    torch.testing.assert_close(acts[1], out.hidden_states[2])


def test_clip_vision_and_full_clip(tmp_path: Path) -> None:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
    )

    vision = CLIPVisionConfig(**TINY, image_size=32, patch_size=8)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPVisionModel(vision).save_pretrained(tmp_path / "vision")
    processor.save_pretrained(tmp_path / "vision")
    full = CLIPConfig(
        vision_config=vision.to_dict(),
        text_config=dict(TINY, vocab_size=99, max_position_embeddings=16),
        projection_dim=16,
    )
    CLIPModel(full).save_pretrained(tmp_path / "full")
    processor.save_pretrained(tmp_path / "full")
    for sub in ("vision", "full"):
        backbone = load_backbone(str(tmp_path / sub), device="cpu")
        assert backbone.n_prefix_tokens == 1
        assert backbone.n_layers == 2 and backbone.d_model == 32 and backbone.grid == (4, 4)
        # The text tower (also 2 layers) must not be mistaken for the blocks.
        assert "CLIPEncoderLayer" in type(backbone.blocks[0]).__name__
        assert backbone.blocks[0].self_attn.embed_dim == 32


def test_siglip_has_no_prefix(tmp_path: Path) -> None:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(**TINY, image_size=32, patch_size=8)).save_pretrained(
        tmp_path
    )
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path), device="cpu")
    assert backbone.n_prefix_tokens == 0 and backbone.n_tokens == 16


def test_classifier_blocks_are_backbone_blocks(tmp_path: Path) -> None:
    path = save_vit(tmp_path, classifier=True)
    model, id2label = load_classifier(path, device="cpu")
    assert id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    backbone = load_backbone(str(path), device="cpu")
    x = preprocess(backbone, images(2))
    with torch.no_grad():
        with record_blocks(classifier_blocks(model), [1]) as from_classifier:
            model(pixel_values=x)
        with record_blocks(backbone, [1]) as from_backbone:
            backbone.model(pixel_values=x)
    torch.testing.assert_close(from_classifier[1], from_backbone[1])


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        load_backbone(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_classifier(tmp_path / "nope")


def test_auroc_against_pairs() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4])
    labels = np.array([0, 0, 1, 1, 1])
    pairs = [
        1.0 if s > t else 0.5 if s == t else 0.0
        for s, ls in zip(scores, labels, strict=True)
        for t, lt in zip(scores, labels, strict=True)
        if ls == 1 and lt == 0
    ]
    assert auroc(scores, labels) == pytest.approx(np.mean(pairs))
    assert np.isnan(auroc(scores, np.ones(5)))


def test_backbone_config_checks() -> None:
    with pytest.raises(ValueError, match="num_attention_heads"):
        BackboneConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        BackboneConfig(image_size=60, patch_size=8)
    with pytest.raises(ValueError, match="layer 7"):
        BackboneConfig(aux_layers=(7,))
    with pytest.raises(ValueError, match="init"):
        BackboneConfig(init="xavier")


def test_local_attention_init_looks_at_neighbours() -> None:
    cfg = BackboneConfig(**TINY, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = dv.build_classifier(cfg)
    dv.local_attention_init(model, grid=4)
    # Position embeddings alone (no image content) decide where each head looks.
    pe = model.vit.embeddings.position_embeddings.detach()
    block = model.vit.layers[0]
    x = block.layernorm_before(pe)[0]
    q = block.attention.q_proj(x).view(17, 2, 16).transpose(0, 1)
    k = block.attention.k_proj(x).view(17, 2, 16).transpose(0, 1)
    attn = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1)  # [heads, 17, 17]
    query = 1 + 1 * 4 + 1  # patch (row 1, col 1)
    for h, (dy, dx) in enumerate(dv.NEIGHBOURS[:2]):
        target = 1 + (1 + dy) * 4 + (1 + dx)
        assert attn[h, query].argmax().item() == target
        assert attn[h, query, target] > 0.5


def test_pca_patch_init_whitens_patches() -> None:
    cfg = BackboneConfig(**TINY, image_size=32, patch_size=8)
    model = dv.build_classifier(cfg)
    rng = np.random.default_rng(0)
    # Correlated pixels, as in images: smooth noise plus a per-image colour.
    base = rng.normal(size=(200, 3, 4, 4)).repeat(8, axis=2).repeat(8, axis=3)
    pixels = torch.from_numpy(base + 0.3 * rng.normal(size=(200, 3, 32, 32))).float()
    dv.pca_patch_embedding_init(model, pixels, 8)
    with torch.no_grad():
        emb = model.vit.embeddings.patch_embeddings.projection(pixels)  # [n, 32, 4, 4]
    feats = emb.permute(0, 2, 3, 1).reshape(-1, 32).double()
    torch.testing.assert_close(
        feats.mean(0), torch.zeros(32, dtype=torch.float64), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(
        torch.cov(feats.T), torch.eye(32, dtype=torch.float64), atol=2e-2, rtol=0
    )


def test_patch_class_fractions_by_hand() -> None:
    class_map = torch.zeros((1, 16, 16), dtype=torch.uint8)
    class_map[0, 0:8, 0:4] = 2  # patch 0: half class 2
    class_map[0, 8:16, 8:16] = 1  # patch 3: all class 1
    class_map[0, 8:10, 8:16] = 3  # ... but a quarter of it class 3
    got = dv.patch_class_fractions(class_map, 8, 4)
    expected = torch.tensor([[[0.5, 0, 0.5, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0.75, 0, 0.25]]])
    torch.testing.assert_close(got, expected)


def test_augment_moves_pixels_and_classes_together() -> None:
    pixels = torch.zeros((2, 3, 16, 16), dtype=torch.uint8)
    maps = torch.zeros((2, 2, 16, 16), dtype=torch.uint8)
    pixels[:, :, 5:9, 2:6] = 200  # one object per image, 2 px from the left border
    maps[:, :, 5:9, 2:6] = 1
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        p, m = dv_data._augment(pixels, maps, torch.tensor([True, False]), 4, gen)
        assert torch.equal(p[:, 0] == 200, m[:, 0] == 1)  # still aligned
        assert int(m[:, 0].sum()) == 2 * 16  # nothing cut off at the border
        cols = m[1, 0].any(0).nonzero().flatten()
        assert int(cols.min()) >= 0 and int(cols.max()) <= 9  # shift <= 4 (and >= -2 here)
    p, m = dv_data._augment(pixels, maps, torch.tensor([True, False]), 0, gen)
    assert torch.equal(m[0, 0], maps[0, 0].flip(-1)) and torch.equal(p[1], pixels[1])


def test_processor_matches_training_normalisation() -> None:
    processor = dv.build_processor(32)
    ims = images(2)
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in ims])).permute(0, 3, 1, 2)
    expected = dv_data._normalise(pixels)
    got = processor(images=ims, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got, expected)


def test_train_backbone_tiny_world(tmp_path: Path) -> None:
    from saev_core.shapes import CONCEPTS, ShapesConfig, generate

    data = tmp_path / "shapes"
    generate(
        data,
        ShapesConfig(
            seed=1, image_size=32, min_radius=5, max_radius=9, n_train=24, n_val=8, n_test=0
        ),
        progress=False,
    )
    cfg = BackboneConfig(
        data_dir=str(data),
        out_dir=str(tmp_path / "bb"),
        **TINY,
        image_size=32,
        patch_size=8,
        epochs=1,
        batch_size=8,
        num_threads=1,
    )
    logged = []
    metrics = dv.train_backbone(cfg, log=lambda m, s: logged.append((m, s)), progress=False)
    assert set(metrics["val_accuracy"]) == set(CONCEPTS)
    assert all(0.0 <= v <= 1.0 for v in metrics["val_accuracy"].values())
    assert logged and logged[0][1] == 1
    out = tmp_path / "bb"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["val_accuracy"] == metrics["val_accuracy"]
    model, id2label = load_classifier(out, device="cpu")
    assert [id2label[i] for i in range(8)] == list(CONCEPTS)
    assert model.config.problem_type == "multi_label_classification"
    backbone = load_backbone(str(out), device="cpu")
    assert backbone.n_layers == 2 and backbone.grid == (4, 4) and backbone.n_prefix_tokens == 1
    assert backbone.weights_sha256 == metrics["weights_sha256"]
    assert not (tmp_path / "bb.tmp").exists()
    # Same config, same machine: the same weights.
    again = dv.train_backbone(
        dataclasses.replace(cfg, out_dir=str(tmp_path / "again")), progress=False
    )
    assert again["weights_sha256"] == metrics["weights_sha256"]


def test_keep_patch_order_refuses_any_masking_even_below_one_patch():
    """ViTMAE keeps int(L * (1 - r)) patches: at r = 0.01 < 1/L it still drops one (checked on
    transformers' own model), so only mask_ratio 0 is accepted."""
    from transformers import ViTMAEConfig, ViTMAEModel

    from saev_core.backbone import keep_patch_order

    cfg = ViTMAEConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, mask_ratio=0.01)  # fmt: skip
    model = ViTMAEModel(cfg).eval()
    L = (32 // 8) ** 2  # 16 patches, 1 / L = 0.0625 > 0.01
    with torch.no_grad():
        out = model(pixel_values=torch.zeros(1, 3, 32, 32)).last_hidden_state
    assert out.shape[1] == 1 + L - 1  # CLS + 15: one patch silently dropped
    with pytest.raises(ValueError, match="mask_ratio exactly 0.*got 0.01"):
        keep_patch_order(model)
    model.config.mask_ratio = 0.0
    keep_patch_order(model)
    with torch.no_grad():
        assert model(pixel_values=torch.zeros(1, 3, 32, 32)).last_hidden_state.shape[1] == 1 + L
