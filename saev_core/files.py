"""Small file helpers the stages share: the tracking callback's type and atomic output
directories (write into a temporary sibling, then move it into place)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

Log = Callable[[dict[str, float], int], None]


def no_log(metrics: dict[str, float], step: int) -> None:
    """The default tracking callback: does nothing."""


def replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move a finished `tmp_dir` into `out_dir`, replacing what was there."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp_dir, out_dir)


def tmp_dir_for(out_dir: Path) -> Path:
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp
