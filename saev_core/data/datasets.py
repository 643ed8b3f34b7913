"""Records of a Hugging Face `datasets` directory written by `save_to_disk`.

`datasets` is imported inside the functions: it costs about a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saev_core.data.images import (
    MASK_COLUMN_WORDS,
    SPLIT_ALIASES,
    ImageRecord,
    _DatasetSource,
    _load_splits,
)
from saev_core.data.layout import _checked_mask, _mask_classes, _ordered, _read_classes, _split_of


def _datasets_records(
    data_dir: Path, wanted: set[str] | None, carve: float = 0.0
) -> list[ImageRecord]:
    """Records of a Hugging Face datasets directory written by save_to_disk."""
    import datasets

    parts = _load_splits(data_dir)
    split_keys: dict[str, str] = {}
    for k in parts:
        split = SPLIT_ALIASES.get(k, k)
        if split in split_keys:
            raise ValueError(
                f"{data_dir}: splits {split_keys[split]!r} and {k!r} both mean {split}"
            )
        split_keys[split] = k

    features = next(iter(parts.values())).features
    image_cols = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    mask_cols = [c for c in image_cols if any(w in c.lower() for w in MASK_COLUMN_WORDS)]
    plain_cols = [c for c in image_cols if c not in mask_cols]
    if len(plain_cols) != 1 or len(mask_cols) > 1:
        raise ValueError(
            f"{data_dir}: expected one Image column (plus at most one mask column named like "
            f"{'/'.join(MASK_COLUMN_WORDS)}), found Image columns {image_cols}"
        )
    image_col, mask_col = plain_cols[0], (mask_cols[0] if mask_cols else None)
    label_cols = {c: f for c, f in features.items() if _class_label(f) is not None}
    classes_txt = data_dir / "classes.txt"
    names = _read_classes(classes_txt) if classes_txt.exists() else None
    source = _DatasetSource(data_dir, split_keys, image_col, mask_col)
    source._parts = parts  # already open: spare the source a second load_from_disk

    records: list[ImageRecord] = []
    image_id = 0
    for source_split in _ordered(split_keys):
        ds = parts[split_keys[source_split]]
        if features != ds.features:
            raise ValueError(
                f"{data_dir}: split {split_keys[source_split]!r} has different columns"
            )
        # the splits this part's rows can go to: itself, and val when val is carved from train
        targets = {source_split} | ({"val"} if carve and source_split == "train" else set())
        if wanted is not None and not targets & wanted:
            image_id += len(ds)  # ids count every split, as in the folders
            continue
        columns = ds.select_columns(list(label_cols)).to_dict() if label_cols else {}
        for index in range(len(ds)):
            key = f"{source_split}/{index}"  # the row's address in the dataset (never the carve)
            split = _split_of(source_split, key, carve)
            if wanted is not None and split not in wanted:
                image_id += 1
                continue
            labels: set[str] = set()
            for c, f in label_cols.items():
                value = columns[c][index]
                for v in value if isinstance(value, list) else [value]:
                    if v is not None and v >= 0:  # -1 = no label (e.g. a test split)
                        labels.add(_class_label(f).int2str(v))
            mask_path, mask_labels = None, {}
            if mask_col is not None:
                raw = source.mask_file(key)
                if raw is not None:  # a row without a mask keeps its image, without mask labels
                    mask_path = f"{data_dir}::{key}/{mask_col}"
                    values = _checked_mask(raw, mask_path)
                    mask_names, mask_labels = _mask_classes(values, names, mask_path)
                    labels.update(mask_names)
            records.append(
                ImageRecord(
                    image_id=image_id,
                    split=split,
                    key=key,
                    path=f"{data_dir}::{key}",
                    labels=tuple(sorted(labels)),
                    mask_path=mask_path,
                    mask_labels=mask_labels,
                    source=source,
                )
            )
            image_id += 1
    return records


def _class_label(feature: Any):
    """The ClassLabel of a ClassLabel column or a list-of-ClassLabel column, else None."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return feature
    inner = getattr(feature, "feature", None)
    if isinstance(feature, datasets.List | datasets.LargeList) and isinstance(
        inner, datasets.ClassLabel
    ):
        return inner
    return None
