"""Splicing an SAE into a backbone keeps the error term; edits change exactly what they say."""

import numpy as np
import pytest
import torch

from saev_core.backbone import classifier_blocks, load_classifier
from saev_core.intervene import bootstrap_ci, clamp_edit, splice, token_index
from saev_core.sae import SAE, SAEConfig


@pytest.fixture()
def classifier_and_sae(tiny_vit):
    model, id2label = load_classifier(tiny_vit, device="cpu")
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(arch="topk", d_model=32, d_sae=64, k=4), generator=g)
    sae.set_normalisation(torch.randn(32, generator=g), 0.7)
    return model, sae


def test_splice_without_edit_leaves_outputs_unchanged(classifier_and_sae):
    model, sae = classifier_and_sae
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model(pixel_values=pixels).logits
        with splice(classifier_blocks(model)[0], sae):
            during = model(pixel_values=pixels).logits
        after = model(pixel_values=pixels).logits
    # a crude SAE (random weights) reconstructs badly, yet the error term makes it exact
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # hook removed


def test_edit_changes_outputs_and_hidden_states(classifier_and_sae):
    model, sae = classifier_and_sae
    pixels = torch.randn(2, 3, 32, 32)
    block = classifier_blocks(model)[0]
    with torch.no_grad():
        base = model(pixel_values=pixels, output_hidden_states=True)
        x = base.hidden_states[1]
        f = sae.encode(x)
        feat = int(f.sum((0, 1)).argmax())  # a feature that fires
        edit = clamp_edit([feat], [0.0], token_index("all", 1))
        with splice(block, sae, edit):
            out = model(pixel_values=pixels, output_hidden_states=True)
    want = x + sae.decode(edit(f)) - sae.decode(f)
    # hidden_states (recorded by transformers' own hooks) show the edited value
    torch.testing.assert_close(out.hidden_states[1], want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out.logits, base.logits)


def test_clamp_edit_scopes():
    f = torch.ones(2, 5, 4)
    patches = clamp_edit([1, 3], [-2.0, 0.0], token_index("patches", 1))(f)
    assert torch.equal(patches[:, 0], torch.ones(2, 4))  # CLS untouched
    assert torch.equal(patches[:, 1:, 1], torch.full((2, 4), -2.0))
    assert torch.equal(patches[:, 1:, 3], torch.zeros(2, 4))
    assert torch.equal(patches[:, 1:, 0], torch.ones(2, 4))
    cls = clamp_edit([0], [5.0], token_index("cls", 1))(f)
    assert cls[:, 0, 0].tolist() == [5.0, 5.0] and cls[:, 1:, 0].eq(1).all()
    assert f.eq(1).all()  # the input is not modified in place


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    lo, hi = bootstrap_ci(np.full(50, -0.3), 200, rng)
    assert lo == pytest.approx(-0.3) and hi == pytest.approx(-0.3)
    values = rng.normal(1.0, 1.0, size=400)
    lo, hi = bootstrap_ci(values, 2000, rng)
    assert lo < values.mean() < hi and 0.1 < hi - lo < 0.3  # about 4 standard errors wide
