"""Imports from saev's `sae.pt` layouts and SAELens, exports to SAELens: each file written in the
documented layout, and the loaded SAE's outputs checked against that project's own forward pass."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from saev_core.sae import ARCHS, SAE, SAEConfig
from saev_core.sae_io import load_saelens, load_saev, save_saelens

torch.set_num_threads(min(2, torch.get_num_threads()))
D, S = 8, 16


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D, S, generator=g) * 0.5,
        "b_enc": torch.randn(S, generator=g) * 0.3,
        "W_dec": torch.randn(S, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
    }


X = torch.randn(32, D, generator=torch.Generator().manual_seed(9)) * 2


def reference(w, x, subtract_b_dec: bool, k: int | None = None, threshold=None):
    """The source project's forward, written out: pre-activation, activation, decode."""
    h = (x - w["b_dec"] if subtract_b_dec else x) @ w["W_enc"] + w["b_enc"]
    f = torch.relu(h)
    if k is not None:
        vals, idx = h.topk(k, dim=-1)
        f = torch.zeros_like(h).scatter(-1, idx, vals.relu())
    if threshold is not None:
        f = f * (h > threshold)
    return f, f @ w["W_dec"] + w["b_dec"]


def saev_reference(w, x, subtract_b_dec: bool, k: int | None = None, threshold=None):
    """saev's forward as its source publishes it (src/saev/nn/modeling.py, activations.py):
    TopK and the early per-token BatchTopK are `mask * h` (`mask` the top-k indices, no ReLU);
    schema-4 BatchTopK infers `where(h > theta, h, 0)`, or ReLU while theta <= 0."""
    h = (x - w["b_dec"] if subtract_b_dec else x) @ w["W_enc"] + w["b_enc"]
    if k is not None:
        _, idx = torch.topk(h, k, dim=-1, sorted=False)
        mask = torch.zeros_like(h).scatter(-1, idx, 1.0)
        f = torch.mul(mask, h)
    elif threshold is not None and threshold > 0:
        f = torch.where(h > threshold, h, torch.zeros_like(h))
    else:
        f = torch.nn.functional.relu(h)
    return f, f @ w["W_dec"] + w["b_dec"]


def write_saev(path, header, state):
    with open(path, "wb") as fd:
        fd.write((json.dumps(header) + "\n").encode())
        torch.save(state, fd)


SAEV_LAYOUTS = {
    # The paper's era: no schema, the header is the config (ReLU; forward encodes x - b_dec).
    "pre-schema": (
        {
            "d_vit": D,
            "exp_factor": 2,
            "n_reinit_samples": 10,
            "sparsity_coeff": 4e-4,
            "ghost_grads": False,
            "seed": 0,
        },
        True,
        None,
    ),
    # Schema 1, the config class in `cls`.
    "schema1-TopK": (
        {
            "schema": 1,
            "cls": "TopK",
            "cfg": {"d_vit": D, "exp_factor": 2, "top_k": 3},
            "commit": "x",
            "lib": "0",
        },
        True,
        3,
    ),
    # Schemas 1B-3: activation serialised as cls + params; encode is x W_enc + b_enc.
    "schema2-Relu": (
        {
            "schema": 2,
            "cfg": {"d_vit": D, "exp_factor": 2, "activation": {"cls": "Relu", "params": {}}},
        },
        False,
        None,
    ),
    "schema2-BatchTopK": (
        {
            "schema": 2,
            "cfg": {
                "d_vit": D,
                "exp_factor": 2,
                "activation": {"cls": "BatchTopK", "params": {"top_k": 4}},
            },
        },
        False,
        4,
    ),
}


@pytest.mark.parametrize("layout", list(SAEV_LAYOUTS))
def test_load_saev_layouts(tmp_path, layout):
    header, subtract, k = SAEV_LAYOUTS[layout]
    w = weights()
    w["b_enc"] -= 6.0  # few positive pre-activations: some of the k kept ones are negative
    write_saev(tmp_path / "sae.pt", header, w)
    sae = load_saev(tmp_path / "sae.pt")
    f_want, x_hat_want = saev_reference(w, X, subtract, k)
    if k is not None:
        assert (f_want < 0).sum() > 10  # the signed TopK is what is being checked
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(X), f_want)
        torch.testing.assert_close(sae.decode(sae.encode(X)), x_hat_want)
        torch.testing.assert_close(sae.reconstruct(X), x_hat_want)  # the sparse decode path
    assert sae.cfg.d_model == D and sae.cfg.d_sae == S
    assert sae.extra["imported_from"] == "saev"


def test_load_saev_schema4_batchtopk_threshold_and_normalisation(tmp_path):
    w = weights(1)
    header = {
        "schema": 4,
        "cfg": {
            "d_model": D,
            "d_sae": S,
            "activation": {"cls": "BatchTopK", "params": {"top_k": 4, "momentum": 0.1}},
        },
    }
    write_saev(tmp_path / "sae.pt", header, {**w, "activation.threshold": torch.tensor(0.7)})
    sae = load_saev(tmp_path / "sae.pt")
    assert sae.cfg.arch == "batchtopk" and sae.threshold.item() == pytest.approx(0.7)
    f_want, x_hat_want = saev_reference(w, X, False, threshold=0.7)
    torch.testing.assert_close(sae.encode(X), f_want)
    torch.testing.assert_close(sae.decode(f_want), x_hat_want)
    # saev normalised outside the SAE and lost the constants: given them, encode applies them.
    mean, scale = torch.full((D,), 3.0), 0.5
    normed = load_saev(tmp_path / "sae.pt", norm_mean=mean, norm_scale=scale)
    torch.testing.assert_close(
        normed.encode(X), saev_reference(w, (X - 3.0) * 0.5, False, threshold=0.7)[0]
    )


class NotATensor:
    pass


def test_load_saev_refuses_pickled_objects_and_bad_headers(tmp_path):
    header = {
        "schema": 2,
        "cfg": {"d_vit": D, "exp_factor": 2, "activation": {"cls": "Relu", "params": {}}},
    }
    write_saev(tmp_path / "evil.pt", header, {**weights(), "x": NotATensor()})
    with pytest.raises(ValueError, match="tensors-only"):
        load_saev(tmp_path / "evil.pt")
    write_saev(
        tmp_path / "shape.pt", {**header, "cfg": {**header["cfg"], "exp_factor": 3}}, weights()
    )
    with pytest.raises(ValueError, match=r"W_enc has shape \(8, 16\)"):
        load_saev(tmp_path / "shape.pt")
    write_saev(tmp_path / "v9.pt", {"schema": 9, "cfg": {}}, weights())
    with pytest.raises(ValueError, match="schema 9"):
        load_saev(tmp_path / "v9.pt")
    (tmp_path / "raw.pt").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="JSON header"):
        load_saev(tmp_path / "raw.pt")


def write_saelens(path, cfg, tensors):
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors")
    )


@pytest.mark.parametrize(
    "architecture,apply_b_dec,extra",
    [("standard", True, {}), ("topk", True, {"k": 3}), ("jumprelu", False, {})],
)
def test_load_saelens(tmp_path, architecture, apply_b_dec, extra):
    w = weights(2)
    tensors = dict(w)
    threshold = None
    if architecture == "jumprelu":
        threshold = torch.rand(S, generator=torch.Generator().manual_seed(3))
        tensors["threshold"] = threshold
    cfg = {
        "architecture": architecture,
        "d_in": D,
        "d_sae": S,
        "dtype": "float32",
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.3.hook_resid_post"},
        **extra,
    }
    write_saelens(tmp_path / "sae", cfg, tensors)
    sae = load_saelens(tmp_path / "sae")
    f_want, x_hat_want = reference(w, X, apply_b_dec, extra.get("k"), threshold)
    torch.testing.assert_close(sae.encode(X), f_want)
    torch.testing.assert_close(sae.decode(f_want), x_hat_want)


def test_load_saelens_topk_rescaled_by_decoder_norm_and_log_threshold(tmp_path):
    """SAELens' TopKSAE with `rescale_acts_by_decoder_norm` (its training default) selects and
    ReLUs `h * ||W_dec_j||` and decodes `(f / ||W_dec_j||) W_dec + b_dec`; its JumpReLU training
    checkpoints store `log_threshold`."""
    w = weights(4)
    w["W_dec"] = w["W_dec"] * torch.linspace(0.2, 3.0, S)[:, None]  # far from unit norm
    cfg = {"architecture": "topk", "d_in": D, "d_sae": S, "k": 3,
           "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False,
           "metadata": {"sae_lens_version": "6.54.12"}}  # fmt: skip
    write_saelens(tmp_path / "topk", cfg, w)
    sae = load_saelens(tmp_path / "topk")
    n = w["W_dec"].norm(dim=-1)
    h = (X @ w["W_enc"] + w["b_enc"]) * n
    vals, idx = torch.topk(h, 3, dim=-1, sorted=False)
    f_lens = torch.zeros_like(h).scatter(-1, idx, vals.relu())
    x_hat_lens = (f_lens / n) @ w["W_dec"] + w["b_dec"]
    with torch.no_grad():
        torch.testing.assert_close(sae.decode(sae.encode(X)), x_hat_lens)
        torch.testing.assert_close((sae.encode(X) > 0), f_lens > 0)
    theta = torch.rand(S, generator=torch.Generator().manual_seed(6)) + 0.1
    jcfg = {"architecture": "jumprelu", "d_in": D, "d_sae": S, "apply_b_dec_to_input": True}
    write_saelens(tmp_path / "jump", jcfg, {**weights(5), "log_threshold": theta.log()})
    f_want, _ = reference(weights(5), X, True, threshold=theta)
    with torch.no_grad():
        torch.testing.assert_close(load_saelens(tmp_path / "jump").encode(X), f_want)


def test_signed_topk_trains_on_mask_times_h(tmp_path):
    """`topk_relu=False` (saev's TopK): the training loss and its gradients are those of
    `x_hat = (mask * h) W_dec + b_dec` written out here, on both training paths; SAELens export is
    refused, and the flag is only for arch 'topk'."""
    torch.manual_seed(7)
    sae = SAE(SAEConfig(arch="topk", d_model=D, d_sae=S, k=4, topk_relu=False, aux_alpha=0.0))
    with torch.no_grad():
        sae.b_enc.fill_(-1.5)
    x = X[:16]
    p = {n: t.detach().clone().requires_grad_(True) for n, t in sae.named_parameters()}
    h = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    mask = torch.zeros_like(h).scatter(-1, torch.topk(h, 4, dim=-1).indices, 1.0)
    f = mask * h
    assert (f < 0).any()
    loss = ((f @ p["W_dec"] + p["b_dec"] - x) ** 2).mean()
    loss.backward()
    for sparse in (True, False):
        sae.zero_grad()
        sae.sparse_kernels = sparse
        out = sae.train()(x)
        out.loss.backward()
        torch.testing.assert_close(out.loss, loss.detach())
        for name, param in sae.named_parameters():
            torch.testing.assert_close(param.grad, p[name].grad, msg=f"{name} sparse={sparse}")
    sae.eval()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f.detach())
    with pytest.raises(ValueError, match="signed TopK"):
        save_saelens(sae, tmp_path / "lens")
    with pytest.raises(ValueError, match="topk_relu=False .* not 'batchtopk'"):
        SAEConfig(arch="batchtopk", d_model=D, d_sae=S, topk_relu=False)


def test_load_saelens_refuses_what_it_cannot_honour(tmp_path):
    cfg = {"architecture": "standard", "d_in": D, "d_sae": S, "normalize_activations": "layer_norm"}
    write_saelens(tmp_path / "ln", cfg, weights())
    with pytest.raises(ValueError, match="per token"):
        load_saelens(tmp_path / "ln")
    write_saelens(
        tmp_path / "avg", {**cfg, "normalize_activations": "expected_average_only_in"}, weights()
    )
    with pytest.raises(ValueError, match="pass norm_scale"):
        load_saelens(tmp_path / "avg")
    assert load_saelens(tmp_path / "avg", norm_scale=0.5).norm_scale.item() == 0.5
    gated = {**cfg, "architecture": "gated", "normalize_activations": "none"}
    write_saelens(tmp_path / "gated", gated, weights())
    with pytest.raises(ValueError, match="'gated' is not supported"):
        load_saelens(tmp_path / "gated")


@pytest.mark.parametrize("arch", ARCHS)
def test_export_to_saelens_round_trip(tmp_path, arch):
    torch.manual_seed(5)
    sae = SAE(SAEConfig(arch=arch, d_model=D, d_sae=S, k=3))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn_like(p))
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.3)
    sae.set_normalisation(torch.linspace(-1, 1, D), 0.4)
    sae.eval()
    out = save_saelens(sae, tmp_path / "lens")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["d_in"] == D and cfg["apply_b_dec_to_input"] is True
    # SAELens 6 reads a cfg.json without metadata.sae_lens_version >= 6 as a pre-6 config
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk"}.get(arch, "jumprelu")
    # SAELens' own forward on raw inputs, with the exported tensors, gives our encode/decode.
    from safetensors.torch import load_file

    t = load_file(str(out / "sae_weights.safetensors"))
    f_lens, x_hat_lens = reference(t, X, True, cfg.get("k"), t.get("threshold"))
    with torch.no_grad():
        f = sae.encode(X)
        torch.testing.assert_close(f_lens, f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x_hat_lens, sae.decode(f), atol=1e-5, rtol=1e-5)
        back = load_saelens(out)
        torch.testing.assert_close(back.decode(back.encode(X)), sae.decode(f), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# provenance: stats and intervene refuse an SAE of another backbone, shards or stats


def _trained_sae(tmp_path):
    """A real train-stage SAE on a tiny shard set (manifest weights sha256 'x'), and that set."""
    from test_shards import write_set

    from saev_core.training.stage import TrainStage, train_stage

    shard_dir = tmp_path / "shards"
    write_set(shard_dir, n_images=12, n_tokens=5, d=6, n_train=9)
    params = {"arch": "topk", "d_sae": 8, "k": 2, "batch_size": 16, "n_epochs": 1,
              "warmup_steps": 1, "device": "cpu"}  # fmt: skip
    io = TrainStage(shard_dir=str(shard_dir), layer=0, out_dir=str(tmp_path / "sae"), sae=params)
    train_stage(io, progress=False)
    return tmp_path / "sae", shard_dir


def _variant(shard_dir, out, **changes):
    """A copy of a shard set whose manifest differs by `changes` (dotted keys)."""
    import shutil

    shutil.copytree(shard_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for key, value in changes.items():
        *path, last = key.split(".")
        node = manifest
        for p in path:
            node = node[p]
        node[last] = value
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_stats_refuse_an_sae_of_another_backbone_or_kind_of_shards(tmp_path):
    import hashlib

    import pyarrow.parquet as pq

    from saev_core.sae.checks import check_sae_matches
    from saev_core.stats.stage import StatsStage, stats_stage

    sae_dir, shard_dir = _trained_sae(tmp_path)
    extra = json.loads((sae_dir / "cfg.json").read_text())["extra"]
    assert extra["backbone_sha256"] == "x" and extra["activation_space"]["n_prefix_tokens"] == 1

    def stats(shards, run="t"):
        io = StatsStage(sae_dir=str(sae_dir), shard_dir=str(shards), out_dir=str(tmp_path / run),
                        run=run, options={"n_top": 2, "n_heatmaps": 0},
                        browser={"enabled": False})  # fmt: skip
        return stats_stage(io, progress=False)

    other_model = _variant(shard_dir, tmp_path / "b", **{"model.weights_sha256": "y" * 64})
    with pytest.raises(ValueError, match=f"sha256 x .*shards {other_model} .*sha256 {'y' * 64}"):
        stats(other_model)
    other_layout = _variant(shard_dir, tmp_path / "c", **{"tokens.n_prefix_tokens": 2})
    with pytest.raises(ValueError, match=r"n_prefix_tokens 1 .*have n_prefix_tokens 2"):
        stats(other_layout)
    other_layer = _variant(shard_dir, tmp_path / "d", layers=[3])
    with pytest.raises(ValueError, match=r"reads layer 0, .*hold layers \[3\]"):
        check_sae_matches(sae_dir, other_layer)
    assert not (tmp_path / "t").exists()
    # a grown set (another manifest, the same kind of activations) and the training set pass
    grown = _variant(shard_dir, tmp_path / "e", n_images=13)
    want = hashlib.sha256((sae_dir / "sae.safetensors").read_bytes()).hexdigest()
    assert check_sae_matches(sae_dir, grown) == want
    stats(shard_dir)
    run = pq.read_table(tmp_path / "t" / "run.parquet").to_pylist()[0]
    assert json.loads(run["cfg_json"])["sae_sha256"] == want


def test_intervene_refuses_stats_of_another_sae_and_another_model(tmp_path, tiny_vit):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from saev_core.hashing import sha256_file
    from saev_core.sae.checks import check_sae_model, check_stats_match

    sae = SAE(SAEConfig(arch="relu", d_model=D, d_sae=S))
    model_sha = sha256_file(f"{tiny_vit}/model.safetensors")
    sae.save(tmp_path / "sae", extra={"layer": 1, "backbone_sha256": model_sha})
    check_sae_model(tmp_path / "sae", str(tiny_vit))
    other = tmp_path / "other_model"
    shutil.copytree(tiny_vit, other)
    from safetensors.torch import load_file

    tensors = load_file(str(other / "model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1
    save_file(tensors, str(other / "model.safetensors"))
    other_sha = sha256_file(other / "model.safetensors")
    with pytest.raises(
        ValueError, match=f"sha256 {model_sha} .*{other} has weights sha256 {other_sha}"
    ):
        check_sae_model(tmp_path / "sae", str(other))

    def stats_dir(name, cfg_json, **row):
        d = tmp_path / name
        d.mkdir()
        table = {"run": [name], "sae_dir": ["somewhere"], "cfg_json": [json.dumps(cfg_json)]}
        table.update({k: [v] for k, v in row.items()})
        pq.write_table(pa.table(table), d / "run.parquet")
        return d

    own = sha256_file(tmp_path / "sae" / "sae.safetensors")
    check_stats_match(stats_dir("same", {"sae_sha256": own}), tmp_path / "sae")
    with pytest.raises(ValueError, match=f"sha256 {'0' * 64} .*has weights sha256 {own}"):
        check_stats_match(stats_dir("another", {"sae_sha256": "0" * 64}), tmp_path / "sae")
    # stats written before the sha256 was recorded: the SAE's shape must agree
    with pytest.raises(ValueError, match=f"d_sae 99 .*has d_sae {S}"):
        check_stats_match(stats_dir("old", {}, d_sae=99), tmp_path / "sae")
