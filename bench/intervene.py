"""The forward pass with a spliced SAE vs without: same model, same batch, same process.

A randomly initialised ViT-B/16 (`ViTModel`, hidden 768, 12 blocks, 224 px, 197 tokens) and a
TopK SAE with 24,576 features (32x, k = 32) at block 10 (the paper's choice). Timed, interleaved,
`--repeats` times each (median reported):

  plain:    the model alone;
  no_edit:  the SAE spliced in without an edit (encode + full decode: `x - x_hat + x_hat`);
  suppress: the SAE spliced in, suppressing one feature on every token (encode + a decode of
            the edited feature's row only; see `saev_core.intervene`).

The issue's goal is a time ratio <= 1.3 for the spliced forward. On CUDA, weights and activations
are float16 for the model, float32 for the SAE.

    .venv/bin/python bench/intervene.py                   # batch 4 on CPU (a couple of minutes)
    .venv/bin/python bench/intervene.py --batch 64 --device cuda

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--d-sae", type=int, default=24_576)
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
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
    device = torch.cuda.get_device_name() if dev.startswith("cuda") else "CPU"
    result = {
        "bench": "intervene",
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
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {device}, "
        f"{args.threads} threads, load {os.getloadavg()[0]:.1f}",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
