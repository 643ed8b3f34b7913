"""Every backbone family the issue names, built tiny from its config and loaded like a hub model.

Each family (ViT, CLIP and SigLIP vision towers and full models, DINOv2 with and without
registers, and BEiT as "any AutoModel whose blocks form a ModuleList") is saved with its own
image processor, then loaded through `load_backbone` twice: from the directory, and by hub id out
of a temporary Hugging Face cache laid out as `huggingface_hub` writes it, with HF_HUB_OFFLINE=1.
Building and saving all of them takes about a second, so one module-scoped fixture does it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from saev_core.backbone import (  # noqa: E402
    Backbone,
    load_backbone,
    preprocess,
    record_blocks,
    resolve_dtype,
    token_indices,
)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
VISION = dict(TINY, image_size=32, patch_size=8)
TEXT = dict(TINY, vocab_size=99, max_position_embeddings=16)
ORG = "tiny-saev"
"""The hub organisation the families are cached under: `load_backbone("tiny-saev/vit")`."""


@dataclass(frozen=True)
class Family:
    """A model family: how to build a tiny one, and the layout `load_backbone` must find."""

    name: str
    build: Callable[[], Any]
    """A randomly initialised model from a tiny config (`transformers` names inside)."""
    processor: Callable[[], Any]
    """The family's own image processor, as its hub checkpoints ship it."""
    tower: str
    """Class name of the model `load_backbone` keeps (the vision tower of a full model)."""
    has_cls: bool = True
    n_registers: int = 0
    grid: tuple[int, int] = (4, 4)
    """Patches per column and row for the processor's output size."""
    final_norm: str | None = None
    """The tower's module that maps the last block's output to `last_hidden_state`, if any."""


def _vit() -> Any:
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(**VISION))


def _clip_vision() -> Any:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(**VISION))


def _clip() -> Any:
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16))


def _siglip_vision() -> Any:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig(**VISION))


def _siglip() -> Any:
    from transformers import SiglipConfig, SiglipModel

    return SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT))


def _dinov2() -> Any:
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(**VISION))


def _dinov2_registers() -> Any:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**VISION, num_register_tokens=4))


def _beit() -> Any:
    from transformers import BeitConfig, BeitModel

    return BeitModel(BeitConfig(**VISION))


def _vit_processor() -> Any:
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": 32, "width": 32})


def _clip_processor() -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _siglip_processor() -> Any:
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": 32, "width": 32})


def _dinov2_processor(crop: int) -> Callable[[], Any]:
    def make() -> Any:
        from transformers import BitImageProcessor

        # As on the hub (config 518 px, crop 224): the crop, not the config, sets the grid, and
        # the model interpolates its position embeddings.
        return BitImageProcessor(
            size={"shortest_edge": crop + 8}, crop_size={"height": crop, "width": crop}
        )

    return make


def _beit_processor() -> Any:
    from transformers import BeitImageProcessor

    return BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)


FAMILIES = {
    f.name: f
    for f in [
        Family("vit", _vit, _vit_processor, "ViTModel", final_norm="layernorm"),
        Family("clip_vision", _clip_vision, _clip_processor, "CLIPVisionModel"),
        Family("clip", _clip, _clip_processor, "CLIPVisionModel"),
        Family(
            "siglip_vision",
            _siglip_vision,
            _siglip_processor,
            "SiglipVisionModel",
            has_cls=False,
            final_norm="post_layernorm",
        ),
        Family(
            "siglip",
            _siglip,
            _siglip_processor,
            "SiglipVisionModel",
            has_cls=False,
            final_norm="post_layernorm",
        ),
        Family(
            "dinov2",
            _dinov2,
            _dinov2_processor(48),
            "Dinov2Model",
            grid=(6, 6),
            final_norm="layernorm",
        ),
        Family(
            "dinov2_registers",
            _dinov2_registers,
            _dinov2_processor(32),
            "Dinov2WithRegistersModel",
            n_registers=4,
            final_norm="layernorm",
        ),
        # BEiT pools by mean by default, so its final norm is an identity on the tokens.
        Family("beit", _beit, _beit_processor, "BeitModel"),
    ]
}
SOURCES = ("dir", "hub")


@dataclass
class Saved:
    """One family as built in memory and as saved to disk."""

    model: Any
    """The model as built (eval mode), the reference for what loading must reproduce."""
    path: Path
    """The save_pretrained directory."""


def images(n: int, seed: int = 0) -> list[Image.Image]:
    """Random RGB images of 40 x 30 px, so that processors must resize (and crop)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)) for _ in range(n)]


def sha256_of(path: Path) -> str:
    """What `sha256sum path` prints first."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def put_in_hub_cache(src: Path, cache: Path, repo_id: str) -> None:
    """Lay `src`'s files out as `huggingface_hub` caches a download of `repo_id`.

    `models--org--name/blobs/<hash>` holds the bytes, `snapshots/<commit>/<file>` links to them,
    and `refs/main` names the commit (https://huggingface.co/docs/hub/local-cache). Real caches
    name a blob by its LFS sha256 or git hash; loaders never read the name, so sha256 will do.
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex name works offline
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(src.iterdir()):
        blob = repo / "blobs" / sha256_of(f)
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Saved]:
    """Every family built, saved to a directory, and also cached as hub id `tiny-saev/<name>`."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES.values():
        torch.manual_seed(0)
        model = family.build().eval()
        path = root / "dirs" / family.name
        model.save_pretrained(path)
        family.processor().save_pretrained(path)
        put_in_hub_cache(path, root / "hub", f"{ORG}/{family.name}")
        out[family.name] = Saved(model, path)
    return out


@pytest.fixture(scope="module")
def hub_cache(saved: dict[str, Saved]) -> Iterator[Path]:
    """Point huggingface_hub at the temporary cache for this module.

    huggingface_hub reads the HF_HUB_CACHE variable once, at import; every lookup then reads
    `huggingface_hub.constants.HF_HUB_CACHE`, which is what is patched here.
    """
    import huggingface_hub.constants

    cache = next(iter(saved.values())).path.parent.parent / "hub"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def loaded(saved: dict[str, Saved], hub_cache: Path) -> Callable[..., Backbone]:
    """`loaded(family, source, dtype)`: the backbone, loaded once per module and then shared."""
    backbones: dict[tuple[str, str, str], Backbone] = {}

    def get(family: str, source: str = "hub", dtype: str = "float32") -> Backbone:
        key = (family, source, dtype)
        if key not in backbones:
            name = str(saved[family].path) if source == "dir" else f"{ORG}/{family}"
            backbones[key] = load_backbone(name, device="cpu", dtype=dtype)
        return backbones[key]

    return get


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", FAMILIES)
def test_layout(name: str, source: str, saved: dict[str, Saved], loaded: Callable) -> None:
    family = FAMILIES[name]
    backbone = loaded(name, source)
    assert type(backbone.model).__name__ == family.tower
    # A full CLIP/SigLIP checkpoint loads only its vision tower; the text tower is not read.
    assert not any("text" in n for n, _ in backbone.model.named_parameters())
    assert backbone.n_layers == 2 and len(backbone.blocks) == 2
    assert backbone.d_model == 32 and backbone.patch_size == 8
    assert backbone.has_cls is family.has_cls
    assert backbone.n_registers == family.n_registers
    assert backbone.n_prefix_tokens == int(family.has_cls) + family.n_registers
    assert backbone.grid == family.grid
    assert backbone.n_patches == family.grid[0] * family.grid[1]
    assert backbone.image_size == (8 * family.grid[0], 8 * family.grid[1])
    assert backbone.dtype == "float32" and backbone.device == "cpu"
    assert not backbone.model.training
    # The family's own preprocessing: without torchvision transformers 5 gives its PIL variant.
    expected_processor = type(family.processor()).__name__
    assert type(backbone.processor).__name__ == expected_processor
    assert backbone.weights_sha256 == sha256_of(saved[name].path / "model.safetensors")


@pytest.mark.parametrize("name", FAMILIES)
def test_blocks_record_the_residual_stream(
    name: str, saved: dict[str, Saved], loaded: Callable
) -> None:
    family = FAMILIES[name]
    backbone = loaded(name)
    x = preprocess(backbone, images(3))
    assert x.shape == (3, 3, *backbone.image_size) and x.dtype == torch.float32
    with torch.no_grad(), record_blocks(backbone, [0, -1]) as acts:
        out = backbone.model(pixel_values=x, output_hidden_states=True)
    assert sorted(acts) == [0, 1]
    for a in acts.values():
        assert a.shape == (3, backbone.n_tokens, backbone.d_model)
    # hidden_states[0] is the embeddings; hidden_states[i + 1] is block i's output.
    assert len(out.hidden_states) == backbone.n_layers + 1
    torch.testing.assert_close(acts[0], out.hidden_states[1])
    torch.testing.assert_close(acts[1], out.hidden_states[-1])

    # The loaded weights are the saved ones: the model as built gives the same residual stream.
    reference = saved[name].model
    reference = getattr(reference, "vision_model", reference)
    with torch.no_grad():
        ref = reference(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(acts[1], ref.hidden_states[-1])

    # The last block's output is the un-normed residual stream; last_hidden_state may add a norm.
    if family.final_norm is None:
        torch.testing.assert_close(acts[1], out.last_hidden_state)
    else:
        norm = getattr(backbone.model, family.final_norm)
        with torch.no_grad():
            torch.testing.assert_close(norm(acts[1]), out.last_hidden_state)
        assert not torch.allclose(acts[1], out.last_hidden_state, atol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_token_indices(name: str, loaded: Callable) -> None:
    family = FAMILIES[name]
    backbone = loaded(name)
    n_cls, n_prefix = int(family.has_cls), int(family.has_cls) + family.n_registers
    n_tokens = n_prefix + family.grid[0] * family.grid[1]

    def check(policy: str, expected: range) -> None:
        got = token_indices(backbone, policy)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np.arange(expected.start, expected.stop))

    check("all", range(0, n_tokens))
    check("patches", range(n_prefix, n_tokens))
    if family.has_cls:
        check("cls", range(0, 1))
    else:
        with pytest.raises(ValueError, match=r"'cls' selects no token .* no CLS token, no reg"):
            token_indices(backbone, "cls")
    if family.n_registers:
        check("registers", range(n_cls, n_prefix))
    else:
        with pytest.raises(ValueError, match=rf"'registers' selects no token of {ORG}/{name}"):
            token_indices(backbone, "registers")
    with pytest.raises(ValueError, match=re.escape("all|cls|registers|patches")):
        token_indices(backbone, "prefix")


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_matches_float32(name: str, loaded: Callable) -> None:
    half, full = loaded(name, dtype="bfloat16"), loaded(name)
    assert half.dtype == "bfloat16"
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    x = preprocess(half, images(2))
    assert x.dtype == torch.bfloat16
    with torch.no_grad(), record_blocks(half, [-1]) as acts_half:
        half.model(pixel_values=x)
    with torch.no_grad(), record_blocks(full, [-1]) as acts_full:
        full.model(pixel_values=preprocess(full, images(2)))
    assert acts_half[1].dtype == torch.bfloat16
    # bfloat16 keeps 8 bits of mantissa (~0.4% per rounding); two tiny blocks stay within 5%.
    torch.testing.assert_close(acts_half[1].float(), acts_full[1], rtol=0.05, atol=0.05)


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", "cuda") == "float16"
    assert resolve_dtype("auto", "cuda:1") == "float16"
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "mps") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match=re.escape("auto|float32|float16|bfloat16")):
        resolve_dtype("half", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_half_precision_on_cuda(saved: dict[str, Saved], loaded: Callable) -> None:
    gpu = load_backbone(str(saved["dinov2_registers"].path))  # device and dtype both "auto"
    assert gpu.device == "cuda" and gpu.dtype == "float16"
    x = preprocess(gpu, images(2))
    assert x.dtype == torch.float16 and x.device.type == "cuda"
    cpu = loaded("dinov2_registers")
    with torch.no_grad(), record_blocks(gpu, [-1]) as acts_gpu:
        gpu.model(pixel_values=x)
    with torch.no_grad(), record_blocks(cpu, [-1]) as acts_cpu:
        cpu.model(pixel_values=preprocess(cpu, images(2)))
    torch.testing.assert_close(acts_gpu[1].float().cpu(), acts_cpu[1], rtol=0.01, atol=0.01)


def test_prefix_tokens_the_layout_cannot_name_are_an_error(tmp_path: Path) -> None:
    """DeiT adds a distillation token after CLS: neither CLS nor a register, so refuse it."""
    from transformers import DeiTConfig, DeiTImageProcessor, DeiTModel

    DeiTModel(DeiTConfig(**VISION)).save_pretrained(tmp_path)
    DeiTImageProcessor(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"\(deit\): block 0 gives 2 token\(s\) before its 16"):
        load_backbone(str(tmp_path), device="cpu")
