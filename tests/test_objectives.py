"""The demo backbones with other objectives (saev_core.demo_vit.objectives): CLIP and MAE.

Each trains on a tiny world in seconds, is saved like a hub checkpoint, and loads by hub id out
of a temporary Hugging Face cache (as in test_families) through `load_backbone`. The checks
compare with transformers' own classes (CLIPModel with AutoProcessor, a plain ViTModel holding
the MAE encoder's weights), not with our code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_families import put_in_hub_cache  # noqa: E402

from saev_core.backbone import load_backbone, preprocess, record_blocks  # noqa: E402
from saev_core.demo_vit import BackboneConfig, train_backbone  # noqa: E402

ORG = "tiny-objectives"
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    patch_size=8,
    image_size=32,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32 px shapes world of 64 train images (enough for a contrastive signal in seconds)."""
    from saev_core.shapes import ShapesConfig, generate

    out = tmp_path_factory.mktemp("objectives") / "world"
    cfg = ShapesConfig(
        seed=5, image_size=32, n_train=64, n_val=16, n_test=8, min_radius=5, max_radius=9
    )
    generate(out, cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each objective's backbone, trained on `world` and saved; also cached as `ORG/<objective>`."""
    root = tmp_path_factory.mktemp("backbones")
    out = {}
    for objective, extra in (
        ("supervised", dict(epochs=2, batch_size=16)),
        ("clip", dict(epochs=12, batch_size=16, lr=3e-3, max_shift=0, hflip=False)),
        ("mae", dict(epochs=2, batch_size=16)),
    ):
        cfg = BackboneConfig(
            data_dir=str(world),
            out_dir=str(root / "dirs" / objective),
            objective=objective,
            num_threads=1,  # on a shared, loaded machine 2 threads ran 40x slower than 1
            **TINY,
            **extra,
        )
        train_backbone(cfg, progress=False)
        put_in_hub_cache(Path(cfg.out_dir), root / "hub", f"{ORG}/{objective}")
        out[objective] = Path(cfg.out_dir)
    return out


@pytest.fixture(scope="module")
def hub(trained: dict[str, Path]) -> Iterator[None]:
    """huggingface_hub reads its cache path from `constants.HF_HUB_CACHE` on every lookup."""
    import huggingface_hub.constants

    cache = next(iter(trained.values())).parent.parent / "hub"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        yield


def world_images(world: Path, split: str = "train") -> tuple[list[Image.Image], list[int]]:
    import pandas as pd

    images = pd.read_csv(world / "images.csv").sort_values("image_id")
    images = images[images["split"] == split]
    pics = [Image.open(world / p).convert("RGB") for p in images["image"]]
    return pics, [int(i) for i in images["image_id"]]


TOWERS = {"supervised": "ViTModel", "clip": "CLIPVisionModel", "mae": "ViTMAEModel"}


@pytest.mark.parametrize("objective", TOWERS)
def test_loads_by_hub_id_with_a_grid_of_patch_tokens(
    objective: str, trained: dict[str, Path], hub: None
) -> None:
    backbone = load_backbone(f"{ORG}/{objective}", device="cpu", dtype="float32")
    assert type(backbone.model).__name__ == TOWERS[objective]
    assert not any("text" in n or "decoder" in n for n, _ in backbone.model.named_parameters())
    assert backbone.grid == (4, 4) and backbone.n_patches == 16
    assert backbone.has_cls and backbone.n_prefix_tokens == 1 and backbone.n_registers == 0
    assert backbone.d_model == 32 and backbone.n_layers == 2
    x = preprocess(backbone, [Image.new("RGB", (32, 32), (200, 30, 30))] * 3)
    with torch.no_grad(), record_blocks(backbone, [0, 1]) as acts:
        out = backbone.model(pixel_values=x)
    assert acts[1].shape == (3, 17, 32)
    assert out.last_hidden_state.shape == (3, 17, 32)


def test_config_names_a_bad_objective() -> None:
    with pytest.raises(ValueError, match="objective must be supervised, clip or mae, got 'dino'"):
        BackboneConfig(objective="dino")
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        BackboneConfig(objective="mae", mask_ratio=1.0)


def test_clip_checkpoint_loads_with_hf_classes_and_tokenizes_captions(
    trained: dict[str, Path], world: Path, hub: None
) -> None:
    from transformers import AutoProcessor, CLIPModel

    from saev_core.shapes import read_captions

    processor = AutoProcessor.from_pretrained(f"{ORG}/clip")
    assert type(processor).__name__ == "CLIPProcessor"
    captions = sorted(set(read_captions(world).values()))
    enc = processor.tokenizer(captions)
    for caption, ids in zip(captions, enc["input_ids"], strict=True):
        assert ids[0] == processor.tokenizer.bos_token_id
        assert ids[-1] == processor.tokenizer.eos_token_id
        decoded = processor.tokenizer.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ,", ",") == caption  # CLIP decodes punctuation as a word
    # Words of the captions are whole tokens of the trained vocabulary.
    for word in ("red", "circle", "and"):
        assert f"{word}</w>" in processor.tokenizer.get_vocab()
    model = CLIPModel.from_pretrained(f"{ORG}/clip").eval()
    assert model.config.text_config.eos_token_id == processor.tokenizer.eos_token_id != 2
    # The loaded vision tower is the checkpoint's: same residual stream as transformers' CLIPModel.
    backbone = load_backbone(f"{ORG}/clip", device="cpu", dtype="float32")
    pics, _ = world_images(world, "val")
    px = processor(images=pics[:4], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model.vision_model(pixel_values=px, output_hidden_states=True).hidden_states[-1]
        with record_blocks(backbone, [-1]) as acts:
            backbone.model(pixel_values=preprocess(backbone, pics[:4]))
    torch.testing.assert_close(acts[1], ref)


def test_clip_matches_images_with_their_captions(
    trained: dict[str, Path], world: Path, hub: None
) -> None:
    """After a few steps, each image is more similar to its own caption than to others, as
    scored by transformers' CLIPModel on AutoProcessor's inputs (at init the gap is ~0)."""
    from transformers import AutoProcessor, CLIPModel

    from saev_core.shapes import read_captions

    processor = AutoProcessor.from_pretrained(f"{ORG}/clip")
    model = CLIPModel.from_pretrained(f"{ORG}/clip").eval()
    pics, ids = world_images(world, "train")
    captions_of = read_captions(world)
    captions = [captions_of[i] for i in ids]
    inputs = processor(text=captions, images=pics, return_tensors="pt", padding="max_length")
    with torch.no_grad():
        sim = model(**inputs).logits_per_image.numpy()  # [images, texts]
    same = np.array([[a == b for b in captions] for a in captions])
    margin = sim[same].mean() - sim[~same].mean()
    logit_scale = float(model.logit_scale.detach().exp())
    assert margin > 0.2 * logit_scale, (margin, logit_scale)
    # Retrieval among the distinct captions beats chance by far.
    distinct = sorted(set(captions))
    first = [captions.index(c) for c in distinct]
    best = np.array(first)[sim[:, first].argmax(axis=1)]
    top1 = np.mean([captions[b] == c for b, c in zip(best, captions, strict=True)])
    assert top1 > 5 / len(distinct), (top1, len(distinct))


def _plain_vit_from_mae(path: Path) -> torch.nn.Module:
    """A transformers ViTModel holding the MAE encoder's weights: no masking, no shuffling.

    The weights come from transformers' own `ViTMAEModel.from_pretrained` (which maps the
    checkpoint's legacy names); ViTMAE's encoder and ViT share module names.
    """
    from transformers import ViTConfig, ViTMAEModel, ViTModel

    encoder = ViTMAEModel.from_pretrained(path).state_dict()
    vit = ViTModel(ViTConfig(**TINY, qkv_bias=True), add_pooling_layer=False).eval()
    missing, unexpected = vit.load_state_dict(encoder, strict=False)
    assert not unexpected and set(missing) <= {"embeddings.mask_token"}, (missing, unexpected)
    return vit


def test_mae_encoder_sees_every_patch_in_order(
    trained: dict[str, Path], world: Path, hub: None
) -> None:
    backbone = load_backbone(f"{ORG}/mae", device="cpu", dtype="float32")
    pics, _ = world_images(world, "val")
    x = preprocess(backbone, pics[:4])
    with torch.no_grad(), record_blocks(backbone, [0, 1]) as acts:
        out = backbone.model(pixel_values=x, output_hidden_states=True)
    first = {k: v.clone() for k, v in acts.items()}
    with torch.no_grad(), record_blocks(backbone, [0, 1]) as acts:
        again = backbone.model(pixel_values=x)
    # Deterministic: ViTMAE draws fresh noise on every call unless the loader fixes the order.
    torch.testing.assert_close(again.last_hidden_state, out.last_hidden_state, rtol=0, atol=0)
    assert out.mask.sum() == 0
    # The same numbers as a plain ViT with the encoder's weights (patches in row-major order).
    vit = _plain_vit_from_mae(trained["mae"])
    with torch.no_grad():
        ref = vit(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(first[0], ref.hidden_states[1])
    torch.testing.assert_close(first[1], ref.hidden_states[2])
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)


def test_mae_patch_change_moves_its_own_token_most(trained: dict[str, Path], hub: None) -> None:
    backbone = load_backbone(f"{ORG}/mae", device="cpu", dtype="float32")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for row, col in ((0, 0), (1, 2), (3, 3), (2, 0)):
        edited = base.copy()
        edited[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = (
            255 - edited[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8]
        )
        x = preprocess(backbone, [Image.fromarray(base), Image.fromarray(edited)])
        with torch.no_grad(), record_blocks(backbone, [0]) as acts:
            backbone.model(pixel_values=x)
        change = (acts[0][1] - acts[0][0]).norm(dim=-1)[1:]  # per patch token, row-major
        assert int(change.argmax()) == row * 4 + col


def test_mae_hub_checkpoint_with_its_own_mask_ratio(tmp_path: Path) -> None:
    """A facebook/vit-mae-style checkpoint (mask_ratio 0.75, ViTImageProcessor, 224-style
    processor) keeps every patch: the loader overrides the config's mask ratio."""
    from transformers import ViTImageProcessor, ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(0)
    model = ViTMAEForPreTraining(
        ViTMAEConfig(
            **TINY,
            mask_ratio=0.75,
            decoder_hidden_size=16,
            decoder_num_hidden_layers=2,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=32,
        )
    )
    model.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path), device="cpu", dtype="float32")
    assert backbone.grid == (4, 4) and backbone.n_tokens == 17
    assert backbone.model.config.mask_ratio == 0.0


@pytest.mark.parametrize("objective", TOWERS)
def test_saved_processor_feeds_what_training_saw(
    objective: str, trained: dict[str, Path], world: Path, hub: None
) -> None:
    """Training scales the world's own-size images to [-1, 1] as x / 127.5 - 1; the processor
    saved with each checkpoint must give the model the same input, or the loaded backbone would
    see other pixels than it learned from."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(f"{ORG}/{objective}")
    pics, _ = world_images(world, "val")
    got = processor(images=pics[:3], return_tensors="pt")["pixel_values"]
    expected = np.stack([np.asarray(p, dtype=np.float64).transpose(2, 0, 1) for p in pics[:3]])
    np.testing.assert_allclose(got.numpy(), expected / 127.5 - 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def forms_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny forms world (filled, outline and word objects, captions.csv) at 32 px."""
    from saev_core.shapes import FormsConfig, generate

    out = tmp_path_factory.mktemp("forms") / "world"
    cfg = FormsConfig(
        seed=1,
        image_size=32,
        n_train=8,
        n_val=4,
        n_test=2,
        min_radius=5,
        max_radius=9,
        outline_width=2,
        min_font_size=7,
        max_font_size=8,
    )
    generate(out, cfg, progress=False)
    return out


def test_supervised_labels_on_the_forms_world_are_the_plain_concepts(forms_world: Path) -> None:
    """The supervised ViT learns the 8 concepts in any form; form labels ("red:word") are not
    targets. Checked against images.csv read here with the csv module."""
    import csv

    from saev_core.demo_vit.data import _load_split
    from saev_core.shapes import CONCEPTS

    split = _load_split(forms_world, "train", progress=False)
    with (forms_world / "images.csv").open(newline="") as f:
        rows = sorted(
            (r for r in csv.DictReader(f) if r["split"] == "train"),
            key=lambda r: int(r["image_id"]),
        )
    expected = [[float(c in r["labels"].split(";")) for c in CONCEPTS] for r in rows]
    assert any(":word" in r["labels"] for r in rows)  # the world has words to skip
    np.testing.assert_array_equal(split.labels.numpy(), np.array(expected, dtype=np.float32))


@pytest.mark.parametrize("objective", TOWERS)
def test_each_objective_trains_on_the_forms_world(
    objective: str, forms_world: Path, tmp_path: Path
) -> None:
    cfg = BackboneConfig(
        data_dir=str(forms_world),
        out_dir=str(tmp_path / objective),
        objective=objective,
        epochs=1,
        batch_size=8,
        hflip=False,
        num_threads=1,
        **TINY,
    )
    metrics = train_backbone(cfg, progress=False)
    assert metrics["steps"] == 1 and metrics["n_train"] == 8
    backbone = load_backbone(cfg.out_dir, device="cpu", dtype="float32")
    assert type(backbone.model).__name__ == TOWERS[objective] and backbone.grid == (4, 4)
