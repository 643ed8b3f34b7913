"""Read SAEs published by other projects, and write ours in SAELens' layout.

- `load_saev(path)`: a `sae.pt` of the seed project saev (github.com/OSU-NLP-Group/saev). It is
  one JSON header line and then a `torch.save`d state dict (`W_enc` [d, d_sae], `b_enc`,
  `W_dec` [d_sae, d], `b_dec`, and for its later BatchTopK `activation.threshold`). The header
  went through these layouts, all read here:
  - no `schema` (the paper's era): the config itself, `d_vit`, `exp_factor`, ...; ReLU;
  - schema 1 with `cls` naming the config class (`Relu`, `TopK`, `BatchTopK`), `cfg` its fields;
  - schema 1 with `cls: SparseAutoencoderConfig`, and schemas 2-4: `cfg.activation` is
    `{"cls": ..., "params": {"top_k": ...}}`; schema 4 says `d_model`/`d_sae`.
  The weights are read with `torch.load(weights_only=True)`: tensors and plain containers only,
  never arbitrary pickled objects. saev's TopK (and its early per-token "BatchTopK") keeps the
  signed kept values, `mask * h` with no ReLU: they load as `topk` with `topk_relu=False`.
- `load_saelens(dir)` / `save_saelens(sae, dir)`: SAELens' `cfg.json` + `sae_weights.safetensors`
  (architectures `standard`, `topk`, `jumprelu`), which SAEBench-style tools read. Checked against
  SAELens 6.x's own `SAE.load_from_disk` / `save_model` (tests/test_interchange.py).

Conventions differ, and every difference is folded exactly into our weights so that `encode` and
`decode` give the same numbers as the source: saev's paper-era SAE and SAELens with
`apply_b_dec_to_input` encode `(x - b_dec) W_enc + b_enc` as we do; later saev and SAELens without
it encode `x W_enc + b_enc` (we then use `b_enc + b_dec W_enc`). Our input normalisation is folded
into SAELens' weights on export. saev never saved its normalisation (PAPER.md); pass the constants
you used with `norm_mean`/`norm_scale`, or the SAE sees raw inputs, as saev's did.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saev_core.sae.config import SAEConfig
from saev_core.sae.model import SAE

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
# Written as `metadata.sae_lens_version`: SAELens reads a cfg.json without one (or older than
# 6.0.0) as a pre-6 config, keeping only top-level metadata keys and so dropping ours.
SAELENS_FORMAT_VERSION = "6.54.12"
# saev activation class -> our arch (its early "BatchTopK" was a per-token top-k; see below)
_SAEV_ACTS = {"Relu": "relu", "TopK": "topk", "BatchTopK": "batchtopk"}


def load_saev(
    path: str | Path,
    norm_mean: Tensor | None = None,
    norm_scale: float | None = None,
    subtract_b_dec: bool | None = None,
) -> SAE:
    """An `SAE` from a saev `sae.pt` (any of its header layouts), in eval mode on the CPU.

    `subtract_b_dec` overrides whether the source encoded `x - b_dec` (default: by layout; True
    for the paper era and schema-1 config classes, False after).
    """
    path = Path(path)
    with path.open("rb") as fd:
        first = fd.readline()
        rest = fd.read()
    try:
        header = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: first line is not saev's JSON header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    try:
        state = torch.load(io.BytesIO(rest), weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError for non-tensor payloads, RuntimeError for junk
        raise ValueError(f"{path}: not a tensors-only torch state dict ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: payload is a {type(state).__name__}, not a state dict")

    schema = header.get("schema")
    if schema is None:  # the paper's era: the header is the config, and the SAE is a ReLU one
        cfg, act, params, subtract = header, "Relu", {}, True
    elif schema == 1 and header.get("cls") in _SAEV_ACTS:
        cfg = header["cfg"]
        act, params, subtract = header["cls"], {"top_k": cfg.get("top_k", 32)}, True
    elif schema in (1, 2, 3, 4):
        cfg = header["cfg"]
        activation = cfg.get("activation") or {"cls": "Relu", "params": {}}
        act, params, subtract = activation["cls"], activation.get("params") or {}, False
    else:
        raise ValueError(f"{path}: unknown saev schema {schema!r}")
    if act not in _SAEV_ACTS:
        raise ValueError(
            f"{path}: saev activation {act!r} is not supported (only {list(_SAEV_ACTS)})"
        )
    d_model = cfg.get("d_model", cfg.get("d_vit"))
    d_sae = cfg.get("d_sae") or (
        d_model * cfg["exp_factor"] if d_model and "exp_factor" in cfg else None
    )
    if not d_model or not d_sae:
        raise ValueError(f"{path}: header gives no d_model/d_vit and d_sae/exp_factor: {cfg}")
    arch = _SAEV_ACTS[act]
    threshold = state.pop("activation.threshold", None)
    if arch == "batchtopk" and threshold is None:
        # Before schema 4, saev's BatchTopK kept the top k of each token, and had no threshold.
        arch = "topk"
    k = int(params.get("top_k", 32))
    # saev's TopK activation is `mask * h`: the kept values keep their sign.
    sae_cfg = SAEConfig(
        arch=arch, d_model=int(d_model), d_sae=int(d_sae), k=k, topk_relu=arch != "topk"
    )
    if subtract_b_dec is None:
        subtract_b_dec = subtract
    weights = _take(state, ("W_enc", "b_enc", "W_dec", "b_dec"), path)
    if state:
        raise ValueError(f"{path}: unexpected tensors {sorted(state)}")
    sae = _build(sae_cfg, weights, subtract_b_dec, path)
    if threshold is not None:
        with torch.no_grad():
            sae.threshold.copy_(threshold.reshape(()).float())
    if norm_mean is not None or norm_scale is not None:
        sae.set_normalisation(
            norm_mean if norm_mean is not None else torch.zeros(sae_cfg.d_model),
            1.0 if norm_scale is None else norm_scale,
        )
    sae.extra = {"imported_from": "saev", "source": str(path), "saev_header": header}
    return sae.eval()


def load_saelens(sae_dir: str | Path, norm_scale: float | None = None) -> SAE:
    """An `SAE` from SAELens' `cfg.json` + `sae_weights.safetensors`, in eval mode on the CPU.

    `normalize_activations: expected_average_only_in` needs its scaling factor (SAELens keeps it
    outside the files): pass it as `norm_scale`. Per-token normalisations are refused.
    """
    from safetensors.torch import load_file

    sae_dir = Path(sae_dir)
    cfg_path, weights_path = sae_dir / SAELENS_CFG, sae_dir / SAELENS_WEIGHTS
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"SAELens checkpoint file not found: {p}")
    cfg = json.loads(cfg_path.read_text())
    state = {k: v.float() for k, v in load_file(str(weights_path)).items()}
    architecture = cfg.get("architecture", "standard")
    d_model, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm == "expected_average_only_in":
        if norm_scale is None:
            raise ValueError(
                f"{cfg_path}: normalize_activations=expected_average_only_in needs its scaling "
                "factor; pass norm_scale"
            )
    elif norm != "none":
        raise ValueError(f"{cfg_path}: normalize_activations={norm!r} is per token; not supported")
    weights = _take(state, ("W_enc", "b_enc", "W_dec", "b_dec"), weights_path)
    threshold = state.pop("threshold", None)
    if threshold is None and "log_threshold" in state:  # SAELens' JumpReLU training checkpoints
        threshold = state.pop("log_threshold").exp()
    if architecture == "standard":
        sae_cfg = SAEConfig(arch="relu", d_model=d_model, d_sae=d_sae)
    elif architecture == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            # SAELens selects and ReLUs `h * ||W_dec_j||` and decodes `f / ||W_dec_j||`: folded
            # exactly into W_enc, b_enc and W_dec, as SAELens' own `_fold_norm_topk` does.
            n = weights["W_dec"].norm(dim=1).clamp_min(1e-8)
            weights["W_enc"], weights["b_enc"] = weights["W_enc"] * n, weights["b_enc"] * n
            weights["W_dec"] = weights["W_dec"] / n[:, None]
        sae_cfg = SAEConfig(arch="topk", d_model=d_model, d_sae=d_sae, k=int(cfg["k"]))
    elif architecture == "jumprelu":
        if threshold is None:
            raise ValueError(f"{weights_path}: a jumprelu SAE needs a 'threshold' tensor")
        sae_cfg = SAEConfig(arch="jumprelu", d_model=d_model, d_sae=d_sae)
    else:
        raise ValueError(f"{cfg_path}: SAELens architecture {architecture!r} is not supported")
    if state:
        raise ValueError(f"{weights_path}: unexpected tensors {sorted(state)}")
    sae = _build(sae_cfg, weights, bool(cfg.get("apply_b_dec_to_input", True)), weights_path)
    if threshold is not None:
        with torch.no_grad():
            # log(0) = -inf gives exp(-inf) = 0: a zero threshold stays a plain ReLU.
            sae.log_threshold.copy_(threshold.reshape(d_sae).log())
    if norm_scale is not None:
        sae.set_normalisation(torch.zeros(d_model), norm_scale)
    sae.extra = {"imported_from": "saelens", "source": str(sae_dir), "saelens_cfg": cfg}
    return sae.eval()


def save_saelens(sae: SAE, out_dir: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` as SAELens' `cfg.json` + `sae_weights.safetensors`; returns `out_dir`.

    The normalisation `x_n = (x - m) s` is folded in (`W_enc s`, `W_dec / s`, `b_dec / s + m`),
    so SAELens' `encode`/`decode` on raw inputs give ours. BatchTopK and Matryoshka SAEs are
    written as `jumprelu` at their learned threshold, which is how they infer. A signed TopK
    (`topk_relu=False`) is refused: SAELens' TopK ReLUs the kept values.
    """
    from safetensors.torch import save_file

    cfg = sae.cfg
    if not cfg.topk_relu:
        raise ValueError(
            "save_saelens: a signed TopK SAE (topk_relu=False, saev's `mask * h`) has no SAELens "
            "architecture; SAELens' topk applies ReLU to the kept values"
        )
    s = float(sae.norm_scale)
    m = sae.norm_mean.detach().cpu()
    with torch.no_grad():
        tensors = {
            "W_enc": (sae.W_enc.detach().cpu() * s).contiguous(),
            "b_enc": sae.b_enc.detach().cpu().contiguous(),
            "W_dec": (sae.W_dec.detach().cpu() / s).contiguous(),
            "b_dec": (sae.b_dec.detach().cpu() / s + m).contiguous(),
        }
        extra_cfg: dict[str, Any] = {}
        if cfg.arch == "relu":
            architecture = "standard"
        elif cfg.arch == "topk":
            architecture = "topk"
            extra_cfg = {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
        else:
            architecture = "jumprelu"
            theta = sae.jump_threshold().detach().cpu().float()
            tensors["threshold"] = theta.expand(cfg.d_sae).contiguous()
    layer = sae.extra.get("layer")
    meta = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,  # not trained by SAELens
        "model_name": sae.extra.get("backbone"),
        "hook_name": f"blocks.{layer}.hook_resid_post" if layer is not None else None,
        "saev_flow": {"arch": cfg.arch, "manifest_sha256": sae.extra.get("manifest_sha256")},
        **(metadata or {}),
    }
    out = {
        "architecture": architecture,
        "d_in": cfg.d_model,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra_cfg,
        "metadata": meta,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / SAELENS_WEIGHTS))
    (out_dir / SAELENS_CFG).write_text(json.dumps(out, indent=2) + "\n")
    return out_dir


def _take(state: dict[str, Tensor], names: tuple[str, ...], where: Path) -> dict[str, Tensor]:
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"{where}: missing tensors {missing} (has {sorted(state)})")
    return {n: state.pop(n).float() for n in names}


def _build(cfg: SAEConfig, w: dict[str, Tensor], subtract_b_dec: bool, where: Path) -> SAE:
    """Our SAE with the source's weights; `x W_enc + b_enc` sources get `b_enc + b_dec W_enc`."""
    want = {
        "W_enc": (cfg.d_model, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_model),
        "b_dec": (cfg.d_model,),
    }
    for name, shape in want.items():
        if tuple(w[name].shape) != shape:
            raise ValueError(
                f"{where}: {name} has shape {tuple(w[name].shape)}, the config needs {shape}"
            )
    sae = SAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(w["W_enc"])
        sae.W_dec.copy_(w["W_dec"])
        sae.b_dec.copy_(w["b_dec"])
        b_enc = w["b_enc"] if subtract_b_dec else w["b_enc"] + w["b_dec"] @ w["W_enc"]
        sae.b_enc.copy_(b_enc)
    if not all(math.isfinite(float(t.abs().max())) for t in w.values()):
        raise ValueError(f"{where}: weights contain NaN or inf")
    return sae
