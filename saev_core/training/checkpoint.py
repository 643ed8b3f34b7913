"""Resumable training checkpoints: writing them atomically, the fingerprint a checkpoint must
match to be resumed (`checkpoint_fingerprint`, `why_not_resume` in words), and restoring one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from saev_core.config import to_dict
from saev_core.training.config import TrainConfig
from saev_core.training.state import _Member

STATE_NAME = "state.json"


def _write_checkpoint(ckpt_dir: Path, members: list[_Member], state: dict[str, Any]) -> None:
    """Write one resumable checkpoint atomically: a fresh folder renamed over the old one."""
    from safetensors.torch import save_file

    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir.parent / f".{ckpt_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for i, m in enumerate(members):
        tensors = {k: v.detach().cpu().contiguous() for k, v in m.sae.state_dict().items()}
        save_file(tensors, str(tmp / f"sae-{i}.safetensors"))
        # Adam's state is tensors and numbers only, so `weights_only=True` reads it back.
        torch.save(m.opt.state_dict(), tmp / f"optim-{i}.pt")
    state = {**state, "running": [m.running.state() for m in members]}
    (tmp / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n")
    old = ckpt_dir.parent / f".{ckpt_dir.name}.old-{os.getpid()}"
    if ckpt_dir.exists():
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    if old.exists():
        shutil.rmtree(old)


# Fields of TrainConfig that change how a run is computed, logged or placed, not what it
# trains: a checkpoint resumes across a change of any of them.
# (`dense_threshold` is read by `evaluate`, after training.)
NOT_IN_FINGERPRINT = (
    "sparse_kernels",
    "log_every",
    "checkpoint_every",
    "device",
    "dense_threshold",
)


def checkpoint_fingerprint(
    d_model: int, cfgs: Sequence[TrainConfig], data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the data it was trained on (shard manifest
    sha256, layer, token policy, split: whatever the caller passes as `data`), d_model and every
    config field that changes the result (not those in `NOT_IN_FINGERPRINT`)."""
    configs = [{k: v for k, v in to_dict(c).items() if k not in NOT_IN_FINGERPRINT} for c in cfgs]
    # through JSON, as state.json holds it, so a fingerprint compares equal to its own copy
    return json.loads(json.dumps({"data": data or {}, "d_model": d_model, "configs": configs}))


def _show_data(key: str, value: Any) -> str:
    if value is None:
        return f"no {key}"
    if key == "manifest_sha256":
        return f"shard manifest sha256 {str(value)[:12]}"
    return f"{key} {value}"


def why_not_resume(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """Why a checkpoint with fingerprint `old` cannot resume a run with fingerprint `new`, in
    words (`checkpoint is for layer 3, this run is layer 4`); None when it can."""
    if not isinstance(old, dict) or "data" not in old:
        return "checkpoint was written by an older saev without a data fingerprint"
    for key in sorted(set(old["data"]) | set(new["data"])):
        a, b = old["data"].get(key), new["data"].get(key)
        if a != b:
            return f"checkpoint is for {_show_data(key, a)}, this run is {_show_data(key, b)}"
    if old.get("d_model") != new["d_model"]:
        return f"checkpoint is for d_model {old.get('d_model')}, this run is {new['d_model']}"
    olds, news = old.get("configs") or [], new["configs"]
    if len(olds) != len(news):
        return f"checkpoint holds {len(olds)} SAEs, this run trains {len(news)}"
    for i, (a, b) in enumerate(zip(olds, news, strict=True)):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                which = f" (SAE {i + 1} of {len(news)})" if len(news) > 1 else ""
                return (
                    f"checkpoint is for {key}={a.get(key)!r}, "
                    f"this run is {key}={b.get(key)!r}{which}"
                )
    return None


def read_checkpoint_state(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The `state.json` of a checkpoint folder, or None if there is none."""
    path = Path(ckpt_dir) / STATE_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _restore(ckpt_dir: Path, members: list[_Member], device: torch.device) -> None:
    from safetensors.torch import load_file

    state = json.loads((ckpt_dir / STATE_NAME).read_text())
    for i, m in enumerate(members):
        m.sae.load_tensors(
            load_file(str(ckpt_dir / f"sae-{i}.safetensors"), device=str(device)), str(ckpt_dir)
        )
        opt_state = torch.load(ckpt_dir / f"optim-{i}.pt", weights_only=True, map_location=device)
        m.opt.load_state_dict(opt_state)
        m.running.load(state["running"][i])
