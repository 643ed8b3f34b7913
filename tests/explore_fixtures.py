"""A tiny but complete run for `saev explore`, built in a temporary directory.

`build_explore_run(tmp_path)` runs the real stages on a 32 px shapes world: a randomly
initialised 3-block demo ViT classifier (saved like a hub model), extraction of block 1, a TopK
SAE trained on it, its stats (with the static browser) and both linear probes, plus a
`params.yaml` whose `intervene`, `probe` and `stats` sections name them, so that
`saev explore --params <root>/params.yaml` needs no other option. It is a plain function so that
another test file can import it; `explore_run` is a module-scoped fixture over it.

Takes about 10-20 s on two loaded cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYER = 1
SEG_CLASSES = ("red", "green", "blue", "yellow")


def build_explore_run(tmp_path: str | Path) -> dict[str, Path]:
    """Build the run under `tmp_path` and return its paths: root, params, model, data, shards,
    sae_dir, stats_dir, probe_dir (the probes' out_dir, with classification/ and segmentation/),
    mlruns (a directory for an MLflow sqlite store, not created)."""
    import torch
    import yaml

    from saev_core.demo_vit import BackboneConfig, build_classifier, build_processor
    from saev_core.extract import ExtractConfig, extract
    from saev_core.probes import ProbeConfig, train_probes
    from saev_core.shapes import ShapesConfig, generate
    from saev_core.stats.stage import StatsStage, stats_stage
    from saev_core.training.stage import TrainStage, train_stage

    root = Path(tmp_path)
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "root": root,
        "params": root / "params.yaml",
        "model": root / "backbone",
        "data": root / "data" / "shapes",
        "shards": root / "activations",
        "sae_dir": root / "sae",
        "stats_dir": root / "stats" / "tiny",
        "probe_dir": root / "probes",
        "mlruns": root / "mlruns",
    }
    generate(
        paths["data"],
        ShapesConfig(
            seed=3, image_size=32, n_train=16, n_val=8, n_test=8, min_radius=5, max_radius=9
        ),
        progress=False,
    )
    cfg = BackboneConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=8,
        image_size=32,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        build_classifier(cfg).save_pretrained(paths["model"])
    build_processor(32).save_pretrained(paths["model"])
    extract(
        ExtractConfig(
            model=str(paths["model"]),
            data=str(paths["data"]),
            out_dir=str(paths["shards"]),
            layers=(LAYER,),
            batch_size=16,
            images_per_row_group=8,
            n_workers=1,
            device="cpu",
        ),
        progress=False,
    )
    sae = {
        "arch": "topk",
        "d_sae": 64,
        "k": 4,
        "batch_size": 64,
        "n_epochs": 2,
        "warmup_steps": 2,
        "aux_k": 8,
        "dead_after_tokens": 200,
        "norm_max_tokens": 1000,
        "device": "cpu",
        "seed": 0,
    }
    train_stage(
        TrainStage(
            shard_dir=str(paths["shards"]), layer=LAYER, out_dir=str(paths["sae_dir"]), sae=sae
        ),
        progress=False,
    )
    stats = {
        "sae_dir": str(paths["sae_dir"]),
        "shard_dir": str(paths["shards"]),
        "out_dir": str(paths["stats_dir"]),
        "run": "tiny",
        "options": {"n_top": 4, "n_heatmaps": 4, "batch_images": 8, "device": "cpu"},
        "browser": {"n_exemplars": 3, "thumb_px": 16},
    }
    stats_stage(StatsStage(**stats), progress=False)
    probe = {
        "model": str(paths["model"]),
        "data": str(paths["data"]),
        "out_dir": str(paths["probe_dir"]),
        "seg_classes": list(SEG_CLASSES),
        "epochs": 2,
    }
    train_probes(ProbeConfig(**{**probe, "seg_classes": SEG_CLASSES}))
    intervene = {
        "model": str(paths["model"]),
        "sae_dir": str(paths["sae_dir"]),
        "stats_dir": str(paths["stats_dir"]),
        "data": str(paths["data"]),
        "split": "test",
        "out_dir": str(root / "interventions" / "tiny"),
    }
    paths["params"].write_text(
        yaml.safe_dump({"stats": stats, "probe": probe, "intervene": intervene}, sort_keys=False)
    )
    return paths


def build_folder_run(tmp_path: str | Path) -> dict[str, Path]:
    """A run over a flat folder of class sub-folders (non-square photos, no masks, no test
    split) with a hub-format backbone that has no head: a tiny CLIP vision tower with CLIP's
    processor (resize the short side, centre crop). Its block 0 has an SAE, and a classification
    probe reads it; `intervene.split` is val. Same keys as `build_explore_run`."""
    import numpy as np
    import torch
    import yaml
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from saev_core.extract import ExtractConfig, extract
    from saev_core.probes import ProbeConfig, train_probes
    from saev_core.stats.stage import StatsStage, stats_stage
    from saev_core.training.stage import TrainStage, train_stage

    root = Path(tmp_path)
    paths = {
        "root": root,
        "params": root / "params.yaml",
        "model": root / "clip",
        "data": root / "photos",
        "shards": root / "activations",
        "sae_dir": root / "sae",
        "stats_dir": root / "stats" / "folder",
        "probe_dir": root / "probes",
        "mlruns": root / "mlruns",
    }
    rng = np.random.default_rng(0)
    colours = {"ant": (200, 40, 40), "bee": (40, 40, 200), "cow": (40, 180, 40)}
    for name, colour in colours.items():
        (paths["data"] / name).mkdir(parents=True, exist_ok=True)
        for i in range(12):
            a = rng.integers(0, 60, (36, 48, 3)) + np.array(colour) * (0.5 + rng.random())
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(
                paths["data"] / name / f"{i:02d}.png"
            )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        CLIPVisionModel(
            CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, image_size=32, patch_size=8)
        ).save_pretrained(paths["model"])  # fmt: skip
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(paths["model"])
    extract(
        ExtractConfig(model=str(paths["model"]), data=str(paths["data"]),
                      out_dir=str(paths["shards"]), layers=(0,), batch_size=16,
                      images_per_row_group=8, n_workers=1, device="cpu"),
        progress=False,
    )  # fmt: skip
    sae = {"arch": "topk", "d_sae": 48, "k": 4, "batch_size": 64, "n_epochs": 2,
           "warmup_steps": 2, "aux_k": 8, "dead_after_tokens": 200, "norm_max_tokens": 1000,
           "device": "cpu", "seed": 0}  # fmt: skip
    train_stage(
        TrainStage(shard_dir=str(paths["shards"]), layer=0, out_dir=str(paths["sae_dir"]),
                   sae=sae),
        progress=False,
    )  # fmt: skip
    stats = {
        "sae_dir": str(paths["sae_dir"]),
        "shard_dir": str(paths["shards"]),
        "out_dir": str(paths["stats_dir"]),
        "run": "folder",
        "options": {"n_top": 4, "n_heatmaps": 4, "batch_images": 8, "splits": ["train", "val"]},
        "browser": {"enabled": False},
    }
    stats_stage(StatsStage(**stats), progress=False)
    probe = {"model": str(paths["model"]), "data": str(paths["data"]),
             "out_dir": str(paths["probe_dir"]), "tasks": ["classification"], "epochs": 3}  # fmt: skip
    train_probes(ProbeConfig(**{**probe, "tasks": ("classification",)}))
    intervene = {"model": str(paths["model"]), "sae_dir": str(paths["sae_dir"]),
                 "stats_dir": str(paths["stats_dir"]), "data": str(paths["data"]),
                 "split": "val", "out_dir": str(root / "interventions" / "folder")}  # fmt: skip
    paths["params"].write_text(
        yaml.safe_dump({"stats": stats, "probe": probe, "intervene": intervene}, sort_keys=False)
    )
    return paths


@pytest.fixture(scope="module")
def explore_run(tmp_path_factory) -> dict[str, Path]:
    """`build_explore_run` once per test module."""
    return build_explore_run(tmp_path_factory.mktemp("explore"))
