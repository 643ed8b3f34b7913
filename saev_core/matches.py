"""Pair the features of two SAE runs: by decoder cosine and by overlap of their exemplar images.

For every ordered pair of runs (a, b) and every feature of a, `match_runs` keeps the `n_matches`
features of b with the most similar decoder direction and the `n_matches` whose exemplar images
overlap most (Jaccard of the top-image sets), and scores each kept pair both ways. A feature of a
whose best partner in b scores low on both has no counterpart there: the question behind the
paper's CLIP vs DINOv2 comparison.

- Decoder cosine needs both checkpoints (`sae.safetensors`, only `W_dec` is read) and the same
  `d_model`; it is null otherwise. A scalar input normalisation leaves cosines unchanged.
- Exemplar overlap compares image ids, so it is meaningful when both runs streamed the same image
  corpus (for example two backbones extracted from the same `data/`).

Work is done `chunk` features of a at a time, so memory stays chunk x d_sae(b).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

MATCH_SCHEMA = pa.schema(
    [
        ("run_a", pa.string()),
        ("feature_a", pa.int64()),
        ("run_b", pa.string()),
        ("feature_b", pa.int64()),
        ("decoder_cos", pa.float64()),
        ("exemplar_jaccard", pa.float64()),
        ("decoder_rank", pa.int32()),
        ("exemplar_rank", pa.int32()),
    ]
)


def load_decoder(sae_dir: str | Path) -> np.ndarray | None:
    """`W_dec` [d_sae, d_model] of a checkpoint as float32 unit rows, or None if it is missing."""
    path = Path(sae_dir) / "sae.safetensors"
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        if "W_dec" not in f.keys():
            return None
        W = f.get_tensor("W_dec").astype(np.float32)
    return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)


def match_runs(
    run_a: str,
    run_b: str,
    dec_a: np.ndarray | None,
    dec_b: np.ndarray | None,
    top_a: tuple[np.ndarray, np.ndarray],
    top_b: tuple[np.ndarray, np.ndarray],
    d_sae_a: int,
    d_sae_b: int,
    n_matches: int = 3,
    chunk: int = 2048,
) -> pa.Table:
    """The `feature_matches` rows of run a against run b (see the module docstring).

    `dec_*` are unit decoder rows (or None), `top_*` the (feature, image_id) exemplar pairs.
    A pair chosen by one method gets the other method's score too (0 overlap when the exemplar
    sets are disjoint; null cosine when decoders are unavailable); `*_rank` is its rank under the
    method that chose it (1 = best), null when that method did not choose it.
    """
    from scipy import sparse

    use_dec = dec_a is not None and dec_b is not None and dec_a.shape[1] == dec_b.shape[1]
    # exemplar sets over the union of both runs' image ids
    images = np.union1d(top_a[1], top_b[1])
    col_a, col_b = np.searchsorted(images, top_a[1]), np.searchsorted(images, top_b[1])
    A = sparse.csr_matrix(
        (np.ones(len(col_a), np.float32), (top_a[0], col_a)), shape=(d_sae_a, len(images))
    )
    B = sparse.csr_matrix(
        (np.ones(len(col_b), np.float32), (top_b[0], col_b)), shape=(d_sae_b, len(images))
    )
    A.data[:], B.data[:] = 1.0, 1.0
    size_a = np.asarray(A.sum(1)).ravel()
    size_b = np.asarray(B.sum(1)).ravel()
    Bt = B.T.tocsc()
    n_dec = min(n_matches, d_sae_b) if use_dec else 0
    names = [k for k in MATCH_SCHEMA.names if k not in ("run_a", "run_b")]
    out: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for lo in range(0, d_sae_a, chunk):
        hi = min(lo + chunk, d_sae_a)
        n = hi - lo
        inter = (A[lo:hi] @ Bt).tocoo()  # [n, d_sae_b]: shared exemplar images per pair
        jac = inter.data / (size_a[lo + inter.row] + size_b[inter.col] - inter.data)
        inter_key = inter.row.astype(np.int64) * d_sae_b + inter.col
        by_key = np.argsort(inter_key)
        inter_key, jac = inter_key[by_key], jac[by_key]
        # exemplar matches: the n_matches largest Jaccard values per row (ties: lower feature)
        order = np.lexsort((inter_key % d_sae_b, -jac, inter_key // d_sae_b))
        row_s = inter_key[order] // d_sae_b
        rank = np.arange(len(order)) - np.searchsorted(row_s, row_s)
        keep = order[rank < n_matches]
        ex_key, ex_rank = inter_key[keep], rank[rank < n_matches] + 1
        cos = None
        dec_key = dec_rank = np.zeros(0, np.int64)
        if n_dec:
            cos = dec_a[lo:hi] @ dec_b.T  # [n, d_sae_b]
            top = np.argsort(-cos, axis=1, kind="stable")[:, :n_dec]
            dec_key = (np.arange(n)[:, None] * d_sae_b + top).ravel()
            dec_rank = np.tile(np.arange(1, n_dec + 1), n)
        keys = np.union1d(ex_key, dec_key)
        if len(keys) == 0:
            continue
        rows, cols = keys // d_sae_b, keys % d_sae_b
        at = np.minimum(np.searchsorted(inter_key, keys), max(len(inter_key) - 1, 0))
        shared = (len(inter_key) > 0) & (inter_key[at] == keys) if len(inter_key) else None
        out["feature_a"].append(rows + lo)
        out["feature_b"].append(cols)
        out["decoder_cos"].append(
            cos[rows, cols].astype(np.float64) if cos is not None else np.full(len(keys), np.nan)
        )
        out["exemplar_jaccard"].append(
            np.where(shared, jac[at], 0.0) if shared is not None else np.zeros(len(keys))
        )
        out["decoder_rank"].append(_rank_of(keys, dec_key, dec_rank))
        out["exemplar_rank"].append(_rank_of(keys, ex_key, ex_rank))
    if not out["feature_a"]:
        return MATCH_SCHEMA.empty_table()
    cols = {k: np.concatenate(v) for k, v in out.items()}
    n_rows = len(cols["feature_a"])
    return pa.table(
        {
            "run_a": pa.array([run_a] * n_rows, pa.string()),
            "feature_a": pa.array(cols["feature_a"], pa.int64()),
            "run_b": pa.array([run_b] * n_rows, pa.string()),
            "feature_b": pa.array(cols["feature_b"], pa.int64()),
            "decoder_cos": pa.array(
                cols["decoder_cos"], pa.float64(), mask=np.isnan(cols["decoder_cos"])
            ),
            "exemplar_jaccard": pa.array(cols["exemplar_jaccard"], pa.float64()),
            "decoder_rank": pa.array(
                cols["decoder_rank"], pa.int32(), mask=cols["decoder_rank"] == 0
            ),
            "exemplar_rank": pa.array(
                cols["exemplar_rank"], pa.int32(), mask=cols["exemplar_rank"] == 0
            ),
        },
        schema=MATCH_SCHEMA,
    )


def _rank_of(keys: np.ndarray, chosen: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """The rank of each key among `chosen` (sorted or not), 0 where it was not chosen."""
    order = np.argsort(chosen)
    chosen, rank = chosen[order], rank[order]
    at = np.minimum(np.searchsorted(chosen, keys), max(len(chosen) - 1, 0))
    if len(chosen) == 0:
        return np.zeros(len(keys), np.int64)
    return np.where(chosen[at] == keys, rank[at], 0)
