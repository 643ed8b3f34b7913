"""Records of the folder sources: the shapes world, an image folder of class folders, and a
segmentation folder (`images/` + `masks/`).
"""

from __future__ import annotations

import csv
from pathlib import Path

from saev_core.data.images import ImageRecord
from saev_core.data.layout import (
    _checked_mask,
    _image_files,
    _mask_classes,
    _read_classes,
    _split_of,
    _split_roots,
)


def _shapes_records(data_dir: Path) -> list[ImageRecord]:
    """Records of the built-in shapes world, from its images.csv and objects.csv."""
    objects: dict[int, dict[int, tuple[str, ...]]] = {}
    objects_csv = data_dir / "objects.csv"
    if objects_csv.exists():
        with objects_csv.open(newline="") as f:
            for row in csv.DictReader(f):
                # The forms world lists each object's labels (concept, concept:form, form).
                if row.get("labels") is not None:
                    own = tuple(x for x in row["labels"].split(";") if x)
                else:
                    own = (row["colour"], row["shape"])
                objects.setdefault(int(row["image_id"]), {})[int(row["object"])] = own
    records = []
    with (data_dir / "images.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            image_id = int(row["image_id"])
            mask = row.get("mask") or None
            records.append(
                ImageRecord(
                    image_id=image_id,
                    split=row["split"],
                    key=row["image"],
                    path=data_dir / row["image"],
                    labels=tuple(x for x in row["labels"].split(";") if x),
                    mask_path=data_dir / mask if mask else None,
                    mask_labels=objects.get(image_id, {}),
                )
            )
    records.sort(key=lambda r: r.image_id)
    return records


def _folder_records(data_dir: Path) -> list[ImageRecord]:
    """Records of an image folder whose sub-folders (below any split folders) are class labels."""
    records: list[ImageRecord] = []
    for split, root in _split_roots(data_dir):
        for path in _image_files(root):
            rel = path.relative_to(root)
            records.append(
                ImageRecord(
                    image_id=len(records),
                    split=split,
                    key=path.relative_to(data_dir).as_posix(),
                    path=path,
                    labels=(rel.parts[0],) if len(rel.parts) > 1 else (),
                )
            )
    return records


def _segmentation_records(
    data_dir: Path, wanted: set[str] | None, carve: float = 0.0
) -> list[ImageRecord]:
    """Records of a segmentation folder (images/, masks/, classes.txt); labels from the masks."""
    classes_txt = data_dir / "classes.txt"
    if not classes_txt.exists():
        raise FileNotFoundError(
            f"segmentation folder {data_dir} has images/ and masks/ but no classes.txt "
            "(line i = name of mask value i)"
        )
    names = _read_classes(classes_txt)
    images_dir, masks_dir = data_dir / "images", data_dir / "masks"
    records: list[ImageRecord] = []
    image_id = 0
    for source_split, root in _split_roots(images_dir):
        for path in _image_files(root):
            key = path.relative_to(images_dir).as_posix()
            split = _split_of(source_split, key, carve)
            mask = (masks_dir / key).with_suffix(".png")
            if wanted is None or split in wanted:  # ids count every split; masks are read only here
                mask_path, labels, mask_labels = None, (), {}
                if mask.is_file():
                    mask_path = mask
                    labels, mask_labels = _mask_classes(_checked_mask(mask), names, mask)
                records.append(
                    ImageRecord(image_id, split, key, path, labels, mask_path, mask_labels)
                )
            image_id += 1
    return records
