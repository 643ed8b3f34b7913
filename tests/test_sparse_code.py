"""The sparse training kernels' selections, by hand and against a plain top-k."""

from __future__ import annotations

import torch

from saev_core import sparse_code as sc


def test_top_k_code_by_hand():
    h = torch.tensor([[3.0, -1.0, 0.5, 2.0], [0.2, 0.1, 4.0, -2.0]])
    code = sc.top_k(h, 2)
    assert code.rows.tolist() == [0, 0, 1, 1] and code.offsets.tolist() == [0, 2]
    assert sorted(code.cols[:2].tolist()) == [0, 3] and sorted(code.cols[2:].tolist()) == [0, 2]
    vals = h[code.rows, code.cols]
    want = torch.tensor([[3.0, 0.0, 0.0, 2.0], [0.2, 0.0, 4.0, 0.0]])
    assert torch.equal(sc.to_dense(code, vals), want)
    assert sc.fired(code, torch.relu(vals)).tolist() == [True, False, True, True]
    W = torch.eye(4)
    torch.testing.assert_close(sc.decode(code, vals, W), want)


def test_batch_top_k_by_hand_with_uneven_rows():
    h = torch.tensor([[3.0, -1.0, 0.5, 2.0], [0.2, 0.1, 4.0, -2.0], [-1.0, -1.0, -1.0, -1.0]])
    code = sc.batch_top_k(h, 4)
    assert code.rows.tolist() == [0, 0, 0, 1] and code.offsets.tolist() == [0, 3, 4]
    assert code.cols.tolist() == [0, 2, 3, 2]
    # The third token keeps nothing: its bag is empty and decodes to zero.
    out = sc.decode(code, h[code.rows, code.cols], torch.eye(4))
    assert torch.equal(out[2], torch.zeros(4))


def test_batch_top_k_threshold_path_is_exact():
    """Large enough for the sampled cut (d_sae a power of two, so the stride must dodge 2)."""
    torch.manual_seed(0)
    h = torch.randn(256, 8192)
    assert sc._top_by_threshold(h.reshape(-1), 256 * 8, 8192) is not None
    code = sc.batch_top_k(h, 256 * 8)
    want = h.reshape(-1).topk(256 * 8).indices.sort().values
    assert torch.equal(code.rows * 8192 + code.cols, want)


def test_batch_top_k_falls_back_when_the_sample_misses():
    """The largest values all sit at sampled positions, so the cut lands too high: still exact."""
    n_rows, d_sae = 512, 8191  # 4.2M values: stride 3
    h = torch.full((n_rows, d_sae), -1.0)
    flat = h.reshape(-1)
    stride = flat.numel() // (1 << 20)
    assert stride == 3
    flat[::stride][:1000] = torch.arange(1000, dtype=torch.float32)
    assert sc._top_by_threshold(flat, 300, d_sae) is None
    code = sc.batch_top_k(h, 300)
    assert torch.equal(code.rows * d_sae + code.cols, flat.topk(300).indices.sort().values)
