"""Extraction throughput vs the bare forward pass of the same model, batch and device.

Builds a ViT-B/16-sized model (`ViTConfig()` defaults: 12 blocks, width 768, 224 px, patch 16)
at random init, saves it like a hub model, writes `--n-images` JPEGs of 256x256 random noise
(ImageNet-like decode and resize cost), and in one run measures:

- forward: `model(pixel_values=...)` over the same batches, already preprocessed and on the
  device, with no hooks: the limit extraction can reach;
- extract: `saev_core.extract.extract` end to end (decode, preprocess, forward with hooks,
  device-to-host copy, float16 Parquet shards, sha256, manifest) with the same loaded model (the
  one-time model load is timed separately and reported).

The two alternate for `--repeats` rounds and the medians are compared.

    .venv/bin/python bench/extract.py                       # 128 images, batch 32, layer -2
    .venv/bin/python bench/extract.py --n-images 1024 --batch-size 256   # on a GPU

Prints one JSON line last; `ratio` = extract images/s / forward images/s (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--layers", default="-2", help="comma-separated blocks to record")
    p.add_argument("--tokens", default="all", choices=["all", "cls", "patches"])
    p.add_argument("--device", default="auto")
    p.add_argument("--n-workers", type=int, default=4, help="image decoding threads")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from saev_core.backbone import load_backbone, preprocess
    from saev_core.extract import ExtractConfig, extract

    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        ViTModel(ViTConfig(), add_pooling_layer=False).save_pretrained(tmp / "vit-b16")
        ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(tmp / "vit-b16")
        rng = np.random.default_rng(0)
        for i in range(args.n_images):
            (tmp / "images" / "noise").mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp / "images" / "noise" / f"{i:06d}.jpg", quality=90)
        print(f"model and {args.n_images} images written to {tmp}")

        device = None if args.device == "auto" else args.device
        t0 = time.perf_counter()
        bb = load_backbone(str(tmp / "vit-b16"), device=device)
        load_s = time.perf_counter() - t0
        files = sorted((tmp / "images" / "noise").iterdir())
        batches = []
        for start in range(0, len(files), args.batch_size):
            ims = [Image.open(f).convert("RGB") for f in files[start : start + args.batch_size]]
            batches.append(preprocess(bb, ims))
        with torch.inference_mode():
            bb.model(pixel_values=batches[0])  # warm-up (kernels, allocator)
        layers = tuple(int(x) for x in args.layers.split(","))

        def forward() -> float:
            with torch.inference_mode():
                _sync(bb.device)
                t0 = time.perf_counter()
                for pixels in batches:
                    bb.model(pixel_values=pixels)
                _sync(bb.device)
            return time.perf_counter() - t0

        def extraction(r: int) -> tuple[float, dict]:
            cfg = ExtractConfig(
                model=str(tmp / "vit-b16"),
                data=str(tmp / "images"),
                out_dir=str(tmp / f"acts-{r}"),
                layers=layers,
                tokens=args.tokens,
                batch_size=args.batch_size,
                splits=("train",),
                device=args.device,
                n_workers=args.n_workers,
            )
            t0 = time.perf_counter()
            manifest = extract(cfg, progress=False, backbone=bb)
            return time.perf_counter() - t0, manifest

        # Interleaved repeats, so that a noisy neighbour hits both sides alike; medians reported.
        forward_s, extract_s = [], []
        for r in range(args.repeats):
            forward_s.append(forward())
            seconds, manifest = extraction(r)
            extract_s.append(seconds)
            print(
                f"repeat {r}: forward {args.n_images / forward_s[-1]:.2f} images/s, "
                f"extract {args.n_images / extract_s[-1]:.2f} images/s"
            )
        size = sum(f.stat().st_size for f in (tmp / "acts-0").rglob("*.parquet"))
        forward_s, extract_s = float(np.median(forward_s)), float(np.median(extract_s))

    result = {
        "bench": "extract",
        "model": "ViT-B/16 (random init)",
        "device": _device_name(args.device),
        "precision": manifest["model"]["precision"],
        "n_images": args.n_images,
        "batch_size": args.batch_size,
        "layers": manifest["layers"],
        "tokens_per_image": manifest["tokens"]["n_tokens_written"],
        "forward_images_per_s": round(args.n_images / forward_s, 2),
        "extract_images_per_s": round(args.n_images / extract_s, 2),
        "ratio": round(forward_s / extract_s, 3),
        "repeats": args.repeats,
        "model_load_s": round(load_s, 2),
        "shard_mb": round(size / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": args.threads,
        "machine": f"{platform.machine()} {_cpus()} cpus",
    }
    print(json.dumps(result))


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    if torch.cuda.is_available() and device in ("auto", "cuda"):
        return torch.cuda.get_device_name(0)
    return "cpu"


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
