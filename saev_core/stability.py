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
    check_size(max(len(A), len(B)))
    # float32 matrix (d_sae^2 of them); matched cosines recomputed in float64 from the rows
    cos_ab = A.astype(np.float32) @ B.astype(np.float32).T
    rows, cols = linear_sum_assignment(cos_ab, maximize=True)
    return Match(rows, cols, np.einsum("md,md->m", A[rows], B[cols]))


MAX_D_SAE = 8192
"Largest dictionary matched: the Hungarian method holds a d_sae^2 cost matrix (scipy: float64)."
MAX_CODE_BYTES = 2 * 1024**3
"Largest dense code matrix (n_tokens * d_sae float32) one SAE's codes may take."


def check_size(d_sae: int, n_tokens: int = 0) -> None:
    """Refuse a matching whose d_sae^2 cosine matrix or n_tokens x d_sae dense codes would not
    fit (`MAX_D_SAE`, `MAX_CODE_BYTES`): say so rather than run out of memory half-way."""
    if d_sae > MAX_D_SAE:
        raise ValueError(
            f"stability: d_sae {d_sae} > {MAX_D_SAE}: the {d_sae}x{d_sae} cosine matrix of the "
            f"Hungarian matching would take {d_sae**2 * 12 / 2**30:.1f} GiB; match a subset "
            "of the features (rows of W_dec) instead"
        )
    if n_tokens * d_sae * 4 > MAX_CODE_BYTES:
        raise ValueError(
            f"stability: {n_tokens} tokens x d_sae {d_sae} dense float32 codes take "
            f"{n_tokens * d_sae * 4 / 2**30:.1f} GiB > {MAX_CODE_BYTES / 2**30:.1f} GiB; "
            f"use at most {MAX_CODE_BYTES // (4 * d_sae)} tokens (--n-tokens)"
        )


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
    a = _as_np(_np_view(codes_a_ns)[:, match.rows])  # only the matched columns in float64
    b = _as_np(_np_view(codes_b_ns)[:, match.cols])
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"codes cover {a.shape[0]} and {b.shape[0]} tokens; they must be the same")
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1), np.nan)


def _np_view(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


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


RANDOM_STREAM = 0x5AE_12A4D
"Mixed with a random SAE's seed so its draw is not the `SAE.__init__` of a trained one."


def random_torch_seed(seed: int) -> int:
    """The torch seed of random SAE `seed`: `SeedSequence([seed, RANDOM_STREAM])`, a stream apart
    from the `Generator().manual_seed(cfg.seed)` that `train_saes` initialises with (with the
    same seed, a "random" SAE would be a trained SAE's own initialisation: matched cosine 1)."""
    state = np.random.SeedSequence([int(seed), RANDOM_STREAM]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2^63


def training_seed(sae: Any) -> int | None:
    """The `TrainConfig.seed` a checkpoint records in cfg.json (`extra.train.seed`), if any."""
    train = (getattr(sae, "extra", None) or {}).get("train") or {}
    return int(train["seed"]) if isinstance(train, dict) and "seed" in train else None


def random_sae_like(sae: Any, seed: int) -> Any:
    """An untrained SAE of `sae`'s config (`SAE.__init__` drawn from `random_torch_seed(seed)`),
    with its input normalisation and `b_dec`: what a matching and a code correlation look like
    with no training at all."""
    import torch

    from saev_core.sae.model import SAE

    rnd = SAE(sae.cfg, generator=torch.Generator().manual_seed(random_torch_seed(seed)))
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
    Random SAEs copy the first SAE's config and normalisation, seeded `seed + i` through
    `random_torch_seed` (a stream apart from training's), refused if one equals a checked SAE's
    recorded training seed. Refused above `MAX_D_SAE` / `MAX_CODE_BYTES` (`check_size`).
    """
    from saev_core.sae.model import SAE

    if len(sae_dirs) < 1:
        raise ValueError("seed_stability needs at least one SAE directory")
    saes = {str(p): SAE.load(p).eval() for p in sae_dirs}
    first = next(iter(saes.values()))
    for name, s in saes.items():
        if int(s.W_dec.shape[1]) != int(first.W_dec.shape[1]):
            raise ValueError(f"{name}: d_model {s.W_dec.shape[1]}, others {first.W_dec.shape[1]}")
    check_size(max(int(s.cfg.d_sae) for s in saes.values()), len(x_nd))
    rnd_seeds = [seed + i for i in range(max(n_random, 0))]
    for name, s in saes.items():
        t = training_seed(s)
        clash = [r for r in rnd_seeds if t is not None and random_torch_seed(r) == t]
        if clash:
            raise ValueError(
                f"{name}/cfg.json: trained from torch seed {t}, the stream of random SAE seed "
                f"{clash[0]}: that random SAE would be its initialisation; pick another --seed"
            )
    rnd = {f"random{r}": random_sae_like(first, r) for r in rnd_seeds}
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


def stability_of(
    shard_dir: str | Path,
    sae_dirs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    n_tokens: int = 20_000,
    split: str = "val",
    n_random: int = 2,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`seed_stability` of SAEs trained on `shard_dir`, codes correlated on `n_tokens` patch
    tokens drawn uniformly from its `split` at the first SAE's layer; written by
    `write_stability` to `out_dir` when given."""
    from saev_core.loaders.shuffled import sample_rows
    from saev_core.sae.checks import check_sae_matches
    from saev_core.sae.model import SAE

    if not sae_dirs:
        raise ValueError("stability: give at least one SAE directory (--sae)")
    for d in sae_dirs:
        check_sae_matches(d, shard_dir)  # refuse an SAE of another backbone or shard set
    extra = SAE.load(sae_dirs[0]).extra
    if "layer" not in extra:
        raise ValueError(f"{sae_dirs[0]}/cfg.json: no extra.layer: which layer was it trained on?")
    x = sample_rows(shard_dir, int(extra["layer"]), n_tokens, seed, [split], "patches")
    if len(x) == 0:
        raise ValueError(f"{shard_dir}: no {split!r} patch tokens to correlate the codes on")
    summary, per_match = seed_stability(sae_dirs, x, n_random=n_random, seed=seed)
    if out_dir is not None:
        write_stability(summary, per_match, out_dir)
    return summary, per_match


def main(argv: list[str] | None = None) -> int:
    """`saev stability`: do SAEs trained with different seeds find the same features?"""
    import argparse

    p = argparse.ArgumentParser(prog="saev stability", description=main.__doc__)
    p.add_argument("--shards", required=True, help="the shard set the SAEs were trained on")
    p.add_argument(
        "--sae", action="append", required=True, help="SAE checkpoint directory (repeat: 2+)"
    )
    p.add_argument("--out", default=None, help="directory for seed_stability/seed_matches.parquet")
    p.add_argument(
        "--n-tokens", type=int, default=20_000, help="tokens the codes are correlated on"
    )
    p.add_argument("--split", default="val", help="split those tokens come from")
    p.add_argument("--n-random", type=int, default=2, help="random SAEs of the same shape")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="token sample and random SAEs (drawn via random_torch_seed, apart from training's)",
    )
    a = p.parse_args(argv)
    summary, _ = stability_of(a.shards, a.sae, a.out, a.n_tokens, a.split, a.n_random, a.seed)
    cols = [c for c in ("kind", "a", "b", "mean_cos", "cos_q50", "mean_corr") if c in summary]
    with pd.option_context("display.width", 160, "display.max_colwidth", 60):
        print(summary[cols].round(3).to_string(index=False))
    return 0
