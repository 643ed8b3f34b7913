"""Same machine, same bytes, for the CLIP and MAE demo backbones (saev_core.demo_vit.objectives), as
test_determinism checks for the supervised one: training twice with the same config writes
identical files, in one process and in two fresh interpreters (with different PYTHONHASHSEEDs,
so that neither Python's hash seed nor anything else set up per process can pass for a seed).

CLIP once did not: `caption_tokenizer` trains a byte-level BPE with tokenizers' BpeTrainer,
which numbers the word-final symbols ("a</w>", "s</w>", ...) in the order it meets them while
iterating over a Rust hash map of the words, an order that changes on every call, in one process
too (huggingface/tokenizers#1794; TOKENIZERS_PARALLELISM, RAYON_NUM_THREADS and PYTHONHASHSEED
do not change it). The merges and the set of tokens are the same every time; only the ids moved,
so the same caption read as other rows of the text tower's seeded embedding table and training
took another path. `caption_tokenizer` now renumbers the trained vocabulary (the specials, the
base symbols sorted, then each merge's result in merge order); these tests hold it to that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_determinism import digests

from saev_core.demo_vit import BackboneConfig, train_backbone

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            patch_size=8, image_size=32, epochs=2, batch_size=4, num_threads=1)  # fmt: skip
# The tiny world's captions end words in 7 symbols: two runs with the old numbering drew the
# same ids about once in 7! = 5040, so these comparisons do catch its return.
OBJECTIVES = ["clip", "mae"]
# A fresh interpreter trains one backbone: argv[1] is the BackboneConfig's fields as JSON.
CHILD = (
    "import json, sys\n"
    "from saev_core.demo_vit import BackboneConfig, train_backbone\n"
    "train_backbone(BackboneConfig(**json.loads(sys.argv[1])), progress=False)\n"
)


@pytest.fixture(scope="module")
def forms_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny forms world (filled, outline and word objects, captions.csv) at 32 px."""
    from saev_core.shapes import FormsConfig, generate

    out = tmp_path_factory.mktemp("forms") / "world"
    cfg = FormsConfig(seed=1, image_size=32, n_train=8, n_val=4, n_test=2, min_radius=5,
                      max_radius=9, outline_width=2, min_font_size=7, max_font_size=8)  # fmt: skip
    generate(out, cfg, progress=False)
    return out


def config(world: Path, out_dir: Path, objective: str) -> dict:
    return dict(data_dir=str(world), out_dir=str(out_dir), objective=objective, **TINY)


def expected_files(objective: str) -> set[str]:
    saved = {"model.safetensors", "config.json", "metrics.json"}
    return saved | ({"tokenizer.json", "processor_config.json"} if objective == "clip" else set())


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_training_twice_in_one_process_writes_the_same_bytes(
    objective: str, forms_world: Path, tmp_path: Path
) -> None:
    for name in ("a", "b"):
        cfg = BackboneConfig(**config(forms_world, tmp_path / name, objective))
        train_backbone(cfg, progress=False)
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert expected_files(objective) <= set(a)
    assert a == b


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_training_in_two_fresh_processes_writes_the_same_bytes(
    objective: str, forms_world: Path, tmp_path: Path
) -> None:
    # Side by side, so that each also trains on a CPU the other keeps busy.
    children = {}
    for name, hash_seed in (("a", "1"), ("b", "2")):
        args = json.dumps(config(forms_world, tmp_path / name, objective))
        env = os.environ | {"PYTHONHASHSEED": hash_seed}
        with (tmp_path / f"{name}.log").open("w") as log:  # the child keeps its own handle
            children[name] = subprocess.Popen(
                [sys.executable, "-c", CHILD, args], env=env, stdout=log, stderr=log
            )
    for name, child in children.items():
        assert child.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-2000:]
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert expected_files(objective) <= set(a)
    assert a == b


def world_captions(world: Path) -> list[str]:
    from saev_core.shapes import read_captions

    captions = read_captions(world)
    return [captions[i] for i in sorted(captions)]


def bpe_model(tokenizer) -> dict:
    """The trained BPE model (vocab: token -> id, merges) as tokenizer.json stores it."""
    return json.loads(tokenizer.backend_tokenizer.to_str())["model"]


def test_caption_tokenizer_learns_the_same_merges_and_tokens_on_every_call(
    forms_world: Path,
) -> None:
    """What the trainer does keep: the merges, in order, and the set of tokens."""
    from saev_core.demo_vit.clip import caption_tokenizer

    models = [bpe_model(caption_tokenizer(world_captions(forms_world))) for _ in range(5)]
    assert len(models[0]["merges"]) > 10 and any(t.endswith("</w>") for t in models[0]["vocab"])
    assert all(m["merges"] == models[0]["merges"] for m in models)
    assert all(set(m["vocab"]) == set(models[0]["vocab"]) for m in models)


def test_caption_tokenizer_numbers_its_vocabulary_the_same_on_every_call(
    forms_world: Path,
) -> None:
    from saev_core.demo_vit.clip import caption_tokenizer

    captions = world_captions(forms_world)
    vocabs = [bpe_model(caption_tokenizer(captions))["vocab"] for _ in range(5)]
    encoded = [caption_tokenizer(captions)(captions)["input_ids"] for _ in range(2)]
    assert all(v == vocabs[0] for v in vocabs)
    assert encoded[0] == encoded[1]
