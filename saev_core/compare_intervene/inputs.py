"""What the PCA-vs-SAE stage reads, and checks before anything runs: the baselines table's metadata
(`baselines_meta`) and that it was computed with this SAE (`check_baselines_sae`), the stats run's
tokens and splits, and the PCA direction's mean (its own fit sample, drawn again) and largest
centred projection (`pca_mean`, `max_projections`, from the shards).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------
# provenance: the baselines' SAE, the stats' tokens


def baselines_meta(path: str | Path) -> dict[str, Any]:
    """The JSON `write_baselines` put in the table's schema metadata ({} when none)."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(b"saev")
    return json.loads(raw) if raw else {}


def check_baselines_sae(
    table: Any, meta: dict[str, Any], sae_dir: str | Path, W_dec: Any, where: str
) -> None:
    """Refuse a baselines table (`where`) computed with another SAE than the one in `sae_dir`
    (decoder `W_dec` [d_sae, d]): its units were chosen on another dictionary. Checked, each
    when the table has it: the SAE weights sha256 its metadata records (`sae_sha256`); the SAE
    directory it records (`sae`), which must be `sae_dir` or a copy with the same weights'
    sha256; and, always, every `sae` row's `direction`, which `baselines` takes from the SAE's
    decoder row of its `unit` (unit norm, times its `sign`): a digest of the weights that no mtime or path
    changes, so a retrained SAE at the same path is caught too."""
    from saev_core.sae.checks import sae_sha256

    ours = sae_sha256(sae_dir)
    recorded_sha = meta.get("sae_sha256")
    if recorded_sha and recorded_sha != ours:
        raise ValueError(
            f"{where} was computed with an SAE with weights sha256 {recorded_sha}, but the SAE "
            f"{sae_dir} has weights sha256 {ours}: rerun the baselines step"
        )
    recorded = meta.get("sae")
    if recorded and Path(recorded).resolve() != Path(sae_dir).resolve():
        theirs = None
        try:
            theirs = sae_sha256(recorded)
        except FileNotFoundError:
            pass
        if theirs != ours:
            raise ValueError(
                f"{where} was computed with the SAE {recorded}, not {sae_dir} "
                f"({'not found' if theirs is None else f'weights sha256 {theirs} vs {ours}'}): "
                "its best SAE features belong to another dictionary"
            )
    W = np.asarray(W_dec.detach().float().cpu() if hasattr(W_dec, "detach") else W_dec, float)
    for r in table[table["method"] == "sae"].itertuples():
        unit = int(r.unit)
        if not 0 <= unit < len(W):
            raise ValueError(
                f"{where}: the sae row of {r.concept!r} names feature {unit}, but the SAE "
                f"{sae_dir} has {len(W)}: computed with another SAE"
            )
        sign = int(getattr(r, "sign", 1) or 1)  # 1 for an SAE's (one-sided) units
        w = sign * W[unit] / max(float(np.linalg.norm(W[unit])), 1e-12)
        gap = float(np.abs(np.asarray(r.direction, float) - w).max())
        if not gap <= 1e-4:
            raise ValueError(
                f"{where}: the sae row of {r.concept!r} (feature {unit}) has a direction "
                f"{gap:.3g} away from the decoder row of {sae_dir}: the baselines were computed "
                "with another SAE (retrained since?); rerun the baselines step"
            )


def stats_tokens_and_splits(stats_dir: str | Path) -> tuple[str, list[str]]:
    """The token policy and the splits the stats run streamed (its `run.parquet` `tokens` and
    `splits`): the tokens its `max_act` is the max over, so that M covers the same ones."""
    import pyarrow.parquet as pq

    from saev_core.loaders.common import TOKEN_CHOICES

    path = Path(stats_dir) / "run.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the stats run's token policy and splits are needed to take "
            "each PCA direction's max over the tokens the SAE's max_act covers"
        )
    rows = pq.read_table(path).to_pylist()
    row = rows[0] if rows else {}
    tokens, splits = row.get("tokens"), row.get("splits")
    if tokens not in TOKEN_CHOICES or not splits:
        raise ValueError(
            f"{path} records tokens {tokens!r} and splits {splits!r}: stats written before "
            "they were recorded; rerun the stats step"
        )
    return str(tokens), [s for s in str(splits).split(",") if s]


# ---------------------------------------------------------------------------------------------
# the PCA direction's mean and max, from the shards


def pca_mean(shard_dir: str | Path, layer: int, n_fit: int, seed: int) -> np.ndarray:
    """`PCA.mean_` of the baselines step: the mean of its fit sample (`n_fit` train patch
    tokens drawn with `seed`, `loaders.sample_rows`, as `baselines.sae_vs_baselines` draws)."""
    from saev_core.loaders import shuffled as loaders

    x = loaders.sample_rows(shard_dir, layer, n_fit, seed, ["train"], "patches")
    return np.asarray(x, dtype=np.float64).mean(0)


def max_projections(
    shard_dir: str | Path,
    layer: int,
    mean_d: np.ndarray,
    directions_cd: np.ndarray,
    tokens: str,
    batch_images: int,
    splits: list[str] | None = None,
) -> np.ndarray:
    """[c] the largest `(x - mean) . u_c` over every token of policy `tokens` in `splits`
    (None: every split)."""
    from saev_core.loaders import ordered as loaders

    U = np.asarray(directions_cd, dtype=np.float64).T
    best = np.full(U.shape[1], -np.inf)
    batches = loaders.iter_image_batches(shard_dir, layer, batch_images, splits, tokens=tokens)
    for _, _, acts in batches:
        p = (np.asarray(acts, np.float64) - mean_d) @ U
        best = np.maximum(best, p.max(0))
    return best
