"""Where an original image's pixels land in the model's input: the processor's resize and crop.

Hub processors do not squash an image to the model's input size. CLIP and DINOv2 (Bit) resize
the short side (CLIP to 224, DINOv2 to 256) keeping the aspect ratio, then cut the centre
(224 x 224); SigLIP and ViT resize to a fixed height and width without a crop. Masks, boxes,
thumbnails and heat maps must go through the same steps as the image, or a patch's label is the
label of other pixels than the ones the model saw (on 320 x 240 images under CLIP's processor,
224/224, the labels of a squashed mask agree with the crop's on 89% of the patches, 77-97% by
mask; under DINOv2's, 256/224, on 82%).

`Geometry.from_processor` reads the steps from a transformers image processor; the arithmetic
copies transformers 5.24 exactly, for both backends:

- shortest edge S: the short side becomes S and the long side `int(S * long / short)`
  (`image_transforms.get_resize_output_image_size`, truncation, not rounding); with
  `longest_edge` L as well, `get_size_with_aspect_ratio` (the long side capped at L);
- height/width: that size, aspect ratio ignored;
- centre crop (ch, cw) of a (h, w) image: top `(h - ch) // 2`, left `(w - cw) // 2`
  (`image_transforms.center_crop`, PIL backend; the torchvision backend's
  `int((h - ch) / 2.0)` is the same for h >= ch). A crop larger than the image pads with zeros:
  the PIL backend puts the extra row on top (`ceil`), torchvision at the bottom (`floor`).

Masks are resized with PIL's nearest neighbour (each output pixel takes the source pixel under
its centre), whatever filter the processor uses for the image itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
"""PIL's resampling codes (`PIL.Image.Resampling`) by the name the manifest records."""

# Processor attributes that move pixels in ways this module does not model.
_UNSUPPORTED = ("do_pad", "do_crop_margin", "do_random_crop", "crop_pct")


@dataclass(frozen=True)
class Geometry:
    """The resize and centre crop that take an original image to the model's input."""

    resize: Literal["none", "shortest_edge", "height_width"]
    """none: keep the size; shortest_edge: scale keeping the aspect; height_width: to a size."""
    shortest_edge: int = 0
    """shortest_edge: the short side after resizing."""
    longest_edge: int = 0
    """shortest_edge: cap on the long side after resizing (0: none)."""
    height: int = 0
    """height_width: the height after resizing."""
    width: int = 0
    """height_width: the width after resizing."""
    crop_height: int = 0
    """Height of the centre crop (0: no crop)."""
    crop_width: int = 0
    """Width of the centre crop (0: no crop)."""
    resample: str = "bilinear"
    """The filter the processor resizes images with (masks always use nearest)."""
    backend: Literal["pil", "torchvision"] = "pil"
    """The processor's backend; they differ only in how a too-small image is padded."""

    def __post_init__(self) -> None:
        if self.resize not in ("none", "shortest_edge", "height_width"):
            raise ValueError(
                f"geometry.resize must be none|shortest_edge|height_width, got {self.resize!r}"
            )
        if self.resize == "shortest_edge" and self.shortest_edge <= 0:
            raise ValueError(f"geometry.shortest_edge must be positive, got {self.shortest_edge}")
        if self.resize == "height_width" and (self.height <= 0 or self.width <= 0):
            raise ValueError(
                f"geometry.height/width must be positive, got {self.height}x{self.width}"
            )
        if (self.crop_height > 0) != (self.crop_width > 0) or min(
            self.crop_height, self.crop_width
        ) < 0:
            raise ValueError(
                f"geometry.crop_height/crop_width must both be positive or both 0, "
                f"got {self.crop_height}x{self.crop_width}"
            )
        if self.resample not in RESAMPLE_NAMES.values():
            raise ValueError(
                f"geometry.resample must be one of {sorted(RESAMPLE_NAMES.values())}, "
                f"got {self.resample!r}"
            )
        if self.backend not in ("pil", "torchvision"):
            raise ValueError(f"geometry.backend must be pil|torchvision, got {self.backend!r}")

    # -- construction and records ------------------------------------------------------------

    @classmethod
    def squash(cls, height: int, width: int) -> Geometry:
        """The whole image resized to (height, width), no crop: what the code assumed before."""
        return cls("height_width", height=int(height), width=int(width), resample="nearest")

    @classmethod
    def from_processor(cls, processor: Any) -> Geometry:
        """The geometry of a transformers image processor (CLIP, SigLIP, Bit/DINOv2, ViT, ...).

        Raises ValueError naming the setting when the processor does something else to the
        pixels (padding, a margin crop, `crop_pct`, a size given as max_height/max_width, ...).
        """
        name = type(processor).__name__
        bad = [a for a in _UNSUPPORTED if getattr(processor, a, None)]
        if bad:
            raise ValueError(
                f"{name}: the settings {', '.join(f'{a}={getattr(processor, a)!r}' for a in bad)} "
                "change the pixel geometry in a way saev_core.geometry does not model; "
                "use a processor that only resizes and centre-crops"
            )
        for attr in ("do_resize", "size"):
            if not hasattr(processor, attr):
                raise ValueError(
                    f"{name} has no attribute {attr!r}: not an image processor saev can read"
                )
        kw: dict[str, Any] = {"backend": _backend(processor), "resample": _resample_name(processor)}
        if processor.do_resize:
            size = _size_dict(processor.size, f"{name}.size")
            extra = sorted(
                k for k in size if k not in ("shortest_edge", "longest_edge", "height", "width")
            )
            if extra:
                raise ValueError(f"{name}.size: keys {extra} are not supported (size = {size})")
            # The order of the tests is the one transformers' resize uses.
            if size.get("shortest_edge") and size.get("longest_edge"):
                kw.update(
                    resize="shortest_edge",
                    shortest_edge=int(size["shortest_edge"]),
                    longest_edge=int(size["longest_edge"]),
                )
            elif size.get("shortest_edge"):
                kw.update(resize="shortest_edge", shortest_edge=int(size["shortest_edge"]))
            elif size.get("height") and size.get("width"):
                kw.update(
                    resize="height_width", height=int(size["height"]), width=int(size["width"])
                )
            else:
                raise ValueError(
                    f"{name}.size = {size}: need shortest_edge (optionally with longest_edge) "
                    "or height and width"
                )
        else:
            kw["resize"] = "none"
        if getattr(processor, "do_center_crop", False):
            crop = _size_dict(getattr(processor, "crop_size", None), f"{name}.crop_size")
            if not (crop.get("height") and crop.get("width")):
                raise ValueError(f"{name}.crop_size = {crop}: a centre crop needs height and width")
            kw.update(crop_height=int(crop["height"]), crop_width=int(crop["width"]))
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (the shard manifest's `geometry`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "geometry") -> Geometry:
        """Inverse of `to_dict`; unknown or missing fields raise a ValueError naming `where`."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping, got {d!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown} (known: {sorted(names)})")
        if "resize" not in d:
            raise ValueError(f"{where}: missing field 'resize'")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from e

    # -- sizes -------------------------------------------------------------------------------

    @property
    def squashes(self) -> bool:
        """True when the whole image is stretched onto the input (no crop, aspect ignored)."""
        return not self.crop_height and self.resize in ("none", "height_width")

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) of a w x h image after the resize step."""
        w, h = int(w), int(h)
        if self.resize == "none":
            return w, h
        if self.resize == "height_width":
            return self.width, self.height
        if self.longest_edge:
            oh, ow = _size_with_aspect_ratio((h, w), self.shortest_edge, self.longest_edge)
            return ow, oh
        # image_transforms.get_resize_output_image_size(default_to_square=False)
        s = self.shortest_edge
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = s, int(s * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)

    def crop_box(self, w: int, h: int) -> tuple[int, int, int, int]:
        """The crop (left, top, right, bottom) in resized coordinates of a w x h image; it
        reaches outside [0, resized) where the processor pads a too-small image with zeros."""
        rw, rh = self.resized_size(w, h)
        if not self.crop_height:
            return 0, 0, rw, rh
        left = self._offset(rw, self.crop_width)
        top = self._offset(rh, self.crop_height)
        return left, top, left + self.crop_width, top + self.crop_height

    def _offset(self, have: int, want: int) -> int:
        if have >= want or self.backend == "pil":
            return (have - want) // 2  # PIL pads ceil((want - have) / 2) above: the same formula
        return -((want - have) // 2)  # torchvision pads floor((want - have) / 2) above

    def input_size(self, w: int, h: int) -> tuple[int, int]:
        """(height, width) of the model input made from a w x h image."""
        left, top, right, bottom = self.crop_box(w, h)
        return bottom - top, right - left

    # -- moving pixels -----------------------------------------------------------------------

    def transform_mask(self, mask_hw: np.ndarray) -> np.ndarray:
        """A label mask [H, W] (any integer or bool dtype) as the model sees it: resized by
        nearest neighbour and cropped like the image; padding, if any, is 0 (background)."""
        from PIL import Image

        m = np.asarray(mask_hw)
        if m.ndim != 2:
            raise ValueError(f"mask must be 2-D [H, W], got shape {m.shape}")
        h, w = m.shape
        rw, rh = self.resized_size(w, h)
        if (rw, rh) != (w, h):
            if m.dtype == np.bool_ or (m.size and m.min() >= 0 and m.max() < 256):
                im = Image.fromarray(m.astype(np.uint8))
            elif m.size and (m.min() < -(2**31) or m.max() >= 2**31):
                raise ValueError(f"mask values {m.min()}..{m.max()} do not fit in int32")
            else:
                im = Image.fromarray(m.astype(np.int32))  # PIL mode "I"
            m = np.asarray(im.resize((rw, rh), Image.Resampling.NEAREST)).astype(m.dtype)
        left, top, right, bottom = self.crop_box(w, h)
        if (left, top, right, bottom) == (0, 0, rw, rh):
            return m
        out = np.zeros((bottom - top, right - left), dtype=m.dtype)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(bottom, rh), min(right, rw)
        out[y0 - top : y1 - top, x0 - left : x1 - left] = m[y0:y1, x0:x1]
        return out

    def view(self, image: Any) -> Any:
        """The RGB image as the model sees it before normalisation (a PIL image of the input
        size): for thumbnails and overlays that must line up with the patch grid."""
        from PIL import Image

        im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        im = im.convert("RGB")
        w, h = im.size
        rw, rh = self.resized_size(w, h)
        if (rw, rh) != (w, h):
            code = {v: k for k, v in RESAMPLE_NAMES.items()}[self.resample]
            im = im.resize((rw, rh), Image.Resampling(code))
        box = self.crop_box(w, h)
        return im if box == (0, 0, rw, rh) else im.crop(box)  # PIL fills outside with black

    def box_to_input(
        self, bbox: tuple[float, float, float, float], w: int, h: int
    ) -> tuple[float, float, float, float]:
        """A box (x0, y0, x1, y1) in px of a w x h original image, in px of the model input,
        clipped to it; empty (x1 <= x0 or y1 <= y0) when the crop cuts the box away."""
        x0, y0, x1, y1 = (float(v) for v in bbox)
        rw, rh = self.resized_size(w, h)
        left, top, right, bottom = self.crop_box(w, h)
        sx, sy = rw / w, rh / h
        ih, iw = bottom - top, right - left

        def clip(v: float, hi: int) -> float:
            return min(max(v, 0.0), float(hi))

        return (
            clip(x0 * sx - left, iw),
            clip(y0 * sy - top, ih),
            clip(x1 * sx - left, iw),
            clip(y1 * sy - top, ih),
        )


def _size_with_aspect_ratio(
    image_size: tuple[int, int], size: int, max_size: int
) -> tuple[int, int]:
    """transformers.image_transforms.get_size_with_aspect_ratio, copied for exactness: (h, w)."""
    height, width = image_size
    raw_size = None
    min_original_size = float(min((height, width)))
    max_original_size = float(max((height, width)))
    if max_original_size / min_original_size * size > max_size:
        raw_size = max_size * min_original_size / max_original_size
        size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        ow = size
        oh = int(raw_size * height / width) if raw_size is not None else int(size * height / width)
        return oh, ow
    oh = size
    ow = int(raw_size * width / height) if raw_size is not None else int(size * width / height)
    return oh, ow


def _size_dict(size: Any, where: str) -> dict[str, int]:
    """A processor's size (a SizeDict, a dict, or a plain int meaning a square) as a dict of
    its set keys."""
    if size is None:
        raise ValueError(f"{where} is not set")
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, dict):
        return {k: v for k, v in size.items() if v is not None}
    keys = (
        "height",
        "width",
        "shortest_edge",
        "longest_edge",
        "max_height",
        "max_width",
        "min_pixels",
        "max_pixels",
    )
    out = {k: getattr(size, k) for k in keys if getattr(size, k, None) is not None}
    if not out:
        raise ValueError(f"{where} = {size!r}: cannot read it")
    return out


def _resample_name(processor: Any) -> str:
    r = getattr(processor, "resample", None)
    if r is None:
        return "bilinear"  # both backends' default
    code = getattr(r, "value", r)
    if isinstance(code, int) and code in RESAMPLE_NAMES:
        return RESAMPLE_NAMES[code]
    name = str(getattr(r, "name", r)).lower().rsplit(".", 1)[-1]  # a torchvision InterpolationMode
    name = {"nearest_exact": "nearest"}.get(name, name)
    if name in RESAMPLE_NAMES.values():
        return name
    raise ValueError(f"{type(processor).__name__}.resample = {r!r}: unknown resampling filter")


def _backend(processor: Any) -> str:
    backend = getattr(processor, "backend", "pil")
    return backend if backend in ("pil", "torchvision") else "pil"


def read_geometry(processor: Any) -> tuple[Geometry | None, str]:
    """(geometry, "") when `Geometry` follows `processor` exactly, else (None, why not).

    Beyond reading the settings, a non-square image whose pixels carry their own coordinates
    goes through the processor itself (nearest, no rescale or normalisation) and must land
    where `transform_mask` says (within one source pixel, for backends whose nearest rounds
    differently). A backbone without a geometry still extracts; only what maps original pixels
    to patches (mask labels, region and target scopes, probe targets) then refuses.
    """
    try:
        geometry = Geometry.from_processor(processor)
    except ValueError as e:
        return None, str(e)
    from PIL import Image

    w, h = 61, 47
    ys, xs = np.mgrid[0:h, 0:w]
    rgb = np.stack([xs, ys, np.full_like(xs, 255)], axis=-1).astype(np.uint8)
    try:
        out = processor(
            images=[Image.fromarray(rgb)],
            resample=Image.Resampling.NEAREST,
            do_rescale=False,
            do_normalize=False,
            return_tensors="np",
        )["pixel_values"][0]
    except Exception as e:  # a processor that takes none of these keywords cannot be checked
        return None, f"could not push a test image through the processor ({e})"
    want_x = geometry.transform_mask(xs.astype(np.int32) + 1)  # 0 stays for padding
    want_y = geometry.transform_mask(ys.astype(np.int32) + 1)
    got = np.rint(out[:2]).astype(np.int64)
    pad = out[2] < 128  # the blue channel is 255 on every real pixel, 0 on padding
    if got.shape[1:] != want_x.shape:
        return None, f"the processor's output is {got.shape[1:]}, the geometry says {want_x.shape}"
    real = ~pad & (want_x > 0)
    if (pad != (want_x == 0)).any() or (
        real.any()
        and max(
            np.abs(got[0][real] - (want_x[real] - 1)).max(),
            np.abs(got[1][real] - (want_y[real] - 1)).max(),
        )
        > 1
    ):
        return None, f"the processor moves pixels otherwise than {geometry.to_dict()} says"
    return geometry, ""
