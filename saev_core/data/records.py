"""`load_records`: recognise the source under a directory and list its image records."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from saev_core.data.datasets import _datasets_records
from saev_core.data.folders import _folder_records, _segmentation_records, _shapes_records
from saev_core.data.images import IMAGE_SUFFIXES, VAL_FRACTION, ImageRecord
from saev_core.data.layout import _carve_fraction, _carved, _ordered

# --- loading records --------------------------------------------------------------------------


def load_records(
    data_dir: str | Path,
    splits: Sequence[str] | None = None,
    val_fraction: float = VAL_FRACTION,
) -> list[ImageRecord]:
    """All image records under `data_dir`, in image_id order, optionally only some splits.

    A source without a val split has `val_fraction` of its train images moved to val by a
    stable hash of their keys (module docstring); 0 leaves it without val.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"image data directory not found: {data_dir}")
    carve = _carve_fraction(data_dir, val_fraction)
    wanted = set(splits) if splits is not None else None
    if (data_dir / "images.csv").exists():
        records = _carved(_shapes_records(data_dir), carve)
    elif _is_datasets(data_dir):
        records = _datasets_records(data_dir, wanted, carve)
    elif (data_dir / "images").is_dir() and (data_dir / "masks").is_dir():
        records = _segmentation_records(data_dir, wanted, carve)
    else:
        records = _carved(_folder_records(data_dir), carve)
    if not records:
        raise ValueError(
            f"no images found in {data_dir}: expected a shapes world (images.csv), a datasets "
            "save_to_disk directory, a segmentation folder (images/ + masks/), or image files "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}) in class sub-folders"
        )
    if wanted is not None:
        present = {r.split for r in records}
        if not wanted & present:
            raise ValueError(
                f"none of the splits {list(splits)} exist in {data_dir}; it has {_ordered(present)}"
            )
        records = [r for r in records if r.split in wanted]
    return records


def _is_datasets(data_dir: Path) -> bool:
    return (data_dir / "dataset_dict.json").exists() or (data_dir / "state.json").exists()
