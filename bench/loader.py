"""Shuffled shard loader vs a raw `.npy` memmap read of the same vectors in the same order.

Writes `--n-vectors` (at least; whole images of `--tokens` tokens) random vectors of width
`--d-model` in float16 twice into a temporary directory: as a shard set through the real
`ShardWriter` with a manifest, and as one `.npy`. Then, in one process, it times

  loader:   `loaders.iter_shuffled` (background reader + batcher threads), and
  baseline: the same piece order (row groups cut into the loader's pieces), the same shuffle
            windows, the same permutation and batch size, each batch one `np.take` from a
            `np.load(mmap_mode="r")` array into a reused buffer, inline (no threads): the best
            case for a raw memmap reader,

both casting to float32 with the same routine (`loaders_common._convert`, torch in one thread) and
again with no cast at all (the stored float16). A first pass checks that both yield the very same
batches. Each measurement is repeated `--repeats` times, interleaved, and the median is reported.
Peak RSS per pass is the kernel's high-water mark (reset through `/proc/self/clear_refs`) above
the RSS just before the pass; file pages the memmap touches count in the baseline's.

    .venv/bin/python bench/loader.py                        # 1M x 768 float16 (issue 3)
    .venv/bin/python bench/loader.py --n-vectors 200000     # quicker

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import write_manifest

from saev_core import loaders, shards
from saev_core.loaders import common as loaders_common
from saev_core.loaders import shuffled as loaders_shuffled


def write_data(root: Path, n_images: int, tokens: int, d_model: int, per_group: int) -> Path:
    """Random float16 activations as a shard set (layer 0, split train) and as `acts.npy`."""
    rng = np.random.default_rng(0)
    npy = np.lib.format.open_memmap(
        root / "acts.npy", mode="w+", dtype=np.float16, shape=(n_images * tokens, d_model)
    )
    w = shards.ShardWriter(root / "shards", 0, "train", d_model, np.float16, tokens, per_group)
    step = 64  # images per chunk: bounds the generator's memory
    for start in range(0, n_images, step):
        n = min(step, n_images - start)
        acts = rng.standard_normal((n, tokens, d_model), dtype=np.float32).astype(np.float16)
        w.add(np.arange(start, start + n), np.arange(tokens, dtype=np.int32), acts)
        npy[start * tokens : (start + n) * tokens] = acts.reshape(-1, d_model)
    npy.flush()
    del npy
    write_manifest(root / "shards", w.close(), n_images, tokens, d_model)
    return root / "shards"


def memmap_batches(npy_path, shard_dir, batch_size, seed, buffer_groups, dtype):
    """The baseline: `iter_shuffled`'s order (same rng draws), each batch one memmap gather."""
    mm = np.load(npy_path, mmap_mode="r")
    m = shards.read_manifest(shard_dir)
    groups = loaders_common._row_groups(m, 0, None)
    starts = np.cumsum([0] + [g.n_rows for g in groups])  # npy rows are in file order
    piece_rows = loaders_shuffled._piece_rows(m, None)
    pieces = loaders_shuffled._pieces(groups, piece_rows)
    per_window = buffer_groups * max(1, -(-loaders_common._max_rows(groups) // piece_rows))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pieces))
    carry = np.empty(0, np.int64)
    # one reused buffer each side: the best case for the baseline (the timing loop keeps nothing)
    buf16 = np.empty((batch_size, mm.shape[1]), mm.dtype)
    buf32 = np.empty((batch_size, mm.shape[1]), np.float32)
    for w in range(0, len(order), per_window):
        window = [pieces[i] for i in order[w : w + per_window]]
        pool = np.concatenate(
            [carry]
            + [np.arange(starts[p.group] + p.start, starts[p.group] + p.stop) for p in window]
        )
        perm = rng.permutation(len(pool))
        # the loader's batches hold their rows grouped by piece (the carry first), pieces in
        # window order: ShardWriter's files hold a row group's vectors in one page, so its
        # parts are exactly these pieces
        starts_w = np.cumsum([0, len(carry)] + [p.stop - p.start for p in window])

        last = w + per_window >= len(order)
        n_out = len(perm) if last else len(perm) // batch_size * batch_size
        for lo in range(0, n_out, batch_size):
            ids = grouped(pool, starts_w, perm[lo : lo + batch_size])
            x = np.take(mm, ids, axis=0, out=buf16[: len(ids)])
            yield (
                x
                if dtype is None
                else loaders_common._convert(x, np.dtype(dtype), buf32[: len(ids)])
            )
        carry = grouped(pool, starts_w, perm[n_out:])


def grouped(pool: np.ndarray, starts: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """`pool[sel]` with the rows grouped by the stretch of `pool` (`starts`) they lie in."""
    return pool[sel[np.argsort(np.searchsorted(starts, sel, "right"), kind="stable")]]


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb(field: str) -> float:
    """`VmRSS` (now) or `VmHWM` (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(make_batches) -> tuple[float, int, float]:
    """(seconds, vectors, peak RSS MiB above the RSS before) of one pass over `make_batches()`."""
    gc.collect()
    reset_peak_rss()
    before = rss_mb("VmRSS")
    n = 0
    t = time.perf_counter()
    for x in make_batches():
        n += len(x)
    return time.perf_counter() - t, n, rss_mb("VmHWM") - before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-vectors", type=int, default=1_000_000)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--tokens", type=int, default=197, help="tokens per image (ViT-B/16: 197)")
    p.add_argument("--images-per-row-group", type=int, default=128, help="extract's default")
    p.add_argument("--batch-size", type=int, default=4096, help="train's default")
    p.add_argument("--buffer-groups", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="where the temporary data goes (default: $TMPDIR)")
    args = p.parse_args()
    n_images = -(-args.n_vectors // args.tokens)

    root = Path(tempfile.mkdtemp(prefix="saev-bench-loader-", dir=args.dir))
    try:
        t = time.perf_counter()
        shard_dir = write_data(root, n_images, args.tokens, args.d_model, args.images_per_row_group)
        npy_path = root / "acts.npy"
        n_groups = len(loaders_common._row_groups(shards.read_manifest(shard_dir), 0, None))
        print(
            f"wrote {n_images * args.tokens:,} x {args.d_model} float16 ({n_groups} row groups) "
            f"twice in {time.perf_counter() - t:.1f} s",
            flush=True,
        )

        def loader(dtype):
            return lambda: loaders.iter_shuffled(
                shard_dir,
                0,
                args.batch_size,
                args.seed,
                buffer_groups=args.buffer_groups,
                dtype=dtype,
            )

        def baseline(dtype):
            return lambda: memmap_batches(
                npy_path, shard_dir, args.batch_size, args.seed, args.buffer_groups, dtype
            )

        # same vectors, same order: compare the first batches (and warm both page caches)
        for i, (a, b) in enumerate(zip(loader("float32")(), baseline("float32")(), strict=True)):
            if i < 3:
                np.testing.assert_array_equal(a, b)
        print("loader and baseline yield identical batches", flush=True)

        runs: dict[str, list[tuple[float, int, float]]] = {}
        for r in range(args.repeats):
            for name, make in (
                ("loader_f32", loader("float32")),
                ("memmap_f32", baseline("float32")),
                ("loader_f16", loader(None)),
                ("memmap_f16", baseline(None)),
            ):
                runs.setdefault(name, []).append(timed(make))
            rates = {k: v[-1][1] / v[-1][0] / 1e6 for k, v in runs.items()}
            print(
                f"repeat {r}: " + ", ".join(f"{k} {v:.2f} M/s" for k, v in rates.items()),
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rate = {k: statistics.median(n / s for s, n, _ in v) for k, v in runs.items()}
    rss = {k: max(r for _, _, r in v) for k, v in runs.items()}
    group_mb = args.images_per_row_group * args.tokens * args.d_model * 2 / 2**20
    result = {
        "bench": "loader",
        "n_vectors": n_images * args.tokens,
        "d_model": args.d_model,
        "dtype": "float16",
        "batch_size": args.batch_size,
        "buffer_groups": args.buffer_groups,
        "row_group_mb": round(group_mb, 1),
        "repeats": args.repeats,
        "loader_vectors_per_s": round(rate["loader_f32"]),
        "memmap_vectors_per_s": round(rate["memmap_f32"]),
        "ratio": round(rate["loader_f32"] / rate["memmap_f32"], 3),
        "loader_native_vectors_per_s": round(rate["loader_f16"]),
        "memmap_native_vectors_per_s": round(rate["memmap_f16"]),
        "ratio_native": round(rate["loader_f16"] / rate["memmap_f16"], 3),
        # peak RSS during each pass above the RSS just before it (the memmap's includes the
        # file pages it maps); the bound is the old reader's: window + prefetch + 3 row groups
        # (iter_shuffled's now: window + prefetch + 1, of which only the window gathered from
        # is touched)
        "loader_peak_rss_delta_mb": round(max(rss["loader_f32"], rss["loader_f16"]), 1),
        "memmap_peak_rss_delta_mb": round(max(rss["memmap_f32"], rss["memmap_f16"]), 1),
        "loader_bound_mb": round((2 * args.buffer_groups + 3) * group_mb, 1),
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cast": "ratio: both sides cast to float32 (torch, one thread); ratio_native: no cast",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}, {platform.python_version()}",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
