"""Stats throughput vs the SAE encode alone, peak memory vs token count, and warehouse query latency.

1. Throughput: streams `--n-images` images x `--tokens` tokens of width `--d-model` through
   `saev_core.stats.compute_stats` with a TopK SAE of `--d-sae` features and `--n-labels` patch
   labels, and times the same batches through `sae.encode` alone in the same process. The ratio
   (encode time / stats time; goal >= 0.5) is what the statistics (counts, histograms, exemplars,
   patch- and image-level AUROC, spatial counts) cost on top of the matmul any pass must pay.
   The decoder-neighbour search is a one-off cost per SAE, independent of the tokens: timed apart.
2. Peak RSS: the same stats in two fresh processes, over `--rss-images` and 4x as many images;
   bounded memory means the two peaks match.
3. Queries: a warehouse of two runs of `--d-sae` features x `--n-exemplars` exemplars x
   `--wh-labels` labels (Parquet in a temporary directory, built by `build_warehouse`), and the
   median latency of each named query through `run_query` (open read-only, bind, run, format;
   goal <= 50 ms).

    .venv/bin/python bench/stats.py                      # d_model 768, d_sae 24576 (issue 5)
    .venv/bin/python bench/stats.py --d-model 128 --d-sae 1024 --n-images 200 --rss-images 50

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from saev_core.sae import SAE, SAEConfig
from saev_core.stats import StatsConfig, compute_stats, decoder_neighbors


def batches(n_images, tokens, d_model, images_per_batch, seed=0):
    rng = np.random.default_rng(seed)
    for start in range(0, n_images, images_per_batch):
        n = min(images_per_batch, n_images - start)
        ids = np.repeat(np.arange(start, start + n, dtype=np.int64), tokens)
        toks = np.tile(np.arange(tokens, dtype=np.int32), n)
        yield ids, toks, rng.standard_normal((n * tokens, d_model), dtype=np.float32)


def patch_labels(n_images, tokens, n_labels, seed=1):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "image_id": np.repeat(np.arange(n_images), 8),
            "token": rng.integers(1, tokens, size=n_images * 8).astype(np.int32),
            "label": rng.choice([f"label{i}" for i in range(n_labels)], n_images * 8),
        }
    ).drop_duplicates()


def make_sae(args) -> SAE:
    return SAE(
        SAEConfig(arch="topk", d_model=args.d_model, d_sae=args.d_sae, k=args.k),
        generator=torch.Generator().manual_seed(0),
    )


def run_stats(args, n_images: int, sae: SAE | None = None) -> tuple[float, int]:
    """Seconds for compute_stats over n_images (no neighbour search: timed apart), and the
    refinement passes it made (the batches are re-streamable, as in the stats stage)."""
    sae = sae or make_sae(args)
    labels = patch_labels(n_images, args.tokens, args.n_labels)
    cfg = StatsConfig(n_top=16, splits=("train",), n_neighbors=0, exact_codes=args.exact_codes)

    def gen():
        return batches(n_images, args.tokens, args.d_model, args.images_per_batch)

    t = time.perf_counter()
    st = compute_stats(sae, gen, labels, None, 1, cfg, run="bench", progress=False)
    return time.perf_counter() - t, st.refine_passes


def child_rss(args, n_images: int) -> float:
    """Peak RSS (MB) of a fresh process that runs the stats over n_images."""
    cmd = [sys.executable, __file__, "--child-images", str(n_images)]
    for k in ("d_model", "d_sae", "k", "tokens", "images_per_batch", "n_labels", "threads",
              "exact_codes"):  # fmt: skip
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def build_bench_warehouse(root: Path, d_sae: int, n_ex: int, n_labels: int, n_images: int):
    """Two runs of stats Parquet shaped like write_stats' (random values), and the warehouse."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from saev_core.warehouse import build_warehouse

    rng = np.random.default_rng(0)
    labels = [f"label{i:03d}" for i in range(n_labels)]
    act = root / "artifacts" / "activations" / "bench"
    act.mkdir(parents=True)
    img_labels = [list(rng.choice(labels, 3, replace=False)) for _ in range(n_images)]
    pq.write_table(
        pa.table(
            {
                "image_id": pa.array(np.arange(n_images), pa.int64()),
                "split": ["val"] * n_images,
                "path": [f"img/{i}.png" for i in range(n_images)],
                "labels": pa.array(img_labels, pa.list_(pa.string())),
            }
        ),
        act / "images.parquet",
    )
    for run in ("bench_a", "bench_b"):
        out = root / "artifacts" / "stats" / run
        out.mkdir(parents=True)
        freq = 10 ** rng.uniform(-6, -1, d_sae)
        freq[rng.random(d_sae) < 0.05] = 0
        feats = pd.DataFrame(
            {
                "run": run,
                "feature": np.arange(d_sae),
                "freq": freq,
                "freq_images": np.minimum(freq * 50, 1),
                "freq_cls": freq,
                "freq_patches": freq,
                "n_fires": (freq * 1e7).astype(np.int64),
                "mean_act": np.where(freq > 0, rng.lognormal(0, 1, d_sae), np.nan),
                "max_act": rng.lognormal(1, 1, d_sae),
                "log10_freq": np.where(freq > 0, np.log10(np.maximum(freq, 1e-12)), np.nan),
                "log10_mean_act": rng.normal(0, 1, d_sae),
                "spatial_entropy": rng.random(d_sae),
            }
        )
        feats.to_parquet(out / "features.parquet")
        n = d_sae * n_ex
        pd.DataFrame(
            {
                "run": run,
                "feature": np.repeat(np.arange(d_sae), n_ex),
                "rank": np.tile(np.arange(1, n_ex + 1, dtype=np.int32), d_sae),
                "image_id": rng.integers(0, n_images, n),
                "token": rng.integers(1, 197, n).astype(np.int32),
                "value": rng.random(n),
            }
        ).to_parquet(out / "top_examples.parquet")
        m = d_sae * n_labels
        pd.DataFrame(
            {
                "run": run,
                "feature": np.tile(np.arange(d_sae), n_labels),
                "label": np.repeat(labels, d_sae),
                "auroc": rng.random(m),
                "mean_in": rng.random(m),
                "mean_out": rng.random(m),
                "n_pos": np.repeat(rng.integers(1, 10_000, n_labels), d_sae),
                "image_auroc": rng.random(m),
            }
        ).to_parquet(out / "feature_labels.parquet")
        pd.DataFrame(
            {
                "run": run,
                "feature": np.repeat(np.arange(d_sae), 8),
                "rank": np.tile(np.arange(1, 9, dtype=np.int32), d_sae),
                "neighbor": rng.integers(0, d_sae, d_sae * 8),
                "cosine": rng.random(d_sae * 8),
            }
        ).to_parquet(out / "neighbors.parquet")
        pd.DataFrame(
            {
                "run": [run],
                "shard_dir": ["artifacts/activations/bench"],
                "d_sae": [d_sae],
                "n_prefix_tokens": [1],
            }
        ).to_parquet(out / "run.parquet")
    db = root / "warehouse" / "saev.duckdb"
    t = time.perf_counter()
    report = build_warehouse(db, root=root, sql_dir=Path(__file__).resolve().parents[1] / "sql")
    return db, time.perf_counter() - t, report


QUERY_PARAMS = {
    "best_feature_per_concept": {"run": "bench_a"},
    "compare_runs": {},
    "dead_and_dense": {"run": "bench_a"},
    "feature_exemplars": {"run": "bench_a", "feature": "17"},
    "feature_matches": {"run": "bench_a", "feature": "17"},
    "feature_neighbors": {"run": "bench_a", "feature": "17"},
    "features_without_counterpart": {
        "run": "bench_a",
        "other_run": "bench_b",
        "label": "label007",
        "min_auroc": "0.99",
    },
    "frequency_value": {"run": "bench_a"},
    "labels_for_feature": {"run": "bench_a", "feature": "17"},
    "semantic_breadth": {"run": "bench_a"},
    "top_features_for_label": {"label": "label007", "run": "bench_a"},
}


def bench_queries(db: Path, root: Path, reps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms per named query: on an open connection, and end to end through `run_query`
    (which also opens the database read-only, checks the run names and formats JSON)."""
    import duckdb

    from saev_core.warehouse import list_queries, run_query
    from saev_core.warehouse.queries import _bind

    sql_dir = Path(__file__).resolve().parents[1] / "sql"
    specs = {q.name: q for q in list_queries(sql_dir) if q.name in QUERY_PARAMS}
    in_db, end_to_end = {}, {}
    con = duckdb.connect(str(db), read_only=True)
    con.execute("set file_search_path = $root", {"root": str(root)})
    try:
        for name, spec in specs.items():
            sql, bound = (
                (sql_dir / "queries" / f"{name}.sql").read_text(),
                _bind(spec, QUERY_PARAMS[name]),
            )
            times = []
            for _ in range(reps + 1):  # the first call warms the page cache
                t = time.perf_counter()
                con.execute(sql, bound).fetchall() if bound else con.execute(sql).fetchall()
                times.append(time.perf_counter() - t)
            in_db[name] = round(1000 * statistics.median(times[1:]), 1)
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                run_query(db, name, QUERY_PARAMS[name], "json", root, sql_dir)
                times.append(time.perf_counter() - t)
            end_to_end[name] = round(1000 * statistics.median(times), 1)
    finally:
        con.close()
    return in_db, end_to_end


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=24576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=197, help="tokens per image (ViT-B/16: 197)")
    p.add_argument("--n-images", type=int, default=48)
    p.add_argument("--images-per-batch", type=int, default=16)
    p.add_argument("--n-labels", type=int, default=8)
    p.add_argument(
        "--exact-codes",
        type=int,
        default=StatsConfig().exact_codes,
        help="stats.exact_codes; 0 forces the histogram path with refinement passes, which "
        "a corpus too large for exact ranks (ImageNet) takes",
    )
    p.add_argument("--rss-images", type=int, default=16, help="RSS: this many and 4x as many")
    p.add_argument("--n-exemplars", type=int, default=64)
    p.add_argument("--wh-labels", type=int, default=100)
    p.add_argument("--wh-images", type=int, default=50_000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--skip", default="", help="comma-separated parts to skip: stats,rss,queries")
    p.add_argument("--child-images", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_images:
        run_stats(args, args.child_images)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"peak_rss_mb": round(rss, 1)}))
        return
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"bench": "stats", "d_model": args.d_model, "d_sae": args.d_sae, "k": args.k}

    if "stats" not in skip:
        sae = make_sae(args)
        n_tokens = args.n_images * args.tokens
        with torch.inference_mode():
            sae.encode(torch.zeros(64, args.d_model))  # warm up
            t = time.perf_counter()
            for _, _, x in batches(args.n_images, args.tokens, args.d_model, args.images_per_batch):
                sae.encode(torch.from_numpy(x))
            encode_s = time.perf_counter() - t
        stats_s, refine_passes = run_stats(args, args.n_images, sae)
        t = time.perf_counter()
        with torch.inference_mode():
            decoder_neighbors(sae.W_dec, 8)
        neighbors_s = time.perf_counter() - t
        result |= {
            "n_tokens": n_tokens,
            "n_labels": args.n_labels,
            "encode_tokens_per_s": round(n_tokens / encode_s, 1),
            "stats_tokens_per_s": round(n_tokens / stats_s, 1),
            "ratio_to_encode": round(encode_s / stats_s, 3),
            "refine_passes": refine_passes,
            "exact_codes": args.exact_codes,
            "neighbors_s": round(neighbors_s, 2),
        }
        print(json.dumps(result), file=sys.stderr)
    if "rss" not in skip:
        small, large = args.rss_images, 4 * args.rss_images
        rss_small, rss_large = child_rss(args, small), child_rss(args, large)
        result |= {
            "rss_tokens": [small * args.tokens, large * args.tokens],
            "peak_rss_mb": [rss_small, rss_large],
            "rss_growth": round(rss_large / rss_small, 3),
        }
        print(json.dumps(result), file=sys.stderr)
    if "queries" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            db, build_s, report = build_bench_warehouse(
                Path(tmp), args.d_sae, args.n_exemplars, args.wh_labels, args.wh_images
            )
            lat, lat_e2e = bench_queries(db, Path(tmp), args.reps)
        result |= {
            "warehouse": f"2 runs x {args.d_sae} features x {args.n_exemplars} exemplars x "
            f"{args.wh_labels} labels, {args.wh_images} images",
            "warehouse_build_s": round(build_s, 2),
            "feature_matches_rows": report["views"]["feature_matches"],
            "warehouse_build_parts_s": {k: v for k, v in report["seconds"].items() if v >= 1},
            "query_median_ms": lat,
            "query_max_median_ms": max(lat.values()),
            "run_query_median_ms": lat_e2e,
            "run_query_max_median_ms": max(lat_e2e.values()),
        }
    result["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch threads, "
        f"{platform.processor() or 'cpu'}, no GPU"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
