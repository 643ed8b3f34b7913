"""Image sources: the records (id, split, path, labels, mask) that extraction reads.

Two layouts are understood now:
- the built-in `shapes` world (`images.csv`, `objects.csv`, per-pixel masks; see `shapes.py`);
- an image folder whose sub-folders are class labels (`<root>/<class>/<file>`), optionally split
  into `<root>/<split>/<class>/<file>` when the top level is named train/val/test.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageRecord:
    """One image: where it is, which split, its image-level labels and (optionally) its mask."""

    image_id: int
    split: str
    path: Path
    labels: tuple[str, ...]
    mask_path: Path | None = None
    # mask value -> concepts of the object drawn with that value (0 = background, never listed)
    mask_labels: dict[int, tuple[str, ...]] = field(default_factory=dict)


def load_records(data_dir: str | Path, splits: Sequence[str] | None = None) -> list[ImageRecord]:
    """All image records under `data_dir`, in image_id order, optionally only some splits."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"image data directory not found: {data_dir}")
    if (data_dir / "images.csv").exists():
        records = _shapes_records(data_dir)
    else:
        records = _folder_records(data_dir)
    if splits is not None:
        unknown = set(splits) - {r.split for r in records}
        if unknown == set(splits):
            raise ValueError(f"none of the splits {list(splits)} exist in {data_dir}")
        records = [r for r in records if r.split in splits]
    if not records:
        raise ValueError(f"no images found in {data_dir}")
    return records


def _shapes_records(data_dir: Path) -> list[ImageRecord]:
    objects: dict[int, dict[int, tuple[str, ...]]] = {}
    objects_csv = data_dir / "objects.csv"
    if objects_csv.exists():
        with objects_csv.open(newline="") as f:
            for row in csv.DictReader(f):
                objects.setdefault(int(row["image_id"]), {})[int(row["object"])] = (
                    row["colour"],
                    row["shape"],
                )
    records = []
    with (data_dir / "images.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            image_id = int(row["image_id"])
            mask = row.get("mask") or None
            records.append(
                ImageRecord(
                    image_id=image_id,
                    split=row["split"],
                    path=data_dir / row["image"],
                    labels=tuple(x for x in row["labels"].split(";") if x),
                    mask_path=data_dir / mask if mask else None,
                    mask_labels=objects.get(image_id, {}),
                )
            )
    records.sort(key=lambda r: r.image_id)
    return records


def _folder_records(data_dir: Path) -> list[ImageRecord]:
    tops = sorted(p for p in data_dir.iterdir() if p.is_dir())
    if tops and all(p.name in SPLITS for p in tops):
        roots = [(p.name, p) for p in tops]
    else:
        roots = [("train", data_dir)]
    records: list[ImageRecord] = []
    for split, root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                rel = path.relative_to(root)
                labels = (rel.parts[0],) if len(rel.parts) > 1 else ()
                records.append(ImageRecord(len(records), split, path, labels))
    return records
