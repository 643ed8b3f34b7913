"""Same machine, same bytes: training the demo backbone or an SAE twice with the same config writes
identical files, and no tracked file holds a timing (those go to MLflow), so `dvc repro -f` of a
stage leaves its hash, and every later stage, alone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from test_shards import write_set

from saev_core.demo_vit import BackboneConfig, train_backbone
from saev_core.training.stage import TrainStage, train_stage

TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                image_size=32, patch_size=8, epochs=2, batch_size=8, num_threads=2)  # fmt: skip


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def keys(obj) -> set[str]:
    """Every key of a nested JSON value."""
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in keys(v)}
    return set()


def test_backbone_training_twice_writes_the_same_bytes(tiny_world, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = BackboneConfig(data_dir=str(tiny_world), out_dir=str(tmp_path / name), **TINY_VIT)
        runs.append(train_backbone(cfg, progress=False))
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert {"model.safetensors", "config.json", "metrics.json"} <= set(a)
    assert a == b
    # the timings are measured (for MLflow) but kept out of the saved metrics
    assert runs[0]["train_s"] > 0 and "elapsed_s" in runs[0]["history"][0]
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert not keys(saved) & {"train_s", "data_s", "elapsed_s"}
    assert saved["val_accuracy"] == runs[0]["val_accuracy"] and len(saved["history"]) == 2


def test_sae_training_twice_writes_the_same_bytes(tmp_path):
    shard_dir = tmp_path / "shards"
    write_set(shard_dir, n_images=24, n_tokens=5, d=6, n_train=18)
    sae = {"arch": "topk", "d_sae": 24, "k": 4, "batch_size": 16, "n_epochs": 2,
           "warmup_steps": 2, "aux_k": 8, "dead_after_tokens": 64, "device": "cpu"}  # fmt: skip
    metrics = []
    for name in ("a", "b"):
        io = TrainStage(
            shard_dir=str(shard_dir), layer=0, out_dir=str(tmp_path / name), sae=sae,
            sweep={"relu": {"arch": "relu", "l1_coeff": 0.01}},
        )  # fmt: skip
        metrics.append(train_stage(io, progress=False))
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert {"sae.safetensors", "cfg.json", "sweep/relu/sae.safetensors"} <= set(a)
    assert a == b
    assert metrics[0]["timing"]["train_seconds"] > 0  # returned for MLflow ...
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    assert not keys(cfg) & {"train_seconds", "tokens_per_s"}  # ... not saved
    assert cfg["extra"]["summary"]["n_steps"] == 2 * 6
