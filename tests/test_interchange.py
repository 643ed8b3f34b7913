"""Interchange checked against the real projects: SAELens 6.x (the `sae-lens` package) loads our
SAELens export with its own `SAE.load_from_disk` and encodes and decodes as we do, we load SAEs
that SAELens itself saved, and saev's own code (the `saev` package, the paper era) writes an
`sae.pt` that we load and run as it does.

Both packages live in a side venv (`make interop`: .venv-interop), never in .venv: sae-lens pulls
transformer-lens and its own pins. The test runs that venv's python on SCRIPT, which reads our
exports and the inputs from a folder and writes its outputs, and SAELens' and saev's own
checkpoints, back there. Without the venv the test skips, except under CI, where it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saev_core.sae import ARCHS, SAE, SAEConfig
from saev_core.sae_io import SAELENS_FORMAT_VERSION, load_saelens, load_saev, save_saelens

torch.set_num_threads(min(2, torch.get_num_threads()))
ROOT = Path(__file__).resolve().parents[1]
INTEROP_PYTHON = ROOT / ".venv-interop" / "bin" / "python"
D, S, K = 12, 48, 5
TOL = {"atol": 1e-5, "rtol": 1e-5}

# Run by .venv-interop/bin/python with the work folder as argv[1]. Touches only that folder.
SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
import sae_lens
from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
from sae_lens import TopKSAE, TopKSAEConfig

work = Path(sys.argv[1])
x = load_file(str(work / "x.safetensors"))["x"]
report = {"sae_lens_version": sae_lens.__version__, "ours": {}}

# 1. our exports, loaded by SAELens' own loader
for d in sorted((work / "ours").iterdir()):
    sae = SAE.load_from_disk(d)
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    save_file({"f": f.contiguous(), "x_hat": x_hat.contiguous()}, str(work / f"lens_{d.name}.safetensors"))
    m = sae.cfg.metadata
    report["ours"][d.name] = {"class": type(sae).__name__, "architecture": sae.cfg.architecture(),
                              "sae_lens_version": m.sae_lens_version, "hook_name": m.hook_name,
                              "model_name": m.model_name}

# 2. SAEs built and saved by SAELens, with its outputs on x
torch.manual_seed(0)
d_in, d_sae, k = x.shape[1], int(sys.argv[2]), int(sys.argv[3])
theirs = {
    "standard": StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=True)),
    "topk_rescaled": TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, apply_b_dec_to_input=False,
                                           rescale_acts_by_decoder_norm=True)),
    "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=True)),
}
for name, sae in theirs.items():
    with torch.no_grad():
        for p_name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if name == "topk_rescaled":
            sae.W_dec.mul_(torch.linspace(0.3, 2.0, d_sae)[:, None])
        if name == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae) * 0.5)
        f = sae.encode(x)
        x_hat = sae.decode(f)
    sae.save_model(work / "theirs" / name)
    save_file({"f": f.contiguous(), "x_hat": x_hat.contiguous()}, str(work / f"theirs_{name}.safetensors"))

# 3. saev's own (paper-era) SAE: saev.nn.dump, and its forward on x
import saev.config, saev.nn
torch.manual_seed(1)
cfg = saev.config.SparseAutoencoder(d_vit=d_in, exp_factor=d_sae // d_in)
sae = saev.nn.SparseAutoencoder(cfg)
with torch.no_grad():
    sae.b_enc.copy_(torch.randn(d_sae) * 0.3)
    sae.b_dec.copy_(torch.randn(d_in))
    x_hat, f, _ = sae(x)
saev.nn.dump(str(work / "saev" / "sae.pt"), sae)
save_file({"f": f.contiguous(), "x_hat": x_hat.contiguous()}, str(work / "saev_out.safetensors"))

(work / "report.json").write_text(json.dumps(report))
"""


def _our_sae(arch: str) -> SAE:
    """One of ours, perturbed off its init, with a non-trivial input normalisation (which the
    export folds into SAELens' weights) and the provenance the train stage records."""
    torch.manual_seed(ARCHS.index(arch))
    sae = SAE(SAEConfig(arch=arch, d_model=D, d_sae=S, k=K))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn_like(p))
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.4)
    sae.set_normalisation(torch.linspace(-2, 2, D), 0.3)
    sae.extra = {"backbone": "tiny-vit", "layer": 3}
    return sae.eval()


def require_interop(python: Path = INTEROP_PYTHON) -> None:
    """Skip without a finished side venv (its python and `make interop`'s stamp file: a venv
    whose pip failed halfway has the one without the other), but fail under CI, which must run
    this test."""
    stamp = python.parent.parent / ".installed"
    if python.exists() and stamp.exists():
        return
    what = "missing" if not python.exists() else f"unfinished (no {stamp.name})"
    msg = f"{python.parent.parent} {what}: run `make interop` (sae-lens and saev in a side venv)"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.mark.parametrize(
    ("ci", "venv", "outcome"),
    [
        ("true", "none", "fail"),
        ("1", "no stamp", "fail"),
        ("false", "none", "skip"),
        (None, "no stamp", "skip"),
        ("true", "done", "run"),
    ],
)
def test_a_missing_side_venv_skips_locally_and_fails_under_ci(
    tmp_path, monkeypatch, ci, venv, outcome
):
    python = tmp_path / ".venv-interop" / "bin" / "python"
    if venv != "none":
        python.parent.mkdir(parents=True)
        python.touch()
    if venv == "done":
        (tmp_path / ".venv-interop" / ".installed").touch()
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    if outcome == "run":
        require_interop(python)
        return
    kind = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(kind, match="make interop"):
        require_interop(python)


@pytest.mark.slow
def test_saelens_and_saev_read_and_write_what_we_do(tmp_path):
    require_interop()
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(3)) * 3 + 1
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    ours = {arch: _our_sae(arch) for arch in ARCHS}
    for arch, sae in ours.items():
        save_saelens(sae, tmp_path / "ours" / arch)
    (tmp_path / "saev").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    run = subprocess.run(
        [str(INTEROP_PYTHON), "-c", SCRIPT, str(tmp_path), str(S), str(K)],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sae_lens_version"].split(".")[0] == SAELENS_FORMAT_VERSION.split(".")[0]

    # 1. SAELens' encode/decode of our exports: ours within 1e-5, and our metadata kept
    want_class = {"relu": "StandardSAE", "topk": "TopKSAE"}
    for arch, sae in ours.items():
        got = load_file(str(tmp_path / f"lens_{arch}.safetensors"))
        with torch.no_grad():
            f = sae.encode(x)
            torch.testing.assert_close(got["f"], f, **TOL)
            torch.testing.assert_close(got["x_hat"], sae.decode(f), **TOL)
        assert (f > 0).any() and (f == 0).any()
        meta = report["ours"][arch]
        assert meta["class"] == want_class.get(arch, "JumpReLUSAE")
        assert meta["sae_lens_version"] == SAELENS_FORMAT_VERSION
        assert meta["hook_name"] == "blocks.3.hook_resid_post" and meta["model_name"] == "tiny-vit"

    # 2. SAEs that SAELens saved: our load gives SAELens' own outputs
    for name in ("standard", "topk_rescaled", "jumprelu"):
        back = load_saelens(tmp_path / "theirs" / name)
        want = load_file(str(tmp_path / f"theirs_{name}.safetensors"))
        with torch.no_grad():
            f = back.encode(x)
            torch.testing.assert_close(f, want["f"], **TOL)
            torch.testing.assert_close(back.decode(f), want["x_hat"], **TOL)
        assert (want["f"] > 0).any() and (want["f"] == 0).any()

    # 3. saev's own checkpoint (its paper-era layout): saev's forward, exactly
    sae = load_saev(tmp_path / "saev" / "sae.pt")
    want = load_file(str(tmp_path / "saev_out.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), want["f"], **TOL)
        torch.testing.assert_close(sae.decode(sae.encode(x)), want["x_hat"], **TOL)
