"""The statistics of an intervention verdict: paired bootstrap intervals, a paired sign-flip
permutation test against many controls, multiplicity correction, and the verdict itself.

Design (issue 14). Every condition of an experiment (the edit, each random-feature control,
each random-direction control) is measured on the same images, so everything is paired by image:

- `e[i]`: the edit's effect on image i (change in the target's probability; for segmentation
  the image's mean change over patches); `c[k, i]`: control k's effect on the same image.
- The test statistic is the mean over images of the per-image paired difference
  `d[i] = e[i] - mean_k c[k, i]`: the edit against the mean of all K controls on that image.
  `vs_control_lo/hi` is its percentile bootstrap 95% interval over images; `p_value` a paired
  sign-flip permutation test of `mean(d)` (under the null the edit and the average control are
  exchangeable on every image, so each d[i] is symmetric about 0): exact over all 2^n sign
  vectors when that is no more than `n_permutations`, else Monte Carlo with the +1 correction
  (the definitions of `scipy.stats.permutation_test`, which the tests check against).
- The controls' spread is reported as the median and the 2.5 / 97.5 percentiles of the
  controls' mean effects (`control_median`, `control_lo`, `control_hi`), and the edit's rank among
  them as `control_rank_p` = (1 + controls at least as extreme as the edit) / (K + 1): the
  p-value a rank test would give, coarse (>= 1/(K+1)) but free of any pairing assumption.
- `alternative` is sign-aware (`resolve_alternative`): suppress, clamp to <= 0, scale < 1 and a
  negative add test for a decrease ("less"); add > 0, clamp > 0 and scale > 1 for an increase
  ("greater"); "two-sided" on request or when the edit is a no-op (scale 1, add 0).
- `beyond_controls`: the edit's mean effect lies beyond the controls' 95% range in the tested
  direction (below `control_lo` for "less", above `control_hi` for "greater", outside
  [control_lo, control_hi] for two-sided); False with no control. The paired test compares the
  edit with the controls' *mean* only, so it passes when a few controls move the target as much
  as the edit; this asks that the edit also beat (nearly) every control on its own.
- `adjust` applies Holm (family-wise error) or Benjamini-Hochberg (false discovery rate) over
  every hypothesis x strength of a run; the verdict is "supported" when the adjusted p is below
  alpha, the edit is `beyond_controls`, and both the edit's own effect and its difference from
  the controls point the tested way.
- Non-finite effects (a NaN probability on some image) give a NaN p-value (left out of the
  multiplicity family) and "not supported": dropping the image would break the pairing.

Bootstraps take a precomputed count matrix `W [n_boot, n]` (how often each image is drawn in
each resample): every statistic of an experiment is resampled with the same images, and a
bootstrap of m statistics at once is one matrix product. Pure numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ALTERNATIVES = ("auto", "less", "greater", "two-sided")
CORRECTIONS = ("holm", "bh")
SUPPORTED, NOT_SUPPORTED = "supported", "not supported"


# ---------------------------------------------------------------------------------------------
# bootstrap


def resample_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, n] float: how often each of n items is drawn in each of `n_boot` resamples with
    replacement (rows sum to n)."""
    if n < 1:
        raise ValueError("resample_counts: need at least one item")
    idx = rng.integers(0, n, size=(n_boot, n))
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)
    return counts


def boot_means(W: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bootstrap means [n_boot, ...] of `values` [n, ...] (items first) under counts `W`."""
    v = np.asarray(values, dtype=np.float64)
    flat = v.reshape(v.shape[0], -1)
    return (W @ flat / W.shape[1]).reshape(W.shape[0], *v.shape[1:])


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[Any, Any]:
    """(lo, hi) percentiles of bootstrap samples along axis 0 (NaN samples ignored)."""
    q = 50 * (1 - level)
    s = np.asarray(samples, dtype=np.float64)
    if s.size == 0 or not np.isfinite(s).any():
        return float("nan"), float("nan")
    lo, hi = np.nanpercentile(s, [q, 100 - q], axis=0)
    return (float(lo), float(hi)) if np.ndim(lo) == 0 else (lo, hi)


def mean_ci(values: np.ndarray, W: np.ndarray) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of `values` [n]."""
    return percentile_ci(boot_means(W, values))


def ratio_ci(num: np.ndarray, den: np.ndarray, W: np.ndarray) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of sum(num) / sum(den) over resampled items (a rate
    whose denominator differs per image: pixels, labels); resamples with no denominator drop."""
    n = W @ np.asarray(num, np.float64)
    d = W @ np.asarray(den, np.float64)
    return percentile_ci(np.where(d > 0, n / np.where(d > 0, d, 1), np.nan))


# ---------------------------------------------------------------------------------------------
# permutation test


def sign_flips(n: int, n_permutations: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """([R, n] matrix of +-1, exact): every one of the 2^n sign vectors when 2^n <= n_permutations
    (exact test), else `n_permutations` random ones."""
    if n < 1:
        raise ValueError("sign_flips: need at least one item")
    if n < 63 and 2**n <= n_permutations:
        codes = np.arange(2**n, dtype=np.int64)[:, None] >> np.arange(n, dtype=np.int64)
        return 1.0 - 2.0 * (codes & 1), True
    return rng.choice(np.array([-1.0, 1.0]), size=(n_permutations, n)), False


def sign_flip_pvalue(d: np.ndarray, alternative: str, flips: tuple[np.ndarray, bool]) -> float:
    """Paired permutation p-value of mean(d) (H0: each d[i] is symmetric about 0), as
    `scipy.stats.permutation_test(..., permutation_type="samples")` defines it: the null
    distribution is mean(s * d) over the sign vectors `flips`; Monte Carlo p-values count the
    observed one (+1 / R + 1); two-sided = min(1, 2 x the smaller one-sided p)."""
    S, exact = flips
    d = np.asarray(d, dtype=np.float64)
    if len(d) != S.shape[1]:
        raise ValueError(f"sign_flip_pvalue: {len(d)} differences for {S.shape[1]}-wide flips")
    if alternative not in ("less", "greater", "two-sided"):
        raise ValueError(f"alternative must be less|greater|two-sided, got {alternative!r}")
    if not np.isfinite(d).all():  # NaN compares False everywhere: it would read as p = 0
        return float("nan")
    observed = d.mean()
    null = S @ d / len(d)
    gamma = abs(observed) * np.finfo(np.float64).eps * 100  # scipy's tie tolerance
    adj = 0 if exact else 1
    p_less = ((null <= observed + gamma).sum() + adj) / (len(null) + adj)
    p_greater = ((null >= observed - gamma).sum() + adj) / (len(null) + adj)
    if alternative == "less":
        return float(p_less)
    if alternative == "greater":
        return float(p_greater)
    if alternative == "two-sided":
        return float(min(1.0, 2 * min(p_less, p_greater)))
    raise ValueError(f"alternative must be less|greater|two-sided, got {alternative!r}")


# ---------------------------------------------------------------------------------------------
# direction, multiplicity, verdict


def resolve_alternative(op: str, strength: float, alternative: str = "auto") -> str:
    """The tested direction of an edit's effect on its target (see the module docstring)."""
    if alternative not in ALTERNATIVES:
        raise ValueError(
            f"alternative must be one of {'|'.join(ALTERNATIVES)}, got {alternative!r}"
        )
    if alternative != "auto":
        return alternative
    s = float(strength)
    if op == "suppress":
        return "less"
    if op == "clamp":
        return "less" if s <= 0 else "greater"
    if op == "scale":
        return "less" if s < 1 else "greater" if s > 1 else "two-sided"
    if op == "add":
        return "less" if s < 0 else "greater" if s > 0 else "two-sided"
    raise ValueError(f"unknown edit op {op!r}")


def adjust(p_values: Any, method: str = "holm") -> np.ndarray:
    """Adjusted p-values over one family: Holm's step-down (family-wise error rate) or
    Benjamini-Hochberg's step-up (false discovery rate). A NaN p-value (a test that ran but could
    not be computed) stays NaN and counts in the family as p = 1: leaving it out would shrink m
    and make the correction less conservative."""
    if method not in CORRECTIONS:
        raise ValueError(f"correction must be one of {'|'.join(CORRECTIONS)}, got {method!r}")
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = p.size
    if not ok.any():
        return out
    q = np.where(ok, p, 1.0).ravel()
    order = np.argsort(q, kind="stable")
    ranked = q[order]
    i = np.arange(1, m + 1)
    if method == "holm":  # p_(i) -> max_{j <= i} (m - j + 1) p_(j)
        adj = np.maximum.accumulate((m - i + 1) * ranked)
    else:  # p_(i) -> min_{j >= i} m p_(j) / j
        adj = np.minimum.accumulate((m * ranked / i)[::-1])[::-1]
    back = np.empty(m)
    back[order] = np.minimum(adj, 1.0)
    out[ok] = back.reshape(p.shape)[ok]
    return out


def in_direction(value: float, alternative: str) -> bool:
    """Whether `value` points the tested way (two-sided: any nonzero value)."""
    if not np.isfinite(value):
        return False
    if alternative == "less":
        return value < 0
    if alternative == "greater":
        return value > 0
    return value != 0


def beyond_controls(edit: float, control_lo: float, control_hi: float, alt: str) -> bool:
    """Whether the edit's mean effect lies beyond the controls' 95% range [control_lo,
    control_hi] in the tested direction (two-sided: outside it); False when there is no range
    (no control) or the effect is not finite."""
    if not all(np.isfinite(v) for v in (edit, control_lo, control_hi)):
        return False
    if alt == "less":
        return bool(edit < control_lo)
    if alt == "greater":
        return bool(edit > control_hi)
    if alt == "two-sided":
        return bool(edit < control_lo or edit > control_hi)
    raise ValueError(f"alternative must be less|greater|two-sided, got {alt!r}")


def verdict(
    p_adjusted: float, alpha: float, delta: float, vs_control: float, alt: str, beyond: bool
) -> str:
    """'supported' when p_adjusted < alpha, the edit is `beyond` the controls' 95% range
    (`beyond_controls`) and both the edit's own mean effect and its mean difference from the
    controls point the tested way (for two-sided: the same way), else 'not supported'."""
    if not (np.isfinite(p_adjusted) and p_adjusted < alpha) or not beyond:
        return NOT_SUPPORTED
    same_way = alt != "two-sided" or np.sign(delta) == np.sign(vs_control)
    ok = in_direction(delta, alt) and in_direction(vs_control, alt) and same_way
    return SUPPORTED if ok else NOT_SUPPORTED


# ---------------------------------------------------------------------------------------------
# the comparison of one edit with its controls


def against_controls(
    e: np.ndarray,
    c: np.ndarray,
    alternative: str,
    W: np.ndarray,
    flips: tuple[np.ndarray, bool],
) -> dict[str, Any]:
    """The row statistics of one edit `e` [n] against controls `c` [K, n] on the same images
    (module docstring). With no control (K = 0) the edit is tested against no change (d = e)."""
    e = np.asarray(e, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64).reshape(-1, len(e))
    k = len(c)
    d = e - c.mean(axis=0) if k else e
    lo, hi = mean_ci(d, W)
    out: dict[str, Any] = {
        "n_controls": k,
        "alternative": alternative,
        "vs_control": float(d.mean()),
        "vs_control_lo": lo,
        "vs_control_hi": hi,
        "p_value": sign_flip_pvalue(d, alternative, flips),
    }
    nan = float("nan")
    if k:
        means = c.mean(axis=1)
        out["control_median"] = float(np.median(means))
        out["control_lo"], out["control_hi"] = (float(x) for x in np.percentile(means, [2.5, 97.5]))
        edit = e.mean()
        if alternative == "less":
            extreme = (means <= edit).sum()
        elif alternative == "greater":
            extreme = (means >= edit).sum()
        else:
            centre = np.median(means)
            extreme = (np.abs(means - centre) >= abs(edit - centre)).sum()
        out["control_rank_p"] = float((1 + extreme) / (k + 1))
    else:
        out.update(control_median=nan, control_lo=nan, control_hi=nan, control_rank_p=nan)
    out["beyond_controls"] = beyond_controls(
        float(e.mean()), out["control_lo"], out["control_hi"], alternative
    )
    return out
