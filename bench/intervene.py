"""The forward pass with a spliced SAE vs without, and the intervene stage's time per hypothesis
with 1 and with 10 controls of each kind: same models, same process, side by side.

Forward (`--what forward`):

A randomly initialised ViT-B/16 (`ViTModel`, hidden 768, 12 blocks, 224 px, 197 tokens) and a
TopK SAE with 24,576 features (32x, k = 32) at block 10 (the paper's choice). Timed, interleaved,
`--repeats` times each (median reported):

  plain:    the model alone;
  no_edit:  the SAE spliced in without an edit (encode + full decode: `x - x_hat + x_hat`);
  suppress: the SAE spliced in, suppressing one feature on every token (encode + a decode of
            the edited feature's row only; see `saev_core.intervene`).

The issue's goal is a time ratio <= 1.3 for the spliced forward. On CUDA, weights and activations
are float16 for the model, float32 for the SAE.

Stage (`--what stage`): `run_hypothesis` on a demo-sized world (the demo ViT, random init: 4
blocks, d_model 128, 64 px, 65 tokens; a random TopK SAE with 1,024 features at block 2, as the
demo's; `--n-images` test images; strengths 0, -2, -5 of a clamp), timed interleaved with
n_control_features = n_control_directions = 1 and = 10 (`--repeats` each, median), next to the
forward part done the old way (one forward per condition, 21 per strength) for the 10 + 10 case.
Issue 14's goal: the time per hypothesis does not grow linearly with the controls (linear would
be (1 + 20) / (1 + 2) = 7x).

    .venv/bin/python bench/intervene.py                   # both (a few minutes on CPU)
    .venv/bin/python bench/intervene.py --what stage      # the stage only (about a minute)
    .venv/bin/python bench/intervene.py --batch 64 --device cuda

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=("forward", "stage", "both"), default="both")
    p.add_argument("--n-images", type=int, default=100, help="stage: evaluation images")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--d-sae", type=int, default=24_576)
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {"bench": "intervene"}
    if args.what in ("forward", "both"):
        result |= forward_bench(args)
    if args.what in ("stage", "both"):
        result |= stage_bench(args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    result["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {device}, "
        f"{args.threads} threads, load {os.getloadavg()[0]:.1f}"
    )
    print(json.dumps(result))


def forward_bench(args) -> dict:
    """The spliced forward vs the plain one (module docstring)."""
    from transformers import ViTConfig, ViTModel

    from saev_core.intervene import FeatureEdit, Splice, splice
    from saev_core.sae import SAE, SAEConfig

    torch.manual_seed(0)
    dev = args.device
    model = ViTModel(ViTConfig(image_size=224, patch_size=16), add_pooling_layer=False).eval()
    model = model.to(dev, torch.float16 if dev.startswith("cuda") else torch.float32)
    sae = SAE(SAEConfig(arch="topk", d_model=768, d_sae=args.d_sae, k=32)).eval().to(dev)
    pixels = torch.randn(args.batch, 3, 224, 224, device=dev, dtype=model.dtype)
    blocks = model.encoder.layer if hasattr(model, "encoder") else model.layers
    runs = {
        "plain": [],
        "no_edit": [Splice(args.layer, sae)],
        "suppress": [Splice(args.layer, sae, FeatureEdit("suppress", (7,)))],
    }

    def once(splices) -> float:
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode(), splice(blocks, *splices):
            model(pixel_values=pixels)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for s in runs.values():  # warm-up
        once(s)
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, s in runs.items():
            times[k].append(once(s))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": "ViT-B/16 random init, 224 px, 197 tokens",
        "d_sae": args.d_sae,
        "batch": args.batch,
        "layer": args.layer,
        "plain_s": round(med["plain"], 4),
        "no_edit_s": round(med["no_edit"], 4),
        "suppress_s": round(med["suppress"], 4),
        "ratio_no_edit": round(med["no_edit"] / med["plain"], 3),
        "ratio_suppress": round(med["suppress"] / med["plain"], 3),
        "goal_ratio": 1.3,
        "images_per_s_plain": round(args.batch / med["plain"], 2),
    }


def _stage_world(root: Path, n_images: int, seed: int = 0) -> dict:
    """A shapes world, a random demo-sized classifier and SAE, and stats for them."""
    import numpy as np
    import pandas as pd

    from saev_core.demo_vit import BackboneConfig, build_classifier, build_processor
    from saev_core.sae import SAE, SAEConfig
    from saev_core.shapes import ShapesConfig, generate

    generate(root / "shapes", ShapesConfig(seed=seed, n_train=8, n_val=8, n_test=n_images),
             progress=False)  # fmt: skip
    torch.manual_seed(seed)
    build_classifier(BackboneConfig()).save_pretrained(root / "clf")
    build_processor(64).save_pretrained(root / "clf")
    sae = SAE(SAEConfig(arch="topk", d_model=128, d_sae=1024, k=16))
    sae.save(root / "sae", extra={"layer": 2})
    rng = np.random.default_rng(seed)
    (root / "stats").mkdir()
    pd.DataFrame(
        {"feature": range(1024), "freq": rng.uniform(0.001, 0.1, 1024), "max_act": 1.0}
    ).to_parquet(root / "stats" / "features.parquet")
    return dict(model=str(root / "clf"), sae_dir=str(root / "sae"),
                stats_dir=str(root / "stats"), data=str(root / "shapes"), split="test",
                images="all")  # fmt: skip


def stage_bench(args) -> dict:
    """`run_hypothesis` with 1 and with 10 controls of each kind (module docstring)."""
    from saev_core.hypotheses import Cache, Hypothesis, Settings, run_hypothesis
    from saev_core.intervene import FeatureEdit, Splice

    with tempfile.TemporaryDirectory() as tmp:
        base = _stage_world(Path(tmp), args.n_images)
        h = Hypothesis(target="blue", features=(5,), op="clamp", strengths=(0.0, -2.0, -5.0),
                       **base)  # fmt: skip
        caches = {
            n: Cache(Settings(n_control_features=n, n_control_directions=n, n_grid=0,
                              device=args.device))
            for n in (1, 10)
        }  # fmt: skip
        for c in caches.values():  # warm-up: models, images and their unedited predictions
            run_hypothesis(h, c)
        times: dict = {1: [], 10: [], "unstacked": []}
        cache = caches[10]
        reader = cache.reader(h)
        es = cache.evalset(h, reader)
        sae = cache.sae(h.sae_dir)
        for _ in range(args.repeats):
            for n, c in caches.items():
                t = time.perf_counter()
                rows = run_hypothesis(h, c).rows
                times[n].append(time.perf_counter() - t)
                assert rows[0]["n_controls"] == 2 * n
            t = time.perf_counter()  # the forward part as before: one pass per condition
            for s in h.strengths:
                for f in range(21):
                    edit = FeatureEdit("clamp", (5 + f,), s, (1.0,))
                    reader.probs(es.pixels, cache.settings.batch_size, [Splice(2, sae, edit)])
            times["unstacked"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "stage_model": "demo ViT (4 blocks, d 128, 64 px) random init, TopK SAE 1,024 at block 2",
        "stage_n_images": args.n_images,
        "stage_strengths": len(h.strengths),
        "hypothesis_s_1_control": round(med[1], 3),
        "hypothesis_s_10_controls": round(med[10], 3),
        "ratio_10_vs_1": round(med[10] / med[1], 3),
        "linear_ratio": round(21 / 3, 3),
        "unstacked_forwards_s_10_controls": round(med["unstacked"], 3),
        "goal": "ratio_10_vs_1 well below linear_ratio",
    }


if __name__ == "__main__":
    main()
