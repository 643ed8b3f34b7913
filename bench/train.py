"""SAE training throughput, FLOP/s against a plain matmul, and the speed-up of a sweep.

Part 1, throughput: `train_saes` on in-memory batches (the loader out of the picture) for ReLU,
TopK (k=32) on its sparse kernels, and TopK on the dense reference path (`sparse_kernels=False`)
at `--d-model` x `--d-sae`, batch `--batch`, over `--steps` timed steps after one warm-up step.
A dense training step costs about 12 B d S FLOPs (encoder and decoder matmuls, each 2 B d S
forward and twice that backward); the achieved FLOP/s is reported as a ratio to one plain
`[B, d] @ [d, S]` matmul timed in the same process (`flops_ratio`, dense FLOPs counted, so the
sparse TopK step can exceed 1). `sparse_flops_ratio` counts only what a sparse step needs: the
encoder's forward matmul 2 B d S plus 8 B k d for the gathered encoder gradient and the sparse
decoder forward and backward.

Part 2, sweep: a shard set of random float16 vectors is written through the real
`ShardWriter`, then N TopK SAEs (k = 8, 16, 32, 64) train for one epoch on it through
`loaders.iter_shuffled`, once as one sweep (`train_saes` with N configs: the data is read once)
and once as N separate runs; `sweep_speedup` = separate seconds / sweep seconds. A sweep shares
the reads of the shards, the normalisation fit and b_dec's geometric median, not the training
steps; `read_s` times one bare read of the epoch (the loader alone) to show how much of a
separate run is reading.

    .venv/bin/python bench/train.py                       # full sizes (a GPU, or patience)
    .venv/bin/python bench/train.py --cpu-quick           # reduced steps and sweep sizes

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

import numpy as np
import torch
from common import write_manifest

from saev_core import loaders, shards
from saev_core.training import TrainConfig, resolve_device, train_saes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(b: int, d: int, s: int, device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of one plain `[b, d] @ [d, s]` matmul (median of a few after a warm-up)."""
    x = torch.randn(b, d, device=device, dtype=dtype)
    w = torch.randn(d, s, device=device, dtype=dtype)
    x @ w
    times = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        x @ w
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * b * d * s / statistics.median(times)


def throughput(arch: str, args, device: torch.device, sparse_kernels: bool = True) -> dict:
    """Tokens/s and FLOP/s of `args.steps` training steps (after one warm-up step)."""
    x = torch.randn(args.batch, args.d_model, device=device)
    n = args.steps + 1
    cfg = TrainConfig(
        arch=arch,
        d_sae=args.d_sae,
        k=32,
        batch_size=args.batch,
        n_epochs=1,
        device=str(device),
        warmup_steps=1,
        norm_max_tokens=args.batch,
        b_dec_init="zero",
        log_every=1,
        checkpoint_every=0,
        aux_k=256,
        dead_after_tokens=10**9,
        sparse_kernels=sparse_kernels,
    )
    stamps: list[float] = []

    def log(metrics, step):  # float() of the loss has synchronised the device already
        stamps.append(time.perf_counter())

    train_saes(lambda epoch: [x] * n, args.d_model, [cfg], [log], progress=False, n_steps=n)
    seconds = (stamps[-1] - stamps[0]) / args.steps
    b, d, s = args.batch, args.d_model, args.d_sae
    dense = 12 * b * d * s
    sparse = 2 * b * d * s + 8 * b * 32 * d
    return {
        "tokens_per_s": b / seconds,
        "step_s": seconds,
        "tflops": dense / seconds / 1e12,
        "dense_flops": dense,
        "sparse_flops": sparse if arch == "topk" and sparse_kernels else dense,
    }


def write_shards(root: Path, n_tokens: int, d_model: int) -> Path:
    """Random float16 vectors as a one-layer shard set (images of 64 tokens)."""
    tokens, rng = 64, np.random.default_rng(0)
    n_images = -(-n_tokens // tokens)
    w = shards.ShardWriter(root, 0, "train", d_model, np.float16, tokens, 16)
    for start in range(0, n_images, 64):
        m = min(64, n_images - start)
        acts = rng.standard_normal((m, tokens, d_model), dtype=np.float32).astype(np.float16)
        w.add(np.arange(start, start + m), np.arange(tokens, dtype=np.int32), acts)
    write_manifest(root, w.close(), n_images, tokens, d_model)
    return root


def sweep(args, device: torch.device) -> dict:
    """Seconds for N SAEs as one sweep vs as N separate runs, all reading the shards."""
    ks = [8, 16, 32, 64][: args.n_sweep]
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        shard_dir = write_shards(Path(tmp), args.sweep_tokens, args.d_model)

        def make_batches(epoch):
            for x in loaders.iter_shuffled(shard_dir, 0, args.sweep_batch, seed=epoch, dtype=None):
                yield torch.from_numpy(x)

        cfgs = [
            TrainConfig(
                arch="topk",
                d_sae=args.sweep_d_sae,
                k=k,
                batch_size=args.sweep_batch,
                n_epochs=1,
                device=str(device),
                warmup_steps=1,
                checkpoint_every=0,
                norm_max_tokens=4 * args.sweep_batch,
                log_every=10**6,
            )
            for k in ks
        ]
        n_steps = -(-args.sweep_tokens // args.sweep_batch)
        t = time.perf_counter()
        for x in make_batches(0):
            x.to(device)
        sync(device)
        read = time.perf_counter() - t
        t = time.perf_counter()
        train_saes(make_batches, args.d_model, cfgs, progress=False, n_steps=n_steps)
        sync(device)
        together = time.perf_counter() - t
        t = time.perf_counter()
        for cfg in cfgs:
            train_saes(make_batches, args.d_model, [cfg], progress=False, n_steps=n_steps)
        sync(device)
        apart = time.perf_counter() - t
    return {
        "n": len(ks),
        "ks": ks,
        "d_sae": args.sweep_d_sae,
        "batch": args.sweep_batch,
        "tokens": args.sweep_tokens,
        "read_s": read,
        "sweep_s": together,
        "separate_s": apart,
        "sweep_speedup": apart / together,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--n-sweep", type=int, default=4)
    p.add_argument("--sweep-d-sae", type=int, default=16384)
    p.add_argument("--sweep-batch", type=int, default=4096)
    p.add_argument("--sweep-tokens", type=int, default=400_000)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--cpu-quick",
        action="store_true",
        help="2 timed steps, and a sweep at d_sae 2048, batch 1024 over 16k tokens",
    )
    args = p.parse_args()
    if args.cpu_quick:
        args.steps, args.sweep_d_sae, args.sweep_batch, args.sweep_tokens = 2, 2048, 1024, 16384
    device = resolve_device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"CPU {platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    peak = matmul_flops(args.batch, args.d_model, args.d_sae, device, torch.float32)
    result: dict = {
        "bench": "train",
        "machine": machine,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "d_model": args.d_model,
        "d_sae": args.d_sae,
        "batch": args.batch,
        "steps": args.steps,
        "matmul_tflops": peak / 1e12,
    }
    for name, arch, sparse_kernels in (
        ("relu", "relu", True),
        ("topk", "topk", True),
        ("topk_dense", "topk", False),
    ):
        r = throughput(arch, args, device, sparse_kernels)
        achieved = r["dense_flops"] / r["step_s"]
        result[name] = {
            "tokens_per_s": round(r["tokens_per_s"], 1),
            "step_s": round(r["step_s"], 4),
            "flops_ratio": round(achieved / peak, 3),
            "sparse_flops_ratio": round(r["sparse_flops"] / r["step_s"] / peak, 3),
        }
        print(f"{name}: {result[name]}", flush=True)
    speedup = result["topk"]["tokens_per_s"] / result["topk_dense"]["tokens_per_s"]
    result["topk_sparse_speedup"] = round(speedup, 2)
    result["sweep"] = {
        k: (round(v, 3) if isinstance(v, float) else v) for k, v in sweep(args, device).items()
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
