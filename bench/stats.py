"""Stats throughput vs the SAE encode alone, and peak memory, on random activations.

Streams `--n-images` images x `--tokens` tokens of width `--d-model` through
`saev_core.stats.compute_stats` with a TopK SAE of `--d-sae` features, and times the same
batches through `sae.encode` alone in the same run. The ratio is the cost of the statistics
(counts, histograms, exemplars, label AUROC) on top of the matmul that any pass must pay.

    .venv/bin/python bench/stats.py                      # d_model 768, d_sae 24576 (issue 5)
    .venv/bin/python bench/stats.py --d-model 128 --d-sae 1024 --n-images 2000

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import numpy as np
import pandas as pd
import torch

from saev_core.sae import SAE, SAEConfig
from saev_core.stats import StatsConfig, compute_stats


def batches(n_images, tokens, d_model, images_per_batch, seed=0):
    rng = np.random.default_rng(seed)
    for start in range(0, n_images, images_per_batch):
        n = min(images_per_batch, n_images - start)
        ids = np.repeat(np.arange(start, start + n, dtype=np.int64), tokens)
        toks = np.tile(np.arange(tokens, dtype=np.int32), n)
        yield ids, toks, rng.standard_normal((n * tokens, d_model), dtype=np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=24576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=197, help="tokens per image (ViT-B/16: 197)")
    p.add_argument("--n-images", type=int, default=64)
    p.add_argument("--images-per-batch", type=int, default=16)
    p.add_argument("--n-labels", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    sae = SAE(SAEConfig(arch="topk", d_model=args.d_model, d_sae=args.d_sae, k=args.k))
    rng = np.random.default_rng(1)
    labels = pd.DataFrame(
        {
            "image_id": np.repeat(np.arange(args.n_images), 8),
            "token": rng.integers(1, args.tokens, size=args.n_images * 8).astype(np.int32),
            "label": rng.choice([f"label{i}" for i in range(args.n_labels)], args.n_images * 8),
        }
    ).drop_duplicates()
    n_tokens = args.n_images * args.tokens
    gen = lambda: batches(args.n_images, args.tokens, args.d_model, args.images_per_batch)  # noqa: E731

    # warm up both paths once on a small slice
    with torch.inference_mode():
        sae.encode(torch.zeros(64, args.d_model))

    t = time.perf_counter()
    with torch.inference_mode():
        for _, _, x in gen():
            sae.encode(torch.from_numpy(x))
    encode_s = time.perf_counter() - t

    cfg = StatsConfig(n_top=16, splits=("train",))
    t = time.perf_counter()
    compute_stats(sae, gen(), labels, None, 1, cfg, run="bench", progress=False)
    stats_s = time.perf_counter() - t

    result = {
        "bench": "stats",
        "d_model": args.d_model,
        "d_sae": args.d_sae,
        "k": args.k,
        "n_tokens": n_tokens,
        "threads": args.threads,
        "encode_tokens_per_s": round(n_tokens / encode_s, 1),
        "stats_tokens_per_s": round(n_tokens / stats_s, 1),
        "ratio_to_encode": round(encode_s / stats_s, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
