"""Split rules and folder helpers that every kind of source uses.

`held_out_split` and `is_held_out` are the held-out split (package docstring); the private
helpers read a source's split names, order splits, list image files and name mask values.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from saev_core.data.images import (
    BACKGROUND,
    IGNORE,
    IMAGE_SUFFIXES,
    SPLIT_ALIASES,
    SPLITS,
    VAL_FRACTION,
    BadImage,
    ImageRecord,
    _read_mask,
)


def held_out_split(data_dir: str | Path, val_fraction: float = VAL_FRACTION) -> dict[str, Any]:
    """How `load_records` makes the val split of this source, as the manifest records it:
    `{"from": "source"}` when the source has its own val split (or val_fraction is 0), else
    `{"from": "train", "fraction": f, "by": "blake2b-64(key) < fraction * 2^64"}`."""
    f = _carve_fraction(Path(data_dir), val_fraction)
    if not f:
        return {"from": "source"}
    return {"from": "train", "fraction": f, "by": "blake2b-64(key) < fraction * 2^64"}


def is_held_out(key: str, val_fraction: float) -> bool:
    """True when the image with this key goes to val: blake2b-64 of its key (big-endian) is
    below val_fraction * 2^64. Depends only on the key, so it is the same on every machine and
    run, and monotone in the fraction. The key is NFC-normalised first, so a file name that
    macOS stores decomposed (NFD) splits as it does on Linux."""
    key = unicodedata.normalize("NFC", key)
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2.0**64


def _carve_fraction(data_dir: Path, val_fraction: float) -> float:
    """The fraction of train images to hold out: val_fraction if the source lacks val, else 0."""
    if not isinstance(val_fraction, int | float) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if not val_fraction or not data_dir.is_dir():
        return 0.0
    named = _source_splits(data_dir)
    return float(val_fraction) if "val" not in named and "train" in named else 0.0


def _source_splits(data_dir: Path) -> set[str]:
    """The split names the source itself gives (read cheaply: no image or mask is opened)."""
    if (data_dir / "images.csv").exists():
        with (data_dir / "images.csv").open(newline="") as f:
            return {row["split"] for row in csv.DictReader(f)}
    if (data_dir / "dataset_dict.json").exists():
        names = json.loads((data_dir / "dataset_dict.json").read_text()).get("splits", [])
        return {SPLIT_ALIASES.get(k, k) for k in names}
    if (data_dir / "state.json").exists():
        return {"train"}  # a lone Dataset is read as train
    if (data_dir / "images").is_dir() and (data_dir / "masks").is_dir():
        return {s for s, _ in _split_roots(data_dir / "images")}
    return {s for s, _ in _split_roots(data_dir)}


def _split_of(split: str, key: str, carve: float) -> str:
    """The split a record goes to: train images move to val by `is_held_out` when carving."""
    return "val" if carve and split == "train" and is_held_out(key, carve) else split


def _carved(records: list[ImageRecord], carve: float) -> list[ImageRecord]:
    if not carve:
        return records
    return [dataclasses.replace(r, split=_split_of(r.split, r.key, carve)) for r in records]


def _ordered(splits: Iterable[str]) -> list[str]:
    """Splits in the fixed order: train, val, test, then any others by name."""
    return sorted(set(splits), key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))


def _split_roots(root: Path) -> list[tuple[str, Path]]:
    """(split, directory) pairs: the top-level folders if all are split names, else one "train"."""
    tops = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if tops and all(p.name in SPLITS for p in tops):
        return [(s, root / s) for s in _ordered(p.name for p in tops)]
    return [("train", root)]


def _image_files(root: Path) -> list[Path]:
    """Image files under `root` (recursively), sorted, skipping hidden files and folders."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )


def _read_classes(path: Path) -> list[str]:
    """Class names from classes.txt: line i names mask value i."""
    return [line.strip() for line in path.read_text().splitlines()]


def _checked_mask(src: Path | bytes, where: Any = None) -> np.ndarray:
    """A mask's values, or a ValueError naming the mask (a bad mask stops loading; see top)."""
    try:
        return _read_mask(src)
    except BadImage as e:
        raise ValueError(f"mask {where or src}: {e.reason}") from None


def _mask_classes(
    values: np.ndarray, names: list[str] | None, where: Any
) -> tuple[tuple[str, ...], dict[int, tuple[str, ...]]]:
    """(image labels, mask value -> labels) for the classes present in a mask."""
    mask_labels: dict[int, tuple[str, ...]] = {}
    for v in (int(v) for v in np.unique(values)):
        if v in (BACKGROUND, IGNORE):
            continue
        if names is None:
            mask_labels[v] = (f"class_{v}",)
        elif v < len(names) and names[v]:
            mask_labels[v] = (names[v],)
        else:
            raise ValueError(f"mask {where}: value {v} has no name in classes.txt")
    labels = tuple(sorted({lab for labs in mask_labels.values() for lab in labs}))
    return labels, mask_labels
