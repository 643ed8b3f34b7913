"""Splicing SAEs into a backbone keeps the error term; edits change exactly what they say, on the
tokens their scope names, at one or several layers, for the demo classifier and a hub-style model."""

import numpy as np
import pytest
import torch

from saev_core.backbone import classifier_blocks, load_backbone, load_classifier
from saev_core.intervene import (
    FeatureEdit,
    Splice,
    TokenLayout,
    bootstrap_ci,
    bootstrap_ratio_ci,
    feature_values,
    measure_layout,
    patches_in_bbox,
    patches_in_mask,
    random_direction,
    scope_tokens,
    splice,
    stacked_splice,
    suppress,
)
from saev_core.intervene.splicing import _edited_output
from saev_core.sae import SAE, SAEConfig


def make_sae(d_model: int, seed: int = 0, arch: str = "topk") -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(arch=arch, d_model=d_model, d_sae=64, k=4), generator=g)
    sae.set_normalisation(torch.randn(d_model, generator=g), 0.7)
    return sae


@pytest.fixture(scope="module")
def classifier(tiny_vit):
    model, _ = load_classifier(tiny_vit, device="cpu")
    return model


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A tiny SigLIP vision tower (no CLS token), saved like a hub model."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    out = tmp_path_factory.mktemp("siglip") / "siglip"
    SiglipVisionModel(cfg).save_pretrained(out)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def test_no_edit_splice_leaves_outputs_unchanged(classifier, siglip_dir):
    pixels = torch.randn(3, 3, 32, 32)
    sae = make_sae(32)
    with torch.no_grad():
        before = classifier(pixel_values=pixels).logits
        with splice(classifier_blocks(classifier), Splice(0, sae), Splice(1, make_sae(32, 1))):
            during = classifier(pixel_values=pixels).logits
        after = classifier(pixel_values=pixels).logits
    # a crude SAE (random weights) reconstructs badly, yet the error term makes it exact
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # hooks removed

    bb = load_backbone(str(siglip_dir), device="cpu", dtype="float32")
    with torch.no_grad():
        base = bb.model(pixel_values=pixels).last_hidden_state
        with splice(bb.blocks, Splice(-1, sae)):
            spliced = bb.model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(spliced, base, rtol=1e-5, atol=1e-5)


def test_layout_comes_from_the_model(classifier, siglip_dir):
    demo = measure_layout(classifier, classifier_blocks(classifier), torch.zeros(1, 3, 32, 32))
    assert demo == TokenLayout(1, True, (4, 4), (32, 32))
    siglip = TokenLayout.of_backbone(load_backbone(str(siglip_dir), device="cpu"))
    # SigLIP has no CLS: the old guess (registers + 1) would have skipped its first patch
    assert siglip.n_prefix_tokens == 0 and not siglip.has_cls and siglip.n_tokens == 16
    assert scope_tokens(siglip, "patches").all()
    with pytest.raises(ValueError, match="no CLS"):
        scope_tokens(siglip, "cls")


def test_edit_matches_the_formula_and_hidden_states(classifier):
    sae = make_sae(32)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = classifier(pixel_values=pixels, output_hidden_states=True)
        x = base.hidden_states[1]  # output of block 0
        f = sae.encode(x)
        feat = int(f.sum((0, 1)).argmax())  # a feature that fires
        edit = FeatureEdit("clamp", (feat,), -2.0, max_acts=(1.5,))
        layout = TokenLayout(1, True, (4, 4), (32, 32))
        tokens = scope_tokens(layout, "patches")
        with splice(classifier_blocks(classifier), Splice(0, sae, edit, tokens)) as (s,):
            out = classifier(pixel_values=pixels, output_hidden_states=True)
    f_edit = f.clone()
    f_edit[:, 1:, feat] = -3.0  # -2 x max 1.5, on patches only
    want = (x - sae.decode(f)) + sae.decode(f_edit)  # PAPER.md step 5
    # hidden_states (recorded by transformers' own hooks) show the edited value
    torch.testing.assert_close(out.hidden_states[1], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.hidden_states[1][:, 0], x[:, 0])  # CLS untouched
    assert not torch.allclose(out.logits, base.logits)
    assert s.stats["n_tokens"] == 2 * 16 and s.stats["dx_norm"] > 0


def test_several_saes_at_several_layers(classifier):
    a, b = make_sae(32, 0), make_sae(32, 1)
    pixels = torch.randn(2, 3, 32, 32)
    blocks = classifier_blocks(classifier)
    ea, eb = FeatureEdit("scale", (3, 5), 4.0), FeatureEdit("add", (7,), 2.0)
    with torch.no_grad():
        with splice(blocks, Splice(0, a, ea)):
            first = classifier(pixel_values=pixels, output_hidden_states=True).hidden_states
        with splice(blocks, Splice(0, a, ea), Splice(1, b, eb)):
            both = classifier(pixel_values=pixels, output_hidden_states=True).hidden_states
    x1 = first[2]  # block 1's output given the layer-0 edit
    f = b.encode(x1)
    f_edit = f.clone()
    f_edit[..., 7] += 2.0
    want = (x1 - b.decode(f)) + b.decode(f_edit)
    torch.testing.assert_close(both[1], first[1])
    torch.testing.assert_close(both[2], want, rtol=1e-4, atol=1e-4)


def test_edit_ops():
    f = torch.tensor([[0.0, 2.0], [1.0, 3.0]])
    assert FeatureEdit("suppress", (0, 1)).apply(f).eq(0).all()
    assert FeatureEdit("clamp", (0, 1), 5.0).apply(f).eq(5).all()
    clamp_rel = FeatureEdit("clamp", (0, 1), -2.0, max_acts=(1.0, 4.0)).apply(f)
    assert clamp_rel.tolist() == [[-2.0, -8.0], [-2.0, -8.0]]
    assert FeatureEdit("scale", (0, 1), 0.5).apply(f).tolist() == [[0.0, 1.0], [0.5, 1.5]]
    assert FeatureEdit("add", (0, 1), 1.0).apply(f).tolist() == [[1.0, 3.0], [2.0, 4.0]]
    assert f.tolist() == [[0.0, 2.0], [1.0, 3.0]]  # not modified in place
    with pytest.raises(ValueError, match="edit op"):
        FeatureEdit("erase", (0,))
    with pytest.raises(ValueError, match="max_acts"):
        FeatureEdit("clamp", (0, 1), max_acts=(1.0,))


def test_region_scopes():
    layout = TokenLayout(1, True, (4, 4), (32, 32))
    # a box over the top-left quarter of a 64 px original image -> the top-left 2x2 patches
    box = patches_in_bbox(layout, (0, 0, 32, 32), image_hw=(64, 64))
    assert box.sum() == 4 and box[:2, :2].all()
    pixel_mask = np.zeros((32, 32), bool)
    pixel_mask[24:, 24:] = True  # exactly the bottom-right patch
    assert np.flatnonzero(patches_in_mask(layout, pixel_mask)).tolist() == [15]
    t = scope_tokens(layout, "region", np.stack([box, ~box]))
    assert t.shape == (2, 17) and not t[:, 0].any() and t[0, 1:].sum() == 4 and t[1, 1:].sum() == 12
    with pytest.raises(ValueError, match="region"):
        scope_tokens(layout, "region")


def test_per_image_region_and_random_direction(classifier):
    sae = make_sae(32, arch="relu")  # ReLU: most features fire, so edits move every token
    pixels = torch.randn(2, 3, 32, 32)
    layout = TokenLayout(1, True, (4, 4), (32, 32))
    region = np.zeros((2, 4, 4), bool)
    region[0, 0, 0] = True  # image 0: one patch; image 1: nothing
    tokens = scope_tokens(layout, "region", region)
    edit = FeatureEdit("add", tuple(range(8)), 3.0)
    u = random_direction(32, seed=1)
    with torch.no_grad():
        x = classifier(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
        blocks = classifier_blocks(classifier)
        with splice(blocks, Splice(0, sae, edit, tokens)):
            y = classifier(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
        with splice(blocks, Splice(0, sae, edit, tokens, direction=u)):
            z = classifier(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
    changed = (y - x).norm(dim=-1) > 1e-4
    assert changed.nonzero().tolist() == [[0, 1]]  # image 0, token 1 (its first patch) only
    dz = z[0, 1] - x[0, 1]
    # the same norm as the edit's change, along the random direction
    assert dz.norm() == pytest.approx(float((y - x)[0, 1].norm()), rel=1e-4)
    assert torch.nn.functional.cosine_similarity(dz, u, dim=0) > 0.9999


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    lo, hi = bootstrap_ci(np.full(50, -0.3), 200, rng)
    assert lo == pytest.approx(-0.3) and hi == pytest.approx(-0.3)
    values = rng.normal(1.0, 1.0, size=400)
    lo, hi = bootstrap_ci(values, 2000, rng)
    assert lo < values.mean() < hi and 0.1 < hi - lo < 0.3  # about 4 standard errors wide
    lo, hi = bootstrap_ratio_ci(np.array([1, 2, 3]), np.array([2, 4, 6]), 200, rng)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)


@pytest.mark.parametrize("arch", ["topk", "relu", "batchtopk", "matryoshka", "jumprelu"])
def test_feature_values_match_encode(arch):
    sae = make_sae(32, arch=arch)
    with torch.no_grad():  # thresholds that cut some codes, not none
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.linspace(-3, 1, 64))
        elif arch != "topk" and arch != "relu":
            sae.threshold.fill_(0.5)
    x = torch.randn(50, 32) * 3
    idx = torch.tensor([0, 5, 40, 63])
    want = sae.encode(x)[:, idx]
    assert (want > 0).any() and (want == 0).any()
    torch.testing.assert_close(feature_values(sae, x, idx), want)


def test_feature_values_keep_the_sign_of_a_signed_topk():
    """A signed TopK SAE (topk_relu False: saev's `mask * h`) keeps negative kept values; the
    edit must read them as they are, not ReLU'd (numpy reference from the definition)."""
    g = torch.Generator().manual_seed(3)
    sae = SAE(SAEConfig(arch="topk", d_model=16, d_sae=64, k=6, topk_relu=False), generator=g)
    sae.set_normalisation(torch.randn(16, generator=g), 0.7)
    with torch.no_grad():
        sae.b_enc.fill_(-4.0)  # most kept pre-activations negative
    x = torch.randn(40, 16, generator=g)
    xn = sae.normalise(x).detach().double().numpy()
    w_enc, b_enc, b_dec = (t.detach().double().numpy() for t in (sae.W_enc, sae.b_enc, sae.b_dec))
    h = (xn - b_dec) @ w_enc + b_enc
    top = np.argsort(-h, axis=1)[:, :6]
    want = np.zeros_like(h)
    np.put_along_axis(want, top, np.take_along_axis(h, top, 1), 1)
    idx = torch.arange(64)
    with torch.no_grad():
        got = feature_values(sae, x, idx).double().numpy()
        edited = _edited_output(Splice(0, sae, suppress(int(np.argmax((want < 0).sum(0))))), x)
    assert (want < 0).sum() > 40  # the case this is about
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # and an edit's change of x uses the signed value: suppress = - f W_dec / scale
    f = int(np.argmax((want < 0).sum(0)))
    dx_want = -want[:, [f]] @ sae.W_dec[[f]].detach().double().numpy() / float(sae.norm_scale)
    np.testing.assert_allclose((edited - x).double().numpy(), dx_want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_output_keeps_the_block_dtype_and_equals_each_edit(dtype):
    """The stacked hook's output is in the block's dtype (a bf16 model's K-fold output is not
    held in float32 too) and equals, bit for bit, each condition's own spliced output."""
    from saev_core.intervene.splicing import _stacked_output

    sae = make_sae(32)
    x = (torch.randn(4, 17, 32, generator=torch.Generator().manual_seed(6)) * 2).to(dtype)
    edit = FeatureEdit("clamp", (1, 2), 3.0, (1.0, 2.0))
    conds = [Splice(0, sae, edit), Splice(0, sae, FeatureEdit("add", (5,), -2.0)),
             Splice(0, sae, edit, direction=random_direction(32, 3))]  # fmt: skip
    with torch.no_grad():
        out = _stacked_output(conds, x)
        assert out.dtype == dtype and out.shape == (3 * 4, 17, 32)
        for k, c in enumerate(conds):
            one = Splice(0, sae, c.edit, None, c.direction)
            assert torch.equal(out[4 * k : 4 * k + 4], _edited_output(one, x))


@pytest.mark.parametrize("rows", [3, 4, 20])
def test_probs_stacked_honours_the_row_cap_and_equals_plain_forwards(classifier, rows):
    """`Reader.probs_stacked` never passes more than `rows` images x conditions through the
    blocks after the SAE layer, also with more conditions than rows (5 here), and gives per
    condition the probabilities of one plain spliced forward over all the images."""
    from saev_core.hypotheses import Reader

    g = torch.Generator().manual_seed(5)
    pixels = torch.randn(7, 3, 32, 32, generator=g)
    sae = make_sae(32)
    lay = TokenLayout(1, True, (4, 4), (32, 32))
    per_image = scope_tokens(lay, "region", torch.rand(7, 4, 4, generator=g) > 0.5)
    edit = FeatureEdit("clamp", (1, 2), 3.0, (1.0, 2.0))
    conditions = [Splice(0, sae, edit, per_image)]
    conditions += [Splice(0, sae, FeatureEdit("add", (f,), 2.0), per_image) for f in (5, 9)]
    conditions += [
        Splice(0, sae, edit, per_image, direction=random_direction(32, k)) for k in (1, 2)
    ]
    blocks = classifier_blocks(classifier)
    seen = []
    handle = blocks[-1].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))

    def forward(px):
        return classifier(pixel_values=px).logits.softmax(-1)

    reader = Reader("softmax", ["a"], blocks, lay, None, forward)
    try:
        got = reader.probs_stacked(pixels, conditions, rows)
        seen_stacked, seen[:] = list(seen), []
        want = [reader.probs(pixels, 7, [Splice(0, sae, c.edit, c.tokens, c.direction)])
                for c in conditions]  # fmt: skip
    finally:
        handle.remove()
    assert max(seen_stacked) <= rows
    assert sum(seen_stacked) == 5 * 7  # every image under every condition, once
    assert got.shape == (5, 7, classifier.config.num_labels)
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-6)
    assert conditions[0].stats["n_tokens"] == conditions[3].stats["n_tokens"] > 0


@pytest.mark.parametrize("layer", [0, 1])
def test_stacked_conditions_equal_separate_forwards(classifier, siglip_dir, layer):
    """An edit and its controls stacked along the batch after the SAE layer give, per
    condition, exactly the outputs (and edit stats) of one plain spliced forward each, for the
    demo classifier and a hub-style SigLIP tower (its attention-pooling head)."""
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    sae = make_sae(32)
    lay = TokenLayout(1, True, (4, 4), (32, 32))
    per_image = scope_tokens(lay, "region", torch.rand(3, 4, 4, generator=g) > 0.5)
    edit = FeatureEdit("clamp", (1, 2), 3.0, (1.0, 2.0))
    conditions = [
        Splice(layer, sae, edit, per_image),
        Splice(layer, sae, FeatureEdit("clamp", (5,), -1.5), None),
        Splice(layer, sae, FeatureEdit("add", (2, 9), 2.0), scope_tokens(lay, "cls")),
        Splice(layer, sae, edit, per_image, direction=random_direction(32, 1)),
        Splice(layer, sae, edit, per_image, direction=random_direction(32, 2)),
    ]
    blocks = classifier_blocks(classifier)
    with torch.no_grad():
        with stacked_splice(blocks, conditions):
            stacked = classifier(pixel_values=pixels).logits
        separate = []
        for c in conditions:
            one = Splice(c.layer, c.sae, c.edit, c.tokens, c.direction)
            with splice(blocks, one):
                separate.append(classifier(pixel_values=pixels).logits)
            assert c.stats["n_tokens"] == one.stats["n_tokens"] > 0
            assert c.stats["dx_norm"] == pytest.approx(one.stats["dx_norm"], rel=1e-5)
    assert stacked.shape == (5 * 3, classifier.config.num_labels)
    torch.testing.assert_close(stacked.reshape(5, 3, -1), torch.stack(separate), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    # conditions differ from each other (the comparison is not vacuous)
    assert (separate[1] - separate[2]).abs().max() > 1e-3

    bb = load_backbone(str(siglip_dir), device="cpu", dtype="float32")
    conds = [Splice(-1, sae, FeatureEdit("add", (f,), 2.0), None) for f in (1, 2, 3)]
    with torch.no_grad():
        with stacked_splice(bb.blocks, conds):
            out = bb.model(pixel_values=pixels).pooler_output
        for k, c in enumerate(conds):
            with splice(bb.blocks, Splice(-1, sae, c.edit)):
                ref = bb.model(pixel_values=pixels).pooler_output
            torch.testing.assert_close(out[3 * k : 3 * k + 3], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="every condition needs an edit"):
        with stacked_splice(blocks, [Splice(layer, sae)]):
            pass
