"""SAE checkpoints, as functions of the `SAE` (its `save`, `load_tensors` and `load` delegate here).

A checkpoint is a directory with `sae.safetensors` (every parameter and buffer) and `cfg.json`
(the `SAEConfig`, the normalisation constants and any `extra` the caller records). No pickle.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saev_core.config import from_dict, to_dict
from saev_core.sae.config import CFG_NAME, FORMAT_VERSION, WEIGHTS_NAME, SAEConfig


def save(sae: Any, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `sae.safetensors` and `cfg.json` into `out_dir` atomically; returns `out_dir`.

    `extra` (JSON-able; e.g. shard manifest hash, layer, backbone) replaces `sae.extra`.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if extra is not None:
        sae.extra = dict(extra)
    tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "sae": to_dict(sae.cfg),
        "norm_mean": sae.norm_mean.cpu().tolist(),
        "norm_scale": float(sae.norm_scale),
        "extra": sae.extra,
    }
    weights_tmp = out_dir / (WEIGHTS_NAME + ".tmp")
    cfg_tmp = out_dir / (CFG_NAME + ".tmp")
    save_file(tensors, str(weights_tmp))
    cfg_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(weights_tmp, out_dir / WEIGHTS_NAME)
    os.replace(cfg_tmp, out_dir / CFG_NAME)
    return out_dir


def load_tensors(sae: Any, tensors: dict[str, Tensor], where: str) -> None:
    """Load a state dict, refusing missing, unexpected or mis-shaped tensors with a clear error."""
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: tensors do not match the config: missing {missing}, unexpected {unexpected}"
        )
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape:
            raise ValueError(
                f"{where}: {name} has shape {tuple(got.shape)}, but cfg.json "
                f"(d_model={sae.cfg.d_model}, d_sae={sae.cfg.d_sae}) needs {tuple(want.shape)}"
            )
    sae.load_state_dict(tensors)


def load(cls: Any, sae_dir: str | Path, device: str | torch.device = "cpu") -> Any:
    """Read a directory written by `save` (in eval mode), refusing shapes that disagree with cfg.json."""
    from safetensors.torch import load_file

    sae_dir = Path(sae_dir)
    cfg_path, weights_path = sae_dir / CFG_NAME, sae_dir / WEIGHTS_NAME
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"SAE checkpoint file not found: {path}")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or "sae" not in meta:
        raise ValueError(f"{cfg_path}: no 'sae' section; not an SAE checkpoint")
    cfg = from_dict(SAEConfig, meta["sae"], where=str(cfg_path))
    sae = cls(cfg)
    sae.load_tensors(load_file(str(weights_path)), str(weights_path))
    # cfg.json repeats the normalisation for readers without safetensors; they must agree.
    if "norm_mean" in meta and "norm_scale" in meta:
        json_mean = torch.tensor(meta["norm_mean"], dtype=torch.float32)
        if json_mean.shape != sae.norm_mean.shape or not (
            torch.allclose(json_mean, sae.norm_mean)
            and math.isclose(float(meta["norm_scale"]), float(sae.norm_scale), rel_tol=1e-6)
        ):
            raise ValueError(
                f"{sae_dir}: norm_mean/norm_scale in {CFG_NAME} disagree with {WEIGHTS_NAME}"
            )
    sae.extra = dict(meta.get("extra") or {})
    return sae.to(device).eval()
