"""The verdict statistics against independent computations: scipy's permutation test and
bootstrap, scipy's Benjamini-Hochberg, and Holm / BH worked by hand from their definitions."""

import numpy as np
import pytest
from scipy import stats

from saev_core.verdicts import (
    adjust,
    against_controls,
    beyond_controls,
    mean_ci,
    ratio_ci,
    resample_counts,
    resolve_alternative,
    sign_flip_pvalue,
    sign_flips,
    verdict,
)


def _scipy_paired_p(d, alternative, n_resamples, rng=0):
    res = stats.permutation_test(
        (d,),
        np.mean,
        permutation_type="samples",
        alternative=alternative,
        n_resamples=n_resamples,
        random_state=rng,
    )
    return res.pvalue


@pytest.mark.parametrize("alternative", ["less", "greater", "two-sided"])
def test_exact_sign_flip_p_value_equals_scipy(alternative):
    """n = 11 images: 2^11 sign vectors, both enumerate them all, so the p-values are equal."""
    rng = np.random.default_rng(1)
    e = rng.normal(-0.2, 0.3, 11)  # the edit lowers the target a little more than the controls
    c = rng.normal(-0.05, 0.3, (6, 11)) + 0.5 * e  # controls correlated with the edit per image
    d = e - c.mean(0)
    flips = sign_flips(11, 9999, np.random.default_rng(0))
    assert flips[1] and flips[0].shape == (2**11, 11)
    got = against_controls(e, c, alternative, resample_counts(11, 200, rng), flips)
    want = _scipy_paired_p(d, alternative, 9999)
    assert got["p_value"] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got["vs_control"] == pytest.approx(d.mean())


def test_monte_carlo_sign_flip_p_value_agrees_with_scipy():
    rng = np.random.default_rng(2)
    d = rng.normal(0.12, 1.0, 60)  # a weak effect: p in the middle of (0, 1), not at the floor
    flips = sign_flips(60, 40_000, np.random.default_rng(3))
    assert not flips[1]
    for alt in ("less", "greater", "two-sided"):
        want = _scipy_paired_p(d, alt, 40_000, rng=4)
        assert sign_flip_pvalue(d, alt, flips) == pytest.approx(want, abs=0.01), alt
    # a Wilcoxon signed-rank test, another paired test of the same null, broadly agrees
    w = stats.wilcoxon(d, alternative="greater").pvalue
    assert abs(sign_flip_pvalue(d, "greater", flips) - w) < 0.05


def test_no_difference_gives_p_one_and_floor_is_one_over_r_plus_one():
    flips = sign_flips(50, 999, np.random.default_rng(0))
    assert sign_flip_pvalue(np.zeros(50), "less", flips) == 1.0
    huge = np.full(50, -1.0) + np.linspace(0, 0.01, 50)
    assert sign_flip_pvalue(huge, "less", flips) == pytest.approx(1 / 1000)
    assert sign_flip_pvalue(huge, "greater", flips) == 1.0


def test_paired_bootstrap_interval_agrees_with_scipy_bootstrap():
    rng = np.random.default_rng(5)
    e = rng.normal(-0.3, 0.5, 80)
    c = e[None] + rng.normal(0.1, 0.05, (10, 80))  # controls track the edit image by image
    d = e - c.mean(0)
    W = resample_counts(80, 20_000, np.random.default_rng(6))
    got = against_controls(e, c, "less", W, sign_flips(80, 999, rng))
    ref = stats.bootstrap(
        (d,), np.mean, method="percentile", n_resamples=20_000, random_state=7
    ).confidence_interval
    se = d.std() / np.sqrt(80)
    assert got["vs_control_lo"] == pytest.approx(ref.low, abs=0.05 * se * 4)
    assert got["vs_control_hi"] == pytest.approx(ref.high, abs=0.05 * se * 4)
    # pairing matters: the interval of the difference excludes 0 although the edit's and the
    # controls' own intervals overlap (the per-image noise they share cancels)
    assert got["vs_control_hi"] < 0
    e_lo, e_hi = mean_ci(e, W)
    c_lo, c_hi = mean_ci(c.mean(0), W)
    assert e_hi > c_lo and c_hi > e_lo


def test_ratio_interval_agrees_with_scipy_bootstrap():
    rng = np.random.default_rng(8)
    den = rng.integers(1, 20, 60).astype(float)
    num = rng.binomial(den.astype(int), 0.3).astype(float)
    W = resample_counts(60, 20_000, np.random.default_rng(9))
    lo, hi = ratio_ci(num, den, W)
    ref = stats.bootstrap(
        (num, den),
        lambda a, b, axis=-1: a.sum(axis) / b.sum(axis),
        paired=True,
        vectorized=True,
        method="percentile",
        n_resamples=20_000,
        random_state=10,
    ).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.01) and hi == pytest.approx(ref.high, abs=0.01)


def test_control_spread_and_rank():
    rng = np.random.default_rng(11)
    c = rng.normal(0, 0.1, (20, 30)) + np.linspace(-0.5, 0.5, 20)[:, None]
    e = np.full(30, -0.45)
    got = against_controls(e, c, "less", resample_counts(30, 100, rng), sign_flips(30, 999, rng))
    means = c.mean(1)
    assert got["n_controls"] == 20
    assert got["control_median"] == pytest.approx(np.median(means))
    assert got["control_lo"] == pytest.approx(np.percentile(means, 2.5))
    assert got["control_hi"] == pytest.approx(np.percentile(means, 97.5))
    # one control is lower than the edit (-0.5): rank p = (1 + 1) / 21
    assert (means <= -0.45).sum() == 1
    assert got["control_rank_p"] == pytest.approx(2 / 21)


def test_holm_and_bh_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x = .02, .03, .06, .04 -> running max
    np.testing.assert_allclose(adjust(p, "holm"), [0.03, 0.06, 0.06, 0.02])
    # BH: m p / rank = .02, .02, .04, .04 -> running min from the top
    np.testing.assert_allclose(adjust(p, "bh"), [0.02, 0.04, 0.04, 0.02])
    # capped at 1; a NaN stays NaN and counts in the family as p = 1 (m = 3 here)
    np.testing.assert_allclose(adjust([0.6, np.nan, 0.7], "holm"), [1.0, np.nan, 1.0])
    np.testing.assert_allclose(adjust([0.6, np.nan, 0.7], "bh"), [1.0, np.nan, 1.0])
    np.testing.assert_allclose(adjust([0.01, np.nan, 0.02], "bh"), [0.03, np.nan, 0.03])
    with pytest.raises(ValueError, match="correction"):
        adjust(p, "bonferroni")


def test_bh_equals_scipy_false_discovery_control():
    rng = np.random.default_rng(12)
    p = np.concatenate([rng.uniform(0, 1, 30), rng.uniform(0, 0.01, 10)])
    np.testing.assert_allclose(adjust(p, "bh"), stats.false_discovery_control(p, method="bh"))
    holm = adjust(p, "holm")
    assert np.all(holm >= adjust(p, "bh") - 1e-15) and np.all(holm >= p)


@pytest.mark.parametrize(
    "op,strength,want",
    [
        ("suppress", 0.0, "less"),
        ("clamp", 0.0, "less"),
        ("clamp", -2.0, "less"),
        ("clamp", 3.0, "greater"),
        ("scale", 0.5, "less"),
        ("scale", 2.0, "greater"),
        ("scale", 1.0, "two-sided"),
        ("add", 40.0, "greater"),
        ("add", -1.0, "less"),
    ],
)
def test_alternative_follows_the_edit(op, strength, want):
    assert resolve_alternative(op, strength) == want
    assert resolve_alternative(op, strength, "two-sided") == "two-sided"


def test_verdict_needs_the_adjusted_p_and_the_tested_direction():
    assert verdict(0.01, 0.05, -0.3, -0.2, "less", True) == "supported"
    assert verdict(0.06, 0.05, -0.3, -0.2, "less", True) == "not supported"
    assert verdict(0.01, 0.05, 0.3, 0.2, "less", True) == "not supported"
    # lower than the controls, but the edit itself does not lower the target
    assert verdict(0.01, 0.05, 0.05, -0.2, "less", True) == "not supported"
    assert verdict(0.01, 0.05, 0.3, 0.2, "two-sided", True) == "supported"
    assert verdict(float("nan"), 0.05, -0.3, -0.2, "less", True) == "not supported"
    # everything else holds, but the edit is inside the controls' 95% range
    assert verdict(0.01, 0.05, -0.3, -0.2, "less", False) == "not supported"


@pytest.mark.parametrize(
    ("edit", "alt", "want"),
    [
        (-0.30, "less", True),  # below control_lo = -0.2
        (-0.15, "less", False),  # inside the range
        (0.30, "less", False),  # beyond, but the wrong way
        (0.30, "greater", True),  # above control_hi = 0.1
        (0.05, "greater", False),
        (-0.30, "greater", False),
        (-0.30, "two-sided", True),
        (0.30, "two-sided", True),
        (0.00, "two-sided", False),
    ],
)
def test_beyond_controls_by_direction(edit, alt, want):
    assert beyond_controls(edit, -0.2, 0.1, alt) is want
    assert beyond_controls(edit, float("nan"), float("nan"), alt) is False  # no control


def test_a_few_controls_as_strong_as_the_edit_make_it_not_supported():
    """18 controls do nothing, 2 move the target as much as the edit: the paired test against
    the controls' mean passes easily, but the edit is not beyond the controls' 95% range."""
    rng = np.random.default_rng(12)
    n = 40
    e = -0.30 + rng.normal(0, 0.02, n)
    c = np.vstack([rng.normal(0, 0.02, (18, n)), -0.35 + rng.normal(0, 0.02, (2, n))])
    got = against_controls(e, c, "less", resample_counts(n, 200, rng), sign_flips(n, 999, rng))
    assert got["p_value"] < 0.01 and got["vs_control_hi"] < 0
    assert got["control_lo"] < e.mean() < got["control_hi"]
    assert got["beyond_controls"] is False
    assert verdict(got["p_value"], 0.05, e.mean(), got["vs_control"], "less",
                   got["beyond_controls"]) == "not supported"  # fmt: skip
    # the same edit against 20 inert controls is beyond them, and supported
    quiet = against_controls(e, c[:18], "less", resample_counts(n, 200, rng),
                             sign_flips(n, 999, rng))  # fmt: skip
    assert quiet["beyond_controls"] is True
    assert verdict(quiet["p_value"], 0.05, e.mean(), quiet["vs_control"], "less",
                   quiet["beyond_controls"]) == "supported"  # fmt: skip


def test_no_controls_is_never_beyond_them():
    rng = np.random.default_rng(13)
    e = rng.normal(-0.5, 0.01, 20)
    got = against_controls(e, np.zeros((0, 20)), "less", resample_counts(20, 100, rng),
                           sign_flips(20, 999, rng))  # fmt: skip
    assert got["n_controls"] == 0 and got["p_value"] < 0.01
    assert got["beyond_controls"] is False


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("alt", ["less", "greater", "two-sided"])
def test_a_nan_effect_gives_a_nan_p_value_not_zero(exact, alt):
    """A NaN probability on one image compares False with everything: counted naively it gives
    p = 0 (exact) or 1 / (R + 1), a 'significant' result out of nothing."""
    d = np.array([0.1, -0.2, np.nan, 0.05, 0.0, 0.3])
    flips = sign_flips(6, 999 if exact else 50, np.random.default_rng(0))
    assert flips[1] is exact
    assert np.isnan(sign_flip_pvalue(d, alt, flips))
    # and a NaN p stays NaN but counts in the family as p = 1: m = 3, not 2
    np.testing.assert_allclose(adjust([0.01, np.nan, 0.02], "holm"), [0.03, np.nan, 0.04])


def test_one_image_and_all_zero_differences():
    rng = np.random.default_rng(14)
    one = against_controls(np.array([-0.4]), np.zeros((3, 1)), "less", resample_counts(1, 50, rng),
                           sign_flips(1, 999, rng))  # fmt: skip
    assert one["p_value"] == pytest.approx(0.5)  # two sign vectors, the observed one counts
    assert one["vs_control_lo"] == one["vs_control_hi"] == pytest.approx(-0.4)
    zero = against_controls(np.zeros(8), np.zeros((4, 8)), "two-sided",
                            resample_counts(8, 50, rng), sign_flips(8, 999, rng))  # fmt: skip
    assert zero["p_value"] == 1.0 and zero["beyond_controls"] is False
