"""Do SAEs trained with different seeds find the same features? (issue 15 point 6)

`match_dictionaries` pairs the features of two dictionaries one-to-one by the Hungarian method
(`scipy.optimize.linear_sum_assignment`) so that the summed cosine of matched decoder rows is
largest; the matched cosines' mean and distribution say how much of one dictionary the other
holds. `activation_correlation` then asks whether matched features also fire on the same tokens:
the Pearson correlation of their codes over one token sample. The same measures on random
dictionaries of the same shape (`random_dictionary`; `random_sae_like`: an untrained SAE, as
`SAE.__init__` draws it, with the trained one's normalisation) give the baseline that a
"stable" result must clear: for two independent random unit vectors in d dimensions the cosine
has mean 0 and standard deviation 1/sqrt(d), and the best one-to-one matching of n of them
reaches only about sqrt(2 ln n / d) (`random_cosine_scale`).

`seed_stability` runs it all over SAE checkpoints of one shard set: every pair of trained SAEs
(kind "trained"), each trained SAE against a random one of its shape ("trained_vs_random") and
pairs of random ones ("random"). Shape suffixes: `s` d_sae, `d` d_model, `n` tokens, `m` matches.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass(frozen=True)
class Match:
    """A one-to-one matching: feature `rows[j]` of A goes with `cols[j]` of B at cosine `cos[j]`."""

    rows: np.ndarray
    cols: np.ndarray
    cos: np.ndarray

    @property
    def mean_cos(self) -> float:
        return float(self.cos.mean()) if len(self.cos) else math.nan


def _unit_rows(W: Any, where: str) -> np.ndarray:
    if hasattr(W, "detach"):
        W = W.detach().float().cpu().numpy()
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or W.shape[0] == 0:
        raise ValueError(f"{where} must be a [d_sae, d_model] matrix, got shape {W.shape}")
    if not np.isfinite(W).all():
        raise ValueError(f"{where} holds non-finite values")
    return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)


def match_dictionaries(W_a_sd: Any, W_b_sd: Any) -> Match:
    """Hungarian matching of the rows of two decoders ([d_sae, d_model], numpy or torch) by cosine.

    Signs are kept (a feature and its negation are different features, as SAE codes are >= 0).
    With unequal sizes, every row of the smaller dictionary is matched. `rows` come sorted.
    """
    A, B = _unit_rows(W_a_sd, "W_a"), _unit_rows(W_b_sd, "W_b")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"W_a has d_model {A.shape[1]}, W_b has {B.shape[1]}")
    cos_ab = A @ B.T
    rows, cols = linear_sum_assignment(cos_ab, maximize=True)
    return Match(rows, cols, cos_ab[rows, cols])


def random_dictionary(d_sae: int, d_model: int, seed: int) -> np.ndarray:
    """`[d_sae, d_model]` rows drawn uniformly on the unit sphere (seeded)."""
    rng = np.random.default_rng(seed)
    return _unit_rows(rng.standard_normal((d_sae, d_model)), "random dictionary")


def random_cosine_scale(d_sae: int, d_model: int) -> float:
    """The scale of matched cosines between two random dictionaries: sqrt(2 ln d_sae / d_model),
    the largest of d_sae cosines of standard deviation 1/sqrt(d_model) (Gaussian extreme value);
    a one-to-one matching reaches somewhat less on average, as rows compete for columns."""
    return math.sqrt(2 * math.log(max(d_sae, 2)) / d_model)


def activation_correlation(codes_a_ns: Any, codes_b_ns: Any, match: Match) -> np.ndarray:
    """`[m]` Pearson correlation over the same tokens of each matched pair's codes.

    NaN where either feature is constant on the tokens (dead on the sample).
    """
    a = _as_np(codes_a_ns)[:, match.rows]
    b = _as_np(codes_b_ns)[:, match.cols]
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"codes cover {a.shape[0]} and {b.shape[0]} tokens; they must be the same")
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1), np.nan)


def _as_np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def summarize(match: Match, corr: np.ndarray | None = None) -> dict[str, float]:
    """Mean, quantiles and shares above 0.5 / 0.7 / 0.9 of the matched cosines (and of the
    activation correlations, NaN ones left out, with the share of matches that had one)."""
    out: dict[str, float] = {"n_matched": float(len(match.cos)), "mean_cos": match.mean_cos}
    for q, v in zip(QUANTILES, np.quantile(match.cos, QUANTILES), strict=True):
        out[f"cos_q{int(q * 100):02d}"] = float(v)
    for t in (0.5, 0.7, 0.9):
        out[f"frac_cos_gt_{t}"] = float((match.cos > t).mean())
    if corr is not None:
        ok = corr[~np.isnan(corr)]
        out["frac_corr_defined"] = float(len(ok) / max(len(corr), 1))
        out["mean_corr"] = float(ok.mean()) if len(ok) else math.nan
        for q in QUANTILES:
            out[f"corr_q{int(q * 100):02d}"] = float(np.quantile(ok, q)) if len(ok) else math.nan
        out["frac_corr_gt_0.5"] = float((ok > 0.5).mean()) if len(ok) else math.nan
    return out


def random_sae_like(sae: Any, seed: int) -> Any:
    """An untrained SAE of `sae`'s config (`SAE.__init__` seeded), with its input normalisation
    and `b_dec`: what a matching and a code correlation look like with no training at all."""
    import torch

    from saev_core.sae import SAE

    rnd = SAE(sae.cfg, generator=torch.Generator().manual_seed(int(seed)))
    with torch.no_grad():
        rnd.set_normalisation(sae.norm_mean.detach().cpu(), sae.norm_scale.detach().cpu())
        rnd.b_dec.copy_(sae.b_dec.detach().cpu())
    return rnd.eval()


def encode_all(sae: Any, x_nd: np.ndarray, batch: int = 8192) -> np.ndarray:
    """`[n, d_sae]` dense codes of `sae` on the token sample `x_nd` (float32, CPU)."""
    import torch

    out = []
    with torch.inference_mode():
        for lo in range(0, len(x_nd), batch):
            x = torch.from_numpy(np.asarray(x_nd[lo : lo + batch], np.float32))
            out.append(sae.encode(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, int(sae.cfg.d_sae)), np.float32)


def compare_saes(
    sae_a: Any, sae_b: Any, x_nd: np.ndarray
) -> tuple[dict[str, float], Match, np.ndarray]:
    """Match two SAEs' decoders and correlate the matched codes on the tokens `x_nd`."""
    match = match_dictionaries(sae_a.W_dec, sae_b.W_dec)
    corr = activation_correlation(encode_all(sae_a, x_nd), encode_all(sae_b, x_nd), match)
    return summarize(match, corr), match, corr


def seed_stability(
    sae_dirs: Sequence[str | Path],
    x_nd: np.ndarray,
    n_random: int = 2,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stability over SAE checkpoints trained on the same activations, against random ones.

    `x_nd` is the token sample the codes are correlated on (e.g. `loaders.sample_rows` of the
    val split). Returns `(summary, per_match)`: one summary row per pair (`kind` trained,
    trained_vs_random or random; `a`, `b`; the `summarize` fields) and the matched cosine and
    correlation of every match (`kind`, `a`, `b`, `feature_a`, `feature_b`, `cos`, `corr`).
    Random SAEs copy the first SAE's config and normalisation, seeded `seed + i`.
    """
    from saev_core.sae import SAE

    if len(sae_dirs) < 1:
        raise ValueError("seed_stability needs at least one SAE directory")
    saes = {str(p): SAE.load(p).eval() for p in sae_dirs}
    first = next(iter(saes.values()))
    for name, s in saes.items():
        if int(s.W_dec.shape[1]) != int(first.W_dec.shape[1]):
            raise ValueError(f"{name}: d_model {s.W_dec.shape[1]}, others {first.W_dec.shape[1]}")
    rnd = {f"random{seed + i}": random_sae_like(first, seed + i) for i in range(max(n_random, 0))}
    codes = {k: encode_all(v, x_nd) for k, v in {**saes, **rnd}.items()}
    models = {**saes, **rnd}
    pairs = [("trained", a, b) for a, b in itertools.combinations(saes, 2)]
    if rnd:
        r0 = next(iter(rnd))
        pairs += [("trained_vs_random", a, r0) for a in saes]
    pairs += [("random", a, b) for a, b in itertools.combinations(rnd, 2)]
    rows, per = [], []
    for kind, a, b in pairs:
        match = match_dictionaries(models[a].W_dec, models[b].W_dec)
        corr = activation_correlation(codes[a], codes[b], match)
        rows.append({"kind": kind, "a": a, "b": b, **summarize(match, corr)})
        per.append(
            pd.DataFrame(
                {
                    "kind": kind,
                    "a": a,
                    "b": b,
                    "feature_a": match.rows,
                    "feature_b": match.cols,
                    "cos": match.cos,
                    "corr": corr,
                }
            )
        )
    summary = pd.DataFrame(rows)
    summary["random_cosine_scale"] = random_cosine_scale(
        int(first.cfg.d_sae), int(first.W_dec.shape[1])
    )
    return summary, (pd.concat(per, ignore_index=True) if per else pd.DataFrame())


def write_stability(summary: pd.DataFrame, per_match: pd.DataFrame, out_dir: str | Path) -> Path:
    """Write `seed_stability`'s tables as `out_dir/seed_stability.parquet` (one row per pair)
    and `out_dir/seed_matches.parquet` (one row per matched feature pair), atomically."""
    import pyarrow as pa

    from saev_core.shards import atomic_write_table

    for name, table, need in (
        ("summary", summary, ("kind", "a", "b", "mean_cos")),
        ("per_match", per_match, ("kind", "a", "b", "feature_a", "feature_b", "cos", "corr")),
    ):
        missing = [c for c in need if c not in table.columns]
        if missing:
            raise ValueError(f"write_stability: {name} lacks columns {missing}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_table(
        pa.Table.from_pandas(summary, preserve_index=False), out_dir / "seed_stability.parquet"
    )
    atomic_write_table(
        pa.Table.from_pandas(per_match, preserve_index=False), out_dir / "seed_matches.parquet"
    )
    return out_dir
