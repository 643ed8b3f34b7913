"""Seed stability (saev_core.stability): Hungarian matching of decoders and code correlation.

Known answers: a permuted, rescaled copy matches at cosine 1 and gives the permutation back; two
random dictionaries match at the extreme-value scale sqrt(2 ln n / d), not near 1; a planted
copy plus noise of norm s matches at about 1 / sqrt(1 + s^2), in between. The matching is
checked against brute force over all permutations, the correlations against np.corrcoef.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from saev_core import stability as S


def test_a_permuted_copy_matches_at_cosine_one_and_recovers_the_permutation():
    rng = np.random.default_rng(0)
    W_a = rng.standard_normal((64, 16))
    perm = rng.permutation(64)
    W_b = 2.5 * W_a[perm]  # row i of B is row perm[i] of A; the scale must not matter
    m = S.match_dictionaries(W_a, torch.from_numpy(W_b))
    np.testing.assert_allclose(m.cos, 1.0, atol=1e-12)
    np.testing.assert_array_equal(perm[m.cols], m.rows)
    # signs are kept: the negated copy is not the same dictionary
    flipped = S.match_dictionaries(W_a, -W_a)
    assert (flipped.cos < 0.9).all() and flipped.mean_cos < 0.6


def test_the_matching_is_the_best_one_to_one_by_brute_force():
    rng = np.random.default_rng(1)
    W_a, W_b = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    A = W_a / np.linalg.norm(W_a, axis=1, keepdims=True)
    Bn = W_b / np.linalg.norm(W_b, axis=1, keepdims=True)
    cos = A @ Bn.T
    best = max(itertools.permutations(range(6)), key=lambda p: cos[range(6), p].sum())
    m = S.match_dictionaries(W_a, W_b)
    np.testing.assert_array_equal(m.cols, best)
    # unequal sizes: every row of the smaller side is matched once
    m = S.match_dictionaries(W_a[:4], W_b)
    assert len(m.rows) == 4 and len(set(m.cols)) == 4


def test_random_dictionaries_match_at_the_analytic_scale():
    n, d = 512, 64
    W_a, W_b = S.random_dictionary(n, d, 0), S.random_dictionary(n, d, 1)
    cos = W_a @ W_b.T
    assert cos.mean() == pytest.approx(0, abs=0.01)
    assert cos.std() == pytest.approx(1 / np.sqrt(d), rel=0.05)  # 1/sqrt(d) = 0.125
    m = S.match_dictionaries(W_a, W_b)
    scale = S.random_cosine_scale(n, d)  # sqrt(2 ln 512 / 64) = 0.442
    assert 0.6 * scale < m.mean_cos < scale
    assert (m.cos < 0.7).all()


def test_a_planted_copy_plus_noise_lies_between_random_and_identical():
    rng = np.random.default_rng(2)
    n, d, s = 256, 64, 1.0
    W_a = S.random_dictionary(n, d, 3)
    perm = rng.permutation(n)
    W_b = W_a[perm] + s * rng.standard_normal((n, d)) / np.sqrt(d)  # noise of norm ~s
    m = S.match_dictionaries(W_a, W_b)
    rand = S.match_dictionaries(W_a, S.random_dictionary(n, d, 4)).mean_cos
    assert rand + 0.2 < m.mean_cos < 0.95
    assert m.mean_cos == pytest.approx(1 / np.sqrt(1 + s**2), abs=0.03)  # 0.707
    assert (perm[m.cols] == m.rows).mean() > 0.99  # still the planted pairs


def test_activation_correlation_is_pearson_of_the_matched_codes():
    rng = np.random.default_rng(5)
    a = np.maximum(rng.standard_normal((300, 5)), 0)
    b = np.maximum(rng.standard_normal((300, 4)), 0)
    b[:, 3] = 0.0  # dead on the sample
    m = S.Match(np.array([0, 1, 2, 4]), np.array([2, 0, 3, 1]), np.zeros(4))
    got = S.activation_correlation(a, b, m)
    for j, (r, c) in enumerate(zip(m.rows, m.cols, strict=True)):
        if c == 3:
            assert np.isnan(got[j])
        else:
            assert got[j] == pytest.approx(np.corrcoef(a[:, r], b[:, c])[0, 1], abs=1e-12)
    with pytest.raises(ValueError, match="same"):
        S.activation_correlation(a[:10], b, m)


def _sae(seed, d=8, d_sae=32):
    from saev_core.sae import SAE, SAEConfig

    return SAE(
        SAEConfig(arch="topk", d_model=d, d_sae=d_sae, k=4), torch.Generator().manual_seed(seed)
    )


def test_seed_stability_over_checkpoints_against_random_saes(tmp_path):
    """A relabelled copy of an SAE (features permuted) is perfectly stable: matched cosine 1,
    codes correlated 1; random SAEs of the same shape are not."""
    a = _sae(0)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    b = _sae(5)
    with torch.no_grad():
        b.W_enc.copy_(a.W_enc[:, perm])
        b.b_enc.copy_(a.b_enc[perm])
        b.W_dec.copy_(a.W_dec[perm])
        b.b_dec.copy_(a.b_dec)
    a.save(tmp_path / "a", extra={"layer": 0})
    b.save(tmp_path / "b", extra={"layer": 0})
    x = np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)
    summary, per = S.seed_stability([tmp_path / "a", tmp_path / "b"], x, n_random=2, seed=10)
    by = summary.set_index("kind")
    assert list(summary.kind) == ["trained", "trained_vs_random", "trained_vs_random", "random"]
    assert by.loc["trained", "mean_cos"] == pytest.approx(1.0, abs=1e-6)
    assert by.loc["trained", "mean_corr"] == pytest.approx(1.0, abs=1e-5)
    assert by.loc["random", "mean_cos"] < 0.9 and by.loc["random", "mean_corr"] < 0.5
    trained = per[per.kind == "trained"]
    np.testing.assert_array_equal(perm.numpy()[trained.feature_b.to_numpy()], trained.feature_a)
    assert len(per) == 4 * 32
    out = S.write_stability(summary, per, tmp_path / "stab")
    back = pd.read_parquet(out / "seed_stability.parquet")
    assert back.kind.tolist() == summary.kind.tolist() and len(
        pd.read_parquet(out / "seed_matches.parquet")
    ) == len(per)


def test_a_random_sae_is_not_the_initialisation_of_the_trained_sae_of_the_same_seed(tmp_path):
    """train_saes initialises SAE seed s with Generator().manual_seed(s); random SAE s must come
    from another stream, or 'trained vs random' compares a checkpoint with its own start."""
    init0 = _sae(0)  # exactly what train_saes draws for TrainConfig(seed=0)
    rnd0 = S.random_sae_like(init0, 0)
    m = S.match_dictionaries(init0.W_dec, rnd0.W_dec)
    assert m.mean_cos < 0.9, m.mean_cos  # was 1.0: the same draw
    assert not torch.equal(init0.W_enc, rnd0.W_enc)
    # a checkpoint whose recorded training seed is a random SAE's stream is refused
    clash = _sae(1)
    clash.save(tmp_path / "c", extra={"layer": 0, "train": {"seed": S.random_torch_seed(7)}})
    x = np.zeros((10, 8), np.float32)
    with pytest.raises(ValueError, match=r"c/cfg.json.*random SAE seed 7"):
        S.seed_stability([tmp_path / "c"], x, n_random=2, seed=6)
    S.seed_stability([tmp_path / "c"], x, n_random=1, seed=6)  # seed 6 alone is fine


def test_sizes_whose_cosine_matrix_or_codes_would_not_fit_are_refused(tmp_path, monkeypatch):
    big = np.ones((S.MAX_D_SAE + 1, 4))
    with pytest.raises(ValueError, match=r"d_sae 8193 > 8192"):
        S.match_dictionaries(big, big)
    seen = {}
    real = S.linear_sum_assignment

    def spy(cost, maximize):
        seen["dtype"] = cost.dtype
        return real(cost, maximize=maximize)

    monkeypatch.setattr(S, "linear_sum_assignment", spy)
    W = np.random.default_rng(0).standard_normal((16, 4))
    m = S.match_dictionaries(W, W)
    assert seen["dtype"] == np.float32
    np.testing.assert_allclose(m.cos, 1.0, atol=1e-12)  # matched ones recomputed in float64
    _sae(0).save(tmp_path / "a", extra={"layer": 0})
    monkeypatch.setattr(S, "MAX_CODE_BYTES", 100 * 32 * 4)
    with pytest.raises(ValueError, match=r"101 tokens x d_sae 32.*at most 100 tokens"):
        S.seed_stability([tmp_path / "a"], np.zeros((101, 8), np.float32), n_random=0)
