"""The SAE module: hand-set encode/decode for every architecture, the JumpReLU straight-through
estimator, BatchTopK's threshold, Matryoshka prefixes, AuxK, the unit-norm decoder, checkpoints,
config checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor

from saev_core.sae import ARCHS, DENSE_AUX_FACTOR, K_SPARSE, SAE, SAEConfig

torch.set_num_threads(min(2, torch.get_num_threads()))


def hand_sae(arch: str) -> SAE:
    """d_model 4, d_sae 6, weights chosen so every value below can be checked by hand."""
    sae = SAE(SAEConfig(arch=arch, d_model=4, d_sae=6, k=2))
    e = torch.eye(4)
    with torch.no_grad():
        # Latents read e0, e1, e2, e3, e0 + e1, -e1.
        sae.W_enc.copy_(torch.stack([e[0], e[1], e[2], e[3], e[0] + e[1], -e[1]], dim=1))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, 0.25, 0.0, -0.75, 0.0]))
        # Latents write e0, e1, e2, e3, e0, e3.
        sae.W_dec.copy_(torch.stack([e[0], e[1], e[2], e[3], e[0], e[3]]))
        sae.b_dec.copy_(torch.tensor([0.0, 0.5, 0.0, 0.0]))
    sae.set_normalisation(torch.ones(4), 0.5)
    return sae


# x_n = (x - 1) * 0.5; row 0 -> [1, 2, 0, -0.5], row 1 -> 0.
X = torch.tensor([[3.0, 5.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
# h = (x_n - b_dec) W_enc + b_enc: row 0 [1, 1.5, .25, -.5, 1.75, -1.5], row 1 [0, -.5, .25, 0, -1.25, .5]
F_RELU = torch.tensor([[1.0, 1.5, 0.25, 0.0, 1.75, 0.0], [0.0, 0.0, 0.25, 0.0, 0.0, 0.5]])
F_TOPK = torch.tensor([[0.0, 1.5, 0.0, 0.0, 1.75, 0.0], [0.0, 0.0, 0.25, 0.0, 0.0, 0.5]])
# decode: (f W_dec + b_dec) / 0.5 + 1
X_HAT_RELU = torch.tensor([[6.5, 5.0, 1.5, 1.0], [1.0, 2.0, 1.5, 2.0]])
X_HAT_TOPK = torch.tensor([[4.5, 5.0, 1.0, 1.0], [1.0, 2.0, 1.5, 2.0]])


@pytest.mark.parametrize(
    "arch,f_want,x_hat_want", [("relu", F_RELU, X_HAT_RELU), ("topk", F_TOPK, X_HAT_TOPK)]
)
def test_encode_decode_hand_set(arch, f_want, x_hat_want):
    sae = hand_sae(arch)
    f = sae.encode(X)
    torch.testing.assert_close(f, f_want)
    torch.testing.assert_close(sae.decode(f), x_hat_want)
    out = sae(X)
    torch.testing.assert_close(out.x_hat, x_hat_want)
    # Losses live in the normalised space: mse there is 0.5^2 times the input-space mse.
    torch.testing.assert_close(out.mse, ((x_hat_want - X) * 0.5).pow(2).mean())
    torch.testing.assert_close(out.l1, f_want.sum(dim=1).mean())


def test_topk_keeps_exactly_k_and_relu_zeroes_negatives():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    relu = SAE(SAEConfig(arch="relu", d_model=4, d_sae=6))
    topk = SAE(SAEConfig(arch="topk", d_model=4, d_sae=6, k=2))
    topk.load_state_dict(relu.state_dict())
    with torch.no_grad():
        # Positive encoder bias: every pre-activation > 0, so TopK must choose, not ReLU.
        relu.b_enc.fill_(10.0)
        topk.b_enc.fill_(10.0)
        h = relu.pre_acts(relu.normalise(x))
        f_topk = topk.encode(x)
    assert ((f_topk > 0).sum(dim=1) == 2).all()
    top2 = h.topk(2, dim=1).values
    torch.testing.assert_close(f_topk.sort(dim=1, descending=True).values[:, :2], top2)
    with torch.no_grad():
        relu.b_enc.fill_(0.0)
        h = relu.pre_acts(relu.normalise(x))
        f_relu = relu.encode(x)
    assert (h < 0).any() and (h > 0).any()
    torch.testing.assert_close(f_relu, h.clamp_min(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(tmp_path, arch):
    torch.manual_seed(1)
    sae = SAE(SAEConfig(arch=arch, d_model=8, d_sae=16, k=3))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sae.set_normalisation(torch.arange(8.0), 0.25)
    sae.update_firing(torch.zeros(5, 16))
    if arch in ("batchtopk", "matryoshka"):
        sae.threshold.fill_(0.3)  # the learned inference threshold must travel too
    sae.eval()
    sae.save(tmp_path / "sae", extra={"layer": 2, "manifest_sha256": "abc"})

    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert meta["norm_mean"] == list(range(8))
    assert meta["norm_scale"] == 0.25
    assert meta["sae"]["arch"] == arch and meta["sae"]["d_sae"] == 16
    assert meta["extra"] == {"layer": 2, "manifest_sha256": "abc"}

    loaded = SAE.load(tmp_path / "sae")
    x = torch.randn(10, 8) * 3 + 2
    assert loaded.cfg == sae.cfg
    assert loaded.extra == {"layer": 2, "manifest_sha256": "abc"}
    for name, t in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat, rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)


def test_load_refuses_mismatched_shapes(tmp_path):
    sae = SAE(SAEConfig(arch="topk", d_model=4, d_sae=6, k=2))
    sae.save(tmp_path)
    meta = json.loads((tmp_path / "cfg.json").read_text())
    meta["sae"]["d_sae"] = 8
    (tmp_path / "cfg.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"W_enc has shape \(4, 6\).*needs \(4, 8\)"):
        SAE.load(tmp_path)


def test_load_refuses_disagreeing_norm_constants_and_missing_files(tmp_path):
    sae = SAE(SAEConfig(arch="relu", d_model=4, d_sae=6))
    sae.set_normalisation(torch.ones(4), 2.0)
    sae.save(tmp_path)
    meta = json.loads((tmp_path / "cfg.json").read_text())
    meta["norm_scale"] = 3.0
    (tmp_path / "cfg.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="norm_mean/norm_scale"):
        SAE.load(tmp_path)
    (tmp_path / "sae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae.safetensors"):
        SAE.load(tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_unit_norm_decoder_after_step_and_parallel_grad_removed(arch):
    torch.manual_seed(2)
    sae = SAE(SAEConfig(arch=arch, d_model=8, d_sae=16, k=4))
    opt = torch.optim.Adam(sae.parameters(), lr=0.1)
    out = sae(torch.randn(32, 8))
    out.loss.backward()
    grad_before = sae.W_dec.grad.clone()
    sae.remove_parallel_grads()
    assert not torch.allclose(grad_before, sae.W_dec.grad)  # there was something to remove
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    torch.testing.assert_close(parallel, torch.zeros(16), atol=1e-6, rtol=0)
    opt.step()
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16), atol=1e-4)
    sae.normalise_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))


def aux_setup(dead: list[int], aux_k: int = 512):
    torch.manual_seed(3)
    sae = SAE(SAEConfig(arch="topk", d_model=8, d_sae=12, k=2, aux_k=aux_k))
    with torch.no_grad():
        # Dead latents get a high bias so their pre-activations are positive (but not in the top k
        # of the forward pass we check below, which uses the explicit mask).
        sae.b_enc[dead] = 1.0
    mask = torch.zeros(12, dtype=torch.bool)
    mask[dead] = True
    return sae, torch.randn(16, 8), mask


def test_auxk_zero_when_nothing_dead():
    sae, x, _ = aux_setup([])
    out = sae(x)  # default: the tokens-since-fired buffer, all fresh
    assert out.aux.item() == 0.0
    torch.testing.assert_close(out.loss, out.mse)
    out = sae(x, dead_mask=torch.zeros(12, dtype=torch.bool))
    assert out.aux.item() == 0.0


def test_auxk_positive_and_grads_only_into_dead_latents():
    dead = [1, 5, 9]
    sae, x, mask = aux_setup(dead)
    out = sae(x, dead_mask=mask)
    assert out.aux.item() > 0
    out.aux.backward()
    col_grad = sae.W_enc.grad.abs().sum(dim=0)
    assert (col_grad[mask] > 0).all()
    assert (col_grad[~mask] == 0).all()
    assert (sae.W_dec.grad.abs().sum(dim=1)[~mask] == 0).all()
    assert (sae.b_enc.grad[~mask] == 0).all()


@pytest.mark.parametrize("aux_k", [1, 2, 512])
def test_auxk_matches_plain_reference(aux_k):
    sae, x, mask = aux_setup([0, 4, 7, 10], aux_k=aux_k)
    out = sae(x, dead_mask=mask)
    with torch.no_grad():
        x_n = sae.normalise(x)
        h = sae.pre_acts(x_n)
        e = x_n - (out.f @ sae.W_dec + sae.b_dec)
        z = torch.zeros_like(h)
        for b in range(h.shape[0]):
            dead_vals = [(float(h[b, j]), j) for j in range(12) if mask[j]]
            for v, j in sorted(dead_vals, reverse=True)[:aux_k]:
                z[b, j] = max(v, 0.0)
        e_hat = z @ sae.W_dec
        want = (e - e_hat).pow(2).sum() / (e - e.mean(dim=0)).pow(2).sum()
    torch.testing.assert_close(out.aux, want)
    torch.testing.assert_close(out.loss, out.mse + sae.cfg.aux_alpha * want)


def test_dead_latents_tracked_in_tokens():
    sae = SAE(SAEConfig(arch="topk", d_model=4, d_sae=6, k=2, dead_after_tokens=10))
    f = torch.zeros(4, 6)
    f[0, 2] = 1.0
    sae.update_firing(f)
    sae.update_firing(f)
    assert sae.tokens_since_fired.tolist() == [8, 8, 0, 8, 8, 8]
    assert not sae.dead_mask().any()
    sae.update_firing(f)
    assert sae.dead_mask().tolist() == [True, True, False, True, True, True]
    with torch.no_grad():
        sae.b_enc.fill_(1.0)  # dead latents must have positive pre-activations to contribute
    assert sae(torch.randn(8, 4)).aux.item() > 0  # forward uses the buffer by default


def test_config_checks():
    with pytest.raises(ValueError, match="k=7"):
        SAEConfig(arch="topk", d_model=4, d_sae=6, k=7)
    with pytest.raises(ValueError, match="d_model"):
        SAEConfig(arch="topk", d_model=0, d_sae=6, k=2)
    with pytest.raises(ValueError, match="arch"):
        SAEConfig(arch="gated", d_model=4, d_sae=6)
    with pytest.raises(ValueError, match="aux_alpha"):
        SAEConfig(arch="topk", d_model=4, d_sae=6, k=2, aux_alpha=-1.0)
    with pytest.raises(ValueError, match="l1_coeff"):
        SAEConfig(arch="relu", d_model=4, d_sae=6, l1_coeff=math.nan)
    # k is unused by ReLU, so a large default k does not block a small ReLU SAE.
    assert SAEConfig(arch="relu", d_model=4, d_sae=6, k=32).d_sae == 6


def test_init_unit_decoder_tied_encoder_and_bad_normalisation():
    sae = SAE(SAEConfig(arch="topk", d_model=8, d_sae=16, k=2), torch.Generator().manual_seed(0))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))
    # k-sparse archs: the encoder starts at half the decoder's transpose (pre-activation std ~0.5).
    torch.testing.assert_close(sae.W_enc, 0.5 * sae.W_dec.T)
    torch.testing.assert_close(sae.W_enc.norm(dim=0), torch.full((16,), 0.5))
    # relu and jumprelu keep Gao et al.'s plain transpose (JumpReLU's threshold is set in its units).
    for arch in ("relu", "jumprelu"):
        other = SAE(SAEConfig(arch=arch, d_model=8, d_sae=16), torch.Generator().manual_seed(0))
        torch.testing.assert_close(other.W_enc, other.W_dec.T)
    set_scale = SAEConfig(arch="topk", d_model=8, d_sae=16, k=2, encoder_init_scale=2.0)
    torch.testing.assert_close(SAE(set_scale).W_enc.norm(dim=0), torch.full((16,), 2.0))
    with pytest.raises(ValueError, match="encoder_init_scale"):
        SAEConfig(arch="topk", d_model=8, d_sae=16, k=2, encoder_init_scale=0.0)
    assert sae.b_enc.abs().sum() == 0 and sae.b_dec.abs().sum() == 0
    same = SAE(SAEConfig(arch="topk", d_model=8, d_sae=16, k=2), torch.Generator().manual_seed(0))
    assert torch.equal(same.W_dec, sae.W_dec)
    with pytest.raises(ValueError, match="scale"):
        sae.set_normalisation(torch.zeros(8), 0.0)
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        sae.set_normalisation(torch.zeros(7), 1.0)


# -- the newer architectures, by hand -----------------------------------------------------------


def identity_sae(arch: str, d: int = 4, **kw) -> SAE:
    """W_enc = W_dec = I, zero biases, identity normalisation: h = x exactly."""
    sae = SAE(SAEConfig(arch=arch, d_model=d, d_sae=d, **kw))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    return sae


H = torch.tensor([[3.0, -1.0, 0.5, 2.0], [0.2, 0.1, 4.0, -2.0]])


def test_batchtopk_trains_on_the_batch_and_infers_at_its_threshold():
    sae = identity_sae("batchtopk", k=2)
    out = sae.train()(H)
    # The 2 x 2 = 4 largest of the whole batch: 4.0, 3.0, 2.0, 0.5 (row 0 keeps three, row 1 one).
    want = torch.tensor([[3.0, 0.0, 0.5, 2.0], [0.0, 0.0, 4.0, 0.0]])
    torch.testing.assert_close(out.f, want)
    assert sae.threshold.item() == 0.5  # first estimate: the smallest kept activation
    sae(H * 2)  # smallest kept is now 1.0: running average with momentum 0.1
    assert sae.threshold.item() == pytest.approx(0.9 * 0.5 + 0.1 * 1.0)
    # Inference: JumpReLU at the threshold, per token, whatever the batch.
    with torch.no_grad():
        sae.threshold.fill_(0.4)
    f = sae.encode(H)
    torch.testing.assert_close(f, torch.tensor([[3.0, 0.0, 0.5, 2.0], [0.0, 0.0, 4.0, 0.0]]))
    torch.testing.assert_close(sae.encode(H[1:]), f[1:])
    assert torch.equal(sae.eval()(H).f, f)


def test_jumprelu_forward_and_straight_through_gradients():
    eps, theta0 = 0.5, 0.25
    sae = identity_sae("jumprelu", jumprelu_bandwidth=eps, jumprelu_init_threshold=theta0)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.log(torch.tensor([0.25, 0.25, 0.6, 1.0])))
    theta = sae.log_threshold.exp().detach()
    h = torch.tensor([[0.3, 0.1, 0.7, 2.0], [0.2, 0.6, 0.5, 1.1]], requires_grad=True)
    f = sae.train_activate(h)
    torch.testing.assert_close(f.detach(), h.detach() * (h.detach() > theta))
    f.sum().backward()
    # d/dh = H(h - theta); d/dtheta = -(theta/eps) * sum_b 1{|h - theta| < eps/2}.
    torch.testing.assert_close(h.grad, (h.detach() > theta).float())
    inside = ((h.detach() - theta).abs() < eps / 2).float().sum(dim=0)
    want_theta = -(theta / eps) * inside  # [2, 1, 2, 1] rows inside the window
    torch.testing.assert_close(
        sae.log_threshold.grad, want_theta * theta
    )  # chain rule: d theta/d log

    # The L0 term: Step's d/dtheta = -(1/eps) * count inside, and nothing flows into h.
    sae.zero_grad()
    x = h.detach()  # identity SAE: h = x
    out = sae.train()(x, sparsity_coeff=1.0)
    assert out.sparsity.item() == pytest.approx((x > theta).float().sum(dim=1).mean().item())
    out.sparsity.backward()
    torch.testing.assert_close(sae.log_threshold.grad, -(1 / eps) * inside / 2 * theta)
    # Step passes no gradient to the pre-activations (so none reaches the encoder).
    assert sae.W_enc.grad is None or not sae.W_enc.grad.any()


def test_matryoshka_loss_is_the_sum_of_nested_prefix_errors():
    sae = identity_sae("matryoshka", k=4, matryoshka_prefixes=(1, 3, 4), aux_alpha=0.0)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = sae.train()(x)
    # Prefix 1 reconstructs [1, 0, 0, 0], prefix 3 [1, 2, 3, 0], prefix 4 everything; the loss
    # sums the three errors (Bussmann et al. 2025), it does not average them.
    want = (2**2 + 3**2 + 4**2) / 4 + 4**2 / 4 + 0.0
    assert out.recon.item() == pytest.approx(want)
    assert out.mse.item() == pytest.approx(0.0)
    assert out.loss.item() == pytest.approx(want)
    assert SAEConfig(arch="matryoshka", d_model=4, d_sae=64).prefixes() == [4, 16, 64]
    with pytest.raises(ValueError, match="end at d_sae"):
        SAEConfig(arch="matryoshka", d_model=4, d_sae=64, matryoshka_prefixes=(4, 16))


@pytest.mark.parametrize("sparse_kernels", [True, False])
def test_matryoshka_loss_matches_plain_torch_sum_over_prefixes(sparse_kernels):
    """A random tiny Matryoshka SAE: loss = sum over prefixes m of the per-element MSE of
    `relu(h)[:, :m] W_dec[:m] + b_dec` after a batch-wide top-k, plus aux_alpha x AuxK (off here),
    recomputed from the weights with plain torch."""
    torch.manual_seed(3)
    prefixes = (2, 5, 12)
    cfg = SAEConfig(
        arch="matryoshka", d_model=6, d_sae=12, k=3, matryoshka_prefixes=prefixes, aux_alpha=0.0
    )
    sae = SAE(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    sae.set_normalisation(torch.randn(6), 0.7)
    sae.sparse_kernels = sparse_kernels
    x = torch.randn(5, 6)
    out = sae.train()(x)

    with torch.no_grad():
        x_n = (x - sae.norm_mean) * 0.7
        h = (x_n - sae.b_dec) @ sae.W_enc + sae.b_enc
        flat = torch.relu(h).flatten()
        keep = flat.topk(3 * 5).indices  # BatchTopK: k x batch over the whole batch
        f = torch.zeros_like(flat).index_put_((keep,), flat[keep]).reshape(h.shape)
        errors = [
            ((f[:, :m] @ sae.W_dec[:m] + sae.b_dec - x_n) ** 2).mean().item() for m in prefixes
        ]
    assert out.recon.item() == pytest.approx(sum(errors), rel=1e-5)
    assert out.loss.item() == pytest.approx(sum(errors), rel=1e-5)
    assert out.mse.item() == pytest.approx(errors[-1], rel=1e-5)


def test_relu_with_free_decoder_scales_l1_by_decoder_norm():
    sae = identity_sae("relu", decoder_norm="free")
    with torch.no_grad():
        sae.W_dec.mul_(torch.tensor([[1.0], [2.0], [0.5], [3.0]]))
    x = torch.tensor([[1.0, 1.0, 2.0, -1.0]])
    out = sae(x)
    assert out.sparsity.item() == pytest.approx(1 * 1 + 1 * 2 + 2 * 0.5)
    assert out.l1.item() == pytest.approx(4.0)
    assert out.loss.item() == pytest.approx(out.mse.item() + 0.05 * 4.0)
    before = sae.W_dec.clone()
    sae.normalise_decoder()  # a free decoder is left alone
    assert torch.equal(sae.W_dec, before)
    with pytest.raises(ValueError, match="decoder_norm='free'"):
        SAEConfig(arch="topk", d_model=4, d_sae=4, decoder_norm="free")


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_auxk_reaches_every_k_sparse_arch(arch):
    sae = SAE(SAEConfig(arch=arch, d_model=8, d_sae=12, k=2), torch.Generator().manual_seed(0))
    mask = torch.zeros(12, dtype=torch.bool)
    mask[[1, 5]] = True
    with torch.no_grad():
        sae.b_enc[mask] = 1.0
    out = sae(torch.randn(16, 8), dead_mask=mask)
    assert out.aux.item() > 0
    torch.testing.assert_close(out.loss, out.recon + sae.cfg.aux_alpha * out.aux)


# -- the sparse training kernels against the dense reference -------------------------------------


def _train_step_outputs(sae: SAE, x: Tensor, dead: Tensor, sparse: bool):
    sae.sparse_kernels = sparse
    sae.zero_grad(set_to_none=True)
    out = sae.train()(x, dead_mask=dead)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    return out, grads


@pytest.mark.parametrize("arch", list(K_SPARSE))
@pytest.mark.parametrize("n_dead", [0, 5, 20, 40])
def test_sparse_kernels_match_the_dense_path(arch, n_dead):
    """Loss terms, activations and every gradient agree. AuxK (aux_k 8): none dead; 5 and 20 dead,
    which the sparse path computes densely over the dead columns (<= DENSE_AUX_FACTOR x aux_k;
    20 needs its top-k); 40 dead, through the sparse kernels."""
    assert 8 < 20 <= DENSE_AUX_FACTOR * 8 < 40
    torch.manual_seed(11)
    cfg = SAEConfig(arch=arch, d_model=16, d_sae=64, k=4, aux_k=8, matryoshka_prefixes=())
    dense = SAE(cfg, torch.Generator().manual_seed(5))
    with torch.no_grad():
        dense.b_enc.normal_(0, 0.3)  # some negative pre-activations among the kept ones
        dense.b_dec.normal_(0, 0.5)
        dense.set_normalisation(torch.randn(16), 0.7)
    sparse = SAE(cfg)
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(24, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:n_dead]] = True
    want, want_grads = _train_step_outputs(dense, x, dead, sparse=False)
    got, got_grads = _train_step_outputs(sparse, x, dead, sparse=True)
    for field in ("x_hat", "f", "loss", "mse", "l1", "aux", "recon", "l0", "fired"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), msg=field)
    assert (got.aux > 0) == (n_dead > 0)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, msg=name)
    if arch != "topk":
        assert sparse.threshold.item() == pytest.approx(dense.threshold.item())
    # The trainer's cheaper call: no dense f, same loss.
    assert sparse(x, dead_mask=dead, dense_f=False).f is None


def test_sparse_kernels_under_bf16_autocast():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch="topk", d_model=16, d_sae=64, k=4), torch.Generator().manual_seed(0))
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.train()(x, dead_mask=torch.ones(64, dtype=torch.bool))
    out.loss.float().backward()
    assert all(p.grad.dtype == torch.float32 for p in sae.parameters())
    assert out.aux.item() > 0 and torch.isfinite(out.loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", list(K_SPARSE))
def test_sparse_kernels_match_the_dense_path_on_cuda(arch):
    """cuSPARSE and the CUDA embedding_bag give the dense path's gradients; bf16 autocast runs."""
    torch.manual_seed(0)
    cfg = SAEConfig(arch=arch, d_model=64, d_sae=512, k=8, aux_k=16)
    dense = SAE(cfg, torch.Generator().manual_seed(1)).cuda()
    sparse = SAE(cfg).cuda()
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(256, 64, device="cuda")
    dead = torch.zeros(512, dtype=torch.bool, device="cuda")
    dead[::7] = True
    want, want_grads = _train_step_outputs(dense, x, dead, sparse=False)
    got, got_grads = _train_step_outputs(sparse, x, dead, sparse=True)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-5)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-3, atol=1e-5, msg=name)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sparse.train()(x, dead_mask=dead)
    out.loss.float().backward()
    assert torch.isfinite(out.loss) and all(
        p.grad.dtype == torch.float32 for p in sparse.parameters()
    )


@pytest.mark.parametrize("arch", list(ARCHS))
def test_reconstruct_is_decode_of_encode(arch):
    torch.manual_seed(2)
    sae = SAE(SAEConfig(arch=arch, d_model=16, d_sae=64, k=4), torch.Generator().manual_seed(2))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.set_normalisation(torch.randn(16), 0.8)
    x = torch.randn(32, 16)
    with torch.no_grad():
        torch.testing.assert_close(sae.eval().reconstruct(x), sae.decode(sae.encode(x)))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_encode_sparse_is_the_nonzeros_of_encode(arch):
    torch.manual_seed(4)
    sae = SAE(SAEConfig(arch=arch, d_model=16, d_sae=64, k=6), torch.Generator().manual_seed(4))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)  # some tokens with fewer than k positive pre-activations
    x = torch.randn(40, 16)
    with torch.no_grad():
        f = sae.eval().encode(x)
        rows, cols, vals = sae.encode_sparse(x)
    want_rows, want_cols = torch.nonzero(f > 0, as_tuple=True)
    assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols)
    assert torch.equal(vals, f[want_rows, want_cols])


def test_reconstruct_takes_any_leading_shape_and_encode_sparse_refuses_it():
    sae = SAE(SAEConfig(arch="topk", d_model=8, d_sae=32, k=3)).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(x), sae.decode(sae.encode(x)))
        with pytest.raises(ValueError, match=r"\[batch, d_model\]"):
            sae.encode_sparse(x)
        # Training mode with [batch, tokens, d_model] takes the dense path rather than failing.
        out = sae.train()(x)
        assert out.x_hat.shape == x.shape and out.fired.shape == (32,)


def test_jumprelu_l0_gradient_reaches_the_threshold_at_the_defaults():
    # Inputs normalised to norm sqrt(d) and unit-norm encoder columns give pre-activations of
    # std about 1. The default threshold and bandwidth sit at that scale, so the L0 term's
    # straight-through gradient reaches (nearly) every latent's threshold in one batch; at the old
    # 0.001 / 0.001 almost no pre-activation fell in the kernel and most thresholds got none.
    d, n = 32, 512
    sae = SAE(SAEConfig(arch="jumprelu", d_model=d, d_sae=256), torch.Generator().manual_seed(0))
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    sae.set_normalisation(x.mean(dim=0), math.sqrt(d) / (x - x.mean(dim=0)).norm(dim=1).mean())
    sae.train()
    out = sae(x, sparsity_coeff=1.0)
    out.sparsity.backward()
    grad = sae.log_threshold.grad
    assert (grad < 0).float().mean() > 0.9  # raising theta lowers L0, for nearly every latent
    assert out.l0 < 0.5 * 256  # the initial threshold already cuts ReLU's ~half
