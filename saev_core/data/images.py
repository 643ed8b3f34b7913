"""Image records and safe opening: `ImageRecord`, `open_image`, `read_image`, `open_mask`.

The package docstring (`saev_core.data`) says what each source looks like and how bad files
are refused. This module holds the record itself, the decoding of images and masks (header
checks, orientation, CMYK and 16-bit grey conversions) and `_DatasetSource`, the lazily
opened `datasets` directory a record points into when its bytes are not files.
"""

from __future__ import annotations

import io
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
