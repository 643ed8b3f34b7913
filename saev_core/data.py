"""Image sources: the records (id, key, split, labels, mask) that extraction reads, and safe opening.

`load_records(data_dir)` recognises four sources by what the directory holds:

1. The built-in `shapes` world: `images.csv` is present (layout in `shapes.py`).
2. A Hugging Face `datasets` dataset written by `save_to_disk` (`dataset_dict.json` for a
   `DatasetDict`, `state.json` for a single `Dataset`). The splits are the DatasetDict's keys
   ("validation"/"valid" are read as "val"; a single Dataset is "train"). The image is the column
   with an `Image` feature; a second `Image` column whose name contains "mask", "annotation" or
   "segment" is a segmentation mask. Labels are the names of every `ClassLabel` column (or list of
   ClassLabel); -1 means no label. Mask values are named by an optional `<root>/classes.txt`
   (as below), else "class_<value>". Key: "<split>/<row index>".
3. A segmentation folder: `images/` and `masks/` are present.

       <root>/classes.txt                        line i = name of mask value i
       <root>/images/[<split>/]<name>.<ext>      any image suffix; sub-folders allowed
       <root>/masks/[<split>/]<name>.png         one channel (L, P or 16-bit): pixel = class value

   As in Pascal VOC, value 0 is background and 255 is "ignore": neither ever becomes a label
   (line 0 of classes.txt names the background for the reader only). An image's labels are the
   classes present in its mask; an image without a mask is kept with no labels. Key: the image's
   path relative to `images/`.
4. An image folder whose sub-folders are class labels: `<root>/[<split>/]<class>/<file>`.
   Key: the file's path relative to `<root>`.

In a folder the top level is read as splits when every name there is train, val or test. Files
and folders whose names start with "." are ignored. Image ids are assigned in a fixed order
(splits train, val, test, then others by name; files by sorted key), counting every split even
when only some are asked for, so a split's ids do not depend on which others were loaded. Keys
are what identify an image across runs: adding files shifts ids, never keys.

**Held-out split.** A source without a `val` split (a flat folder, a folder of class folders, a
lone `Dataset`, a DatasetDict of only "train") gets one: `val_fraction` of its train images
(10% by default) become `val`, chosen by a stable hash of each image's key
(blake2b-64(key) < val_fraction * 2^64; never Python's salted `hash()`). An image's split thus
depends only on its key and the fraction: adding files never moves another image, and a larger
fraction only moves more images from train to val. Ids stay those of the source order (carving
does not renumber). `held_out_split` says which rule a source gets; extraction records it in the
manifest.

Records hold no pixels. `open_image(record)` returns the decoded RGB image or raises `BadImage`
with a short reason (empty, not an image, corrupt, truncated, unsupported mode, too large), so a
caller can skip and report bad files instead of feeding the model garbage. CMYK (through its
embedded ICC profile into sRGB when it has one) and 16-bit grey (value / 257) are converted, and
`read_image` says so; with `strict=True` both are refused as before. `open_mask(record)`
returns the mask as an array of class values. A bad or unnamed mask stops `load_records` with
the file named: masks are the ground truth, and dropping one silently would skew every label.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"validation": "val", "valid": "val"}
MAX_PIXELS = 64_000_000
"""Default refusal threshold of `open_image`: 64 MP decodes to about 190 MB of RGB."""
VAL_FRACTION = 0.1
"""Default share of a source's train images held out as `val` when it has no val split."""
BACKGROUND, IGNORE = 0, 255
MASK_COLUMN_WORDS = ("mask", "annotation", "segment")

# Modes that `convert("RGB")` maps faithfully (alpha is dropped, grey and palettes expanded).
_RGB_SAFE_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "YCbCr"}
# Unsigned 16-bit grey as PIL opens PNG and TIFF files (values 0..65535).
_GREY16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
# What `read_image` reports for each conversion (fixed strings, so reports can count them).
CMYK_ICC = "CMYK -> sRGB through the embedded ICC profile"
CMYK_PLAIN = "CMYK -> RGB, plain conversion (no ICC profile)"
CMYK_BAD_ICC = "CMYK -> RGB, plain conversion (embedded ICC profile unreadable)"
GREY16 = "16-bit grey -> 8-bit (value / 257)"
# First bytes of the formats in IMAGE_SUFFIXES: a file that starts like one but that PIL cannot
# identify is a damaged image, not some other kind of file.
_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


class BadImage(ValueError):
    """An image (or mask) that cannot be used; `reason` is short and meant for a report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageRecord:
    """One image: its id, split, stable key, image-level labels and (optionally) its mask."""

    image_id: int
    split: str
    key: str
    """Stable name within the source (relative path, or "<split>/<index>" in a datasets dataset)."""
    path: Path | str
    """Where the image is, for people: a file path, or "<root>::<key>" inside a datasets dataset."""
    labels: tuple[str, ...]
    mask_path: Path | str | None = None
    """Where the mask is (file path or display string); None when the image has no mask."""
    mask_labels: dict[int, tuple[str, ...]] = field(default_factory=dict)
    """Mask value -> labels of the pixels with that value (background and ignore never listed)."""
    source: _DatasetSource | None = field(default=None, repr=False, compare=False)
    """Where the bytes live when they are not files (a datasets dataset); None for files."""

    def open(self, max_pixels: int = MAX_PIXELS) -> Image.Image:
        """The image as RGB; raises BadImage (see `open_image`)."""
        return open_image(self, max_pixels)


# --- safe opening -----------------------------------------------------------------------------


def open_image(
    record: ImageRecord, max_pixels: int = MAX_PIXELS, strict: bool = False
) -> Image.Image:
    """The record's image, fully decoded, as RGB; raises BadImage(reason) for an unusable file.

    The size is checked from the header before any pixel is decoded. PIL's own decompression-bomb
    limit (`Image.MAX_IMAGE_PIXELS`, about 89 MP) also applies whatever `max_pixels` says.
    CMYK and 16-bit grey are converted (see `read_image`), or refused when `strict`.
    """
    return read_image(record, max_pixels, strict)[0]


def read_image(
    record: ImageRecord, max_pixels: int = MAX_PIXELS, strict: bool = False
) -> tuple[Image.Image, str | None]:
    """(RGB image, conversion): as `open_image`, and how a mode without a faithful `convert("RGB")`
    was converted (one of CMYK_ICC, CMYK_PLAIN, CMYK_BAD_ICC, GREY16), else None.

    `strict` refuses those modes (BadImage) instead, as saev-flow did before converting them.
    """
    src = record.source.image_file(record.key) if record.source else Path(record.path)
    with _open_header(src, max_pixels) as im:
        image, how = _decode_rgb(im, strict)  # a broken file fails here, with its reason
        # EXIF orientation applied, as transformers' `load_image` and `datasets` do: the picture
        # a viewer shows, and the one a mask drawn on it matches (`open_mask` checks the shape).
        orientation = im.getexif().get(_ORIENTATION, 1)
    if orientation in _TRANSPOSE:
        image = image.transpose(_TRANSPOSE[orientation])
    return image, how


_ORIENTATION = 0x0112  # the EXIF orientation tag
# EXIF orientation -> the transpose that shows the picture upright (as `ImageOps.exif_transpose`)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of an open image as shown, after its EXIF orientation."""
    w, h = im.size
    try:
        orientation = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # an unreadable EXIF block: the stored orientation
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _decode_rgb(im: Image.Image, strict: bool) -> tuple[Image.Image, str | None]:
    """Decode an open image to RGB, converting the modes `read_image` lists."""
    if im.mode == "CMYK":
        if strict:
            raise BadImage("CMYK colour (strict: not converted to RGB)")
        _decode(im)
        return _cmyk_to_rgb(im)
    if im.mode in _GREY16_MODES:
        if strict:
            raise BadImage(f"16-bit grey pixels (mode {im.mode}; strict: not converted)")
        _decode(im)
        return _grey16_to_rgb(im), GREY16
    if _is_high_depth(im.mode):
        raise BadImage(f"32-bit or float pixels (mode {im.mode}): no known range to scale")
    if im.mode not in _RGB_SAFE_MODES:
        raise BadImage(f"unsupported colour mode {im.mode}")
    _decode(im)
    return im.convert("RGB"), None


def _cmyk_to_rgb(im: Image.Image) -> tuple[Image.Image, str]:
    """A decoded CMYK image as RGB: through its embedded ICC profile into sRGB when it has one
    (what a colour-managed viewer shows), else PIL's plain (255-C)(255-K)/255 formula."""
    icc = im.info.get("icc_profile")
    if not icc:
        return im.convert("RGB"), CMYK_PLAIN
    try:
        from PIL import ImageCms
    except ImportError:  # a Pillow built without LittleCMS
        return im.convert("RGB"), CMYK_BAD_ICC

    # Both profiles are made per image: LittleCMS profile handles are not for sharing between
    # the decoding threads, and CMYK files are rare (ImageNet train: 22 of 1.28M, the list in
    # TensorFlow's build_imagenet_data.py).
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        srgb = ImageCms.createProfile("sRGB")
        return ImageCms.profileToProfile(im, profile, srgb, outputMode="RGB"), CMYK_ICC
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return im.convert("RGB"), CMYK_BAD_ICC


def _grey16_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit grey to 8-bit RGB by value / 257, rounded (65535 -> 255, exact at both ends);
    PIL's own convert would clip every value above 255 to white."""
    values = np.asarray(im).astype(np.uint32)
    grey = ((values + 128) // 257).astype(np.uint8)  # = round(v / 257): v / 257 is never x.5
    return Image.fromarray(grey).convert("RGB")  # uint8 [H, W] -> mode L


def open_mask(record: ImageRecord, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The record's mask as an [H, W] integer array of class values; raises BadImage if unusable."""
    if record.mask_path is None:
        raise ValueError(f"{record.path} has no mask")
    src = record.source.mask_file(record.key) if record.source else Path(record.mask_path)
    if src is None:
        raise BadImage("no mask in this row")
    mask = _read_mask(src, max_pixels)
    # The mask is cut like its image (resize, then the processor's crop, computed from the
    # mask's own size), so it must have the image's shape: the same size or an exact scale of it.
    # A mask of another aspect ratio would label other pixels than the ones it was drawn on.
    img = record.source.image_file(record.key) if record.source else Path(record.path)
    with _open_header(img, max_pixels) as im:
        w, h = _oriented_size(im)
    mh, mw = mask.shape[:2]
    if mw * h != mh * w:
        raise BadImage(
            f"mask {record.mask_path} is {mw}x{mh} px but its image {record.path} is {w}x{h} "
            "(as shown, after EXIF orientation): a mask must have its image's aspect ratio"
        )
    return mask


def _read_mask(src: Path | bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Class values of a one-channel mask file (palette masks give their indices, not colours)."""
    with _open_header(src, max_pixels) as im:
        if im.mode not in ("1", "L", "P", "I") and not im.mode.startswith("I;16"):
            raise BadImage(f"a mask must have one channel of class values, got mode {im.mode}")
        _decode(im)
        orientation = im.getexif().get(_ORIENTATION, 1)
        values = np.asarray(
            im.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else im
        )
    return values.astype(np.uint8) if values.dtype == bool else values


def _open_header(src: Path | bytes, max_pixels: int) -> Image.Image:
    """Open `src` reading only its header; refuse empty, unknown and oversized files."""
    try:
        if isinstance(src, Path) and src.stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
    except FileNotFoundError:
        raise BadImage("file not found") from None
    if isinstance(src, bytes | bytearray):
        if not src:
            raise BadImage("empty file (0 bytes)")
        src = io.BytesIO(src)
    try:
        im = Image.open(src)
    # PIL raises above twice Image.MAX_IMAGE_PIXELS (and warns above it, an error only if the
    # caller's warning filters say so). No warnings.catch_warnings here: it is process-wide and
    # extraction opens images from several threads at once.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("too large: over PIL's decompression-bomb limit") from None
    except UnidentifiedImageError:
        raise BadImage(_unidentified_reason(src)) from None
    except Exception as e:  # a format was recognised, then its header failed to parse
        raise BadImage(f"corrupt header ({e})") from None
    w, h = im.size
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)  # PIL's limit applies too
    if w * h > limit:
        im.close()
        raise BadImage(f"too large: {w}x{h} = {w * h / 1e6:.1f} MP > {limit / 1e6:.1f} MP")
    if w == 0 or h == 0:
        im.close()
        raise BadImage(f"zero-sized image ({w}x{h})")
    return im


def _unidentified_reason(src: Path | io.BytesIO) -> str:
    """Why PIL could not identify `src`: a damaged image header, or not an image at all."""
    if isinstance(src, io.BytesIO):
        head = src.getvalue()[:8]
    else:
        with open(src, "rb") as f:
            head = f.read(8)
    if head.startswith(_SIGNATURES):
        return "corrupt header (starts like an image, but PIL cannot read it)"
    return "not an image file (format not recognised)"


def _decode(im: Image.Image) -> None:
    """Decode every pixel now, so damage shows here rather than as garbage in a batch."""
    # With ImageFile.LOAD_TRUNCATED_IMAGES True, PIL would fill a cut-off file with grey instead
    # of raising; we rely on it being False (PIL's default).
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: cut-off files would pass")
    try:
        im.load()
    except Exception as e:  # plugins raise OSError, SyntaxError, ValueError, zlib.error, ...
        if "truncated" in str(e).lower() or isinstance(e, EOFError):
            raise BadImage("truncated file (ends before the image data does)") from None
        raise BadImage(f"corrupt image data ({type(e).__name__}: {e})") from None


def _is_high_depth(mode: str) -> bool:
    """True for 16-bit and 32-bit single-channel modes (I;16*, I, F)."""
    return mode in ("I", "F") or mode.startswith("I;16")


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


def _is_datasets(data_dir: Path) -> bool:
    return (data_dir / "dataset_dict.json").exists() or (data_dir / "state.json").exists()


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


# --- Hugging Face datasets --------------------------------------------------------------------


class _DatasetSource:
    """A `save_to_disk` dataset, opened lazily; records point into it by key "<split>/<index>"."""

    def __init__(
        self, root: Path, split_keys: dict[str, str], image_column: str, mask_column: str | None
    ):
        self.root = root
        self.split_keys = split_keys  # our split name -> the DatasetDict key
        self.image_column = image_column
        self.mask_column = mask_column
        self._parts: dict[str, Any] | None = None  # DatasetDict key -> Dataset, loaded lazily
        self._columns: dict[tuple[str, str], Any] = {}  # (split, column) -> one-column dataset

    def __getstate__(self):
        # The memory-mapped Arrow tables are reopened on first use after unpickling.
        return {**self.__dict__, "_parts": None, "_columns": {}}

    def _row(self, key: str, column: str) -> Path | bytes | None:
        """The encoded file in `column` of the row named by `key` (bytes, a local path, or None)."""
        split, index = key.rsplit("/", 1)
        if (split, column) not in self._columns:
            self._open(split, column)
        value = self._columns[split, column][int(index)][column]
        if value is None:
            return None
        if value.get("bytes") is not None:
            return value["bytes"]
        return Path(value["path"]) if value.get("path") else None

    def _open(self, split: str, column: str) -> None:
        """Load `column` of `split`, set to give the file's bytes rather than a decoded image."""
        if self._parts is None:
            self._parts = _load_splits(self.root)
        ds = self._parts[self.split_keys[split]]
        # decode=False: we want the bytes, to check them before PIL decodes anything.
        self._columns[split, column] = ds.select_columns([column]).cast_column(column, _raw_image())

    def image_file(self, key: str) -> Path | bytes:
        """The encoded image of row `key`; BadImage when the row has none."""
        raw = self._row(key, self.image_column)
        if raw is None:
            raise BadImage("no image in this row")
        return raw

    def mask_file(self, key: str) -> Path | bytes | None:
        """The encoded mask of row `key`, or None when the row has none."""
        return self._row(key, self.mask_column) if self.mask_column else None


def _raw_image():
    """The datasets `Image` feature that yields {"bytes", "path"} instead of a decoded image."""
    import datasets

    return datasets.Image(decode=False)


def _load_splits(root: Path) -> dict[str, Any]:
    """{DatasetDict key: Dataset} of a save_to_disk directory (a lone Dataset is "train")."""
    import datasets  # imported here: it costs about a second

    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded.with_format(None)}
    return {k: v.with_format(None) for k, v in loaded.items()}


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
