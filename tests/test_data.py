"""Image sources and safe opening: every source yields the right records; bad files are refused."""

import dataclasses
import hashlib
import io
import itertools
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile

from saev_core.data import (
    CMYK_ICC,
    CMYK_PLAIN,
    GREY16,
    BadImage,
    ImageRecord,
    held_out_split,
    load_records,
    open_image,
    open_mask,
    read_image,
)


def save(path, array_or_image, fmt=None):
    """Write an image (array or PIL) to `path`, making its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = (
        array_or_image
        if isinstance(array_or_image, Image.Image)
        else Image.fromarray(array_or_image)
    )
    im.save(path, format=fmt)
    return path


def rgb(value, size=(6, 8)):
    """A solid RGB image array of shape `size` (h, w)."""
    return np.full((*size, 3), value, dtype=np.uint8)


def file_record(path):
    """A record for a lone file, as a folder source would make it."""
    return ImageRecord(image_id=0, split="train", key=path.name, path=path, labels=())


# --- image folder ------------------------------------------------------------------------------


def test_folder_with_splits(tmp_path):
    save(tmp_path / "train/cat/a.png", rgb(10))
    save(tmp_path / "train/dog/b.jpg", rgb(20))
    save(tmp_path / "test/dog/c.png", rgb(30))
    save(tmp_path / "val/cat/d.png", rgb(40))
    (tmp_path / "train/cat/notes.txt").write_text("not an image suffix")
    save(tmp_path / "train/cat/.hidden.png", rgb(0))  # hidden files are ignored

    records = load_records(tmp_path)
    # splits in the fixed order train, val, test (not alphabetical); files sorted within
    assert [(r.image_id, r.split, r.key, r.labels) for r in records] == [
        (0, "train", "train/cat/a.png", ("cat",)),
        (1, "train", "train/dog/b.jpg", ("dog",)),
        (2, "val", "val/cat/d.png", ("cat",)),
        (3, "test", "test/dog/c.png", ("dog",)),
    ]
    assert all(r.path == tmp_path / r.key and r.mask_path is None for r in records)
    assert np.asarray(open_image(records[2]))[0, 0].tolist() == [40, 40, 40]
    # asking for one split keeps the ids it has among all splits
    assert [(r.image_id, r.key) for r in load_records(tmp_path, ["test"])] == [
        (3, "test/dog/c.png")
    ]


def hashed_val(key, fraction=0.1):
    """The held-out rule, written out independently: blake2b-64 of the key below f * 2^64."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return h < fraction * 2**64


def flat_folder(root, n=100, classes=("cat", "dog", "fox")):
    """`n` tiny PNGs per class folder, plus one loose image without a class."""
    for c, i in itertools.product(classes, range(n)):
        save(root / c / f"{i:03d}.png", rgb(i % 250, (2, 2)))
    save(root / "loose.png", rgb(2, (2, 2)))  # no class folder: no label


def test_flat_folder_holds_out_a_hashed_val_split(tmp_path):
    flat_folder(tmp_path)
    records = load_records(tmp_path)
    keys = sorted(f"{c}/{i:03d}.png" for c in ("cat", "dog", "fox") for i in range(100))
    keys.append("loose.png")
    # ids in sorted key order, whatever the split; labels from the class folders
    assert [(r.image_id, r.key) for r in records] == list(enumerate(sorted(keys)))
    assert all(r.labels == ((r.key.split("/")[0],) if "/" in r.key else ()) for r in records)
    want = {k: "val" if hashed_val(k) else "train" for k in keys}
    assert {r.key: r.split for r in records} == want
    n_val = sum(r.split == "val" for r in records)
    assert 0.05 * len(keys) < n_val < 0.15 * len(keys)  # about 10% (301 keys: 30 +- 15)
    assert held_out_split(tmp_path) == {
        "from": "train",
        "fraction": 0.1,
        "by": "blake2b-64(key) < fraction * 2^64",
    }
    # deterministic, and the val records alone keep their ids
    assert load_records(tmp_path) == records
    assert load_records(tmp_path, ["val"]) == [r for r in records if r.split == "val"]
    # a larger fraction only moves more images to val; 0 holds none out
    wider = {r.key: r.split for r in load_records(tmp_path, val_fraction=0.3)}
    assert {k for k, s in wider.items() if s == "val"} >= {k for k, s in want.items() if s == "val"}
    assert {k for k, s in wider.items() if s == "val"} == {k for k in keys if hashed_val(k, 0.3)}
    assert {r.split for r in load_records(tmp_path, val_fraction=0)} == {"train"}
    assert held_out_split(tmp_path, 0) == {"from": "source"}
    with pytest.raises(ValueError, match="val_fraction must be in"):
        load_records(tmp_path, val_fraction=1.5)


def test_held_out_split_is_stable_when_files_are_added(tmp_path):
    flat_folder(tmp_path, n=40)
    before = {r.key: r.split for r in load_records(tmp_path)}
    for i in range(40, 120):
        save(tmp_path / "cat" / f"{i:03d}.png", rgb(1, (2, 2)))
    save(tmp_path / "aardvark/000.png", rgb(1, (2, 2)))  # sorts first: every id shifts
    after = {r.key: r.split for r in load_records(tmp_path)}
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {f"cat/{i:03d}.png" for i in range(40, 120)} | {
        "aardvark/000.png"
    }


def test_val_is_carved_only_when_the_source_has_none(tmp_path):
    # split folders with val: used as they are
    save(tmp_path / "a/train/cat/x.png", rgb(1))
    save(tmp_path / "a/val/cat/y.png", rgb(1))
    assert held_out_split(tmp_path / "a") == {"from": "source"}
    assert [r.split for r in load_records(tmp_path / "a")] == ["train", "val"]
    # train and test but no val: val comes out of train, test stays test
    for i in range(60):
        save(tmp_path / "b/train/cat" / f"{i}.png", rgb(1, (2, 2)))
    save(tmp_path / "b/test/cat/t.png", rgb(1))
    records = load_records(tmp_path / "b")
    assert held_out_split(tmp_path / "b")["from"] == "train"
    assert {r.key: r.split for r in records} == {
        **{f"train/cat/{i}.png": "val" if hashed_val(f"train/cat/{i}.png") else "train"
           for i in range(60)},
        "test/cat/t.png": "test",
    }  # fmt: skip
    assert "val" in {r.split for r in records}


def test_keys_stay_stable_when_a_folder_grows(tmp_path):
    save(tmp_path / "train/cat/b.png", rgb(1))
    save(tmp_path / "train/dog/c.png", rgb(2))
    save(tmp_path / "val/dog/d.png", rgb(3))
    before = {r.key: (r.path, r.split, r.labels) for r in load_records(tmp_path)}

    save(tmp_path / "train/cat/a.png", rgb(4))  # sorts first: every id after it shifts
    after = load_records(tmp_path)
    assert [r.image_id for r in after] == [0, 1, 2, 3]
    assert len({r.key for r in after}) == len(after)
    new = {r.key: (r.path, r.split, r.labels) for r in after}
    assert set(new) - set(before) == {"train/cat/a.png"}
    assert all(new[k] == v for k, v in before.items())  # old keys name the same images


# --- segmentation folder -----------------------------------------------------------------------


def palette_mask(values):
    """A palette (mode P) mask whose indices are `values` and whose colours are not."""
    im = Image.fromarray(np.asarray(values, dtype=np.uint8), mode="P")
    im.putpalette([200, 10, 10] * 256)  # every index looks the same: only the indices matter
    return im


def make_segmentation(root):
    """A tiny segmentation folder: two splits, an L mask, a P mask and an image without mask."""
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    save(root / "images/train/a.png", rgb(5, (4, 4)))
    save(root / "masks/train/a.png", np.array([[0, 1], [1, 255]], dtype=np.uint8))
    save(root / "images/val/sub/b.jpg", rgb(6, (4, 4)))
    save(root / "masks/val/sub/b.png", palette_mask([[2, 2], [1, 0]]))
    save(root / "images/val/c.png", rgb(7, (4, 4)))  # no mask: kept, no labels


def test_segmentation_folder(tmp_path):
    make_segmentation(tmp_path)
    records = load_records(tmp_path)
    assert [(r.image_id, r.split, r.key) for r in records] == [
        (0, "train", "train/a.png"),
        (1, "val", "val/c.png"),
        (2, "val", "val/sub/b.jpg"),
    ]
    a, c, b = records
    # 0 (background) and 255 (ignore) never become labels
    assert a.labels == ("cat",) and a.mask_labels == {1: ("cat",)}
    assert b.labels == ("cat", "dog") and b.mask_labels == {1: ("cat",), 2: ("dog",)}
    assert c.labels == () and c.mask_labels == {} and c.mask_path is None
    assert b.mask_path == tmp_path / "masks/val/sub/b.png"
    # a palette mask gives its indices, not its colours
    assert open_mask(b).tolist() == [[2, 2], [1, 0]]
    assert open_mask(a).tolist() == [[0, 1], [1, 255]]
    with pytest.raises(ValueError, match="no mask"):
        open_mask(c)
    assert [r.key for r in load_records(tmp_path, ["val"])] == ["val/c.png", "val/sub/b.jpg"]


def test_segmentation_folder_without_splits_holds_out_val(tmp_path):
    (tmp_path / "classes.txt").write_text("background\ncat\n")
    for i in range(40):
        save(tmp_path / f"images/{i:02d}.png", rgb(5, (2, 2)))
        save(tmp_path / f"masks/{i:02d}.png", np.array([[0, 1], [1, 1]], dtype=np.uint8))
    records = load_records(tmp_path)
    assert {r.key: r.split for r in records} == {
        f"{i:02d}.png": "val" if hashed_val(f"{i:02d}.png") else "train" for i in range(40)
    }
    val = load_records(tmp_path, ["val"])
    assert val and [r.key for r in val] == [r.key for r in records if r.split == "val"]
    assert all(r.labels == ("cat",) and r.mask_labels == {1: ("cat",)} for r in val)


def test_segmentation_problems_are_named(tmp_path):
    make_segmentation(tmp_path)
    save(tmp_path / "masks/train/a.png", np.array([[0, 3]], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"masks/train/a\.png: value 3 has no name"):
        load_records(tmp_path)
    save(tmp_path / "masks/train/a.png", rgb(1))  # colour masks are not class values
    with pytest.raises(ValueError, match=r"masks/train/a\.png: a mask must have one channel"):
        load_records(tmp_path)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="no classes.txt"):
        load_records(tmp_path)


# --- Hugging Face datasets ---------------------------------------------------------------------


def test_datasets_dict(tmp_path):
    import datasets

    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}
    )
    train = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(rgb(v)) for v in (10, 20, 30)], "label": [0, 1, 0]},
        features=features,
    )
    val = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(rgb(v)) for v in (40, 50)], "label": [1, -1]},
        features=features,
    )
    root = tmp_path / "hf"
    datasets.DatasetDict({"validation": val, "train": train}).save_to_disk(str(root))

    records = load_records(root)
    assert [(r.image_id, r.split, r.key, r.labels) for r in records] == [
        (0, "train", "train/0", ("cat",)),
        (1, "train", "train/1", ("dog",)),
        (2, "train", "train/2", ("cat",)),
        (3, "val", "val/0", ("dog",)),  # "validation" is read as "val"
        (4, "val", "val/1", ()),  # -1 = no label
    ]
    assert records[3].path == f"{root}::val/0" and records[3].mask_path is None
    im = open_image(records[3])
    assert im.mode == "RGB" and np.asarray(im)[0, 0].tolist() == [40, 40, 40]
    # records survive pickling (e.g. to worker processes) and reopen the dataset there
    again = pickle.loads(pickle.dumps(load_records(root, ["val"])))
    assert [r.image_id for r in again] == [3, 4]
    assert np.asarray(open_image(again[1]))[0, 0].tolist() == [50, 50, 50]


def test_datasets_without_val_hold_out_val(tmp_path):
    import datasets

    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}
    )
    n = 60
    train = datasets.Dataset.from_dict(
        {
            "img": [Image.fromarray(rgb(v, (2, 2))) for v in range(n)],
            "label": [v % 2 for v in range(n)],
        },
        features=features,
    )
    root = tmp_path / "hf"
    datasets.DatasetDict({"train": train}).save_to_disk(str(root))
    records = load_records(root)
    want_val = [i for i in range(n) if hashed_val(f"train/{i}")]
    assert want_val and [r.image_id for r in records if r.split == "val"] == want_val
    assert [r.image_id for r in records] == list(range(n))  # carving does not renumber
    val = load_records(root, ["val"])
    assert [(r.image_id, r.key) for r in val] == [(i, f"train/{i}") for i in want_val]
    # the record still reads its own row
    assert np.asarray(open_image(val[0]))[0, 0, 0] == want_val[0]
    assert val[0].labels == (("cat", "dog")[want_val[0] % 2],)


def test_datasets_single_dataset_with_masks(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "annotation": datasets.Image(),
            "tags": datasets.List(datasets.ClassLabel(names=["indoor", "outdoor"])),
        }
    )
    masks = [np.array([[0, 1], [2, 2]], np.uint8), np.array([[255, 0], [0, 0]], np.uint8)]
    ds = datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(rgb(1, (2, 2))), Image.fromarray(rgb(2, (2, 2)))],
            "annotation": [Image.fromarray(m) for m in masks],
            "tags": [[1], [0, 1]],
        },
        features=features,
    )
    root = tmp_path / "seg"
    ds.save_to_disk(str(root))
    (root / "classes.txt").write_text("background\nsky\nroad\n")

    first, second = load_records(root)
    assert (first.split, first.key, second.key) == ("train", "train/0", "train/1")
    assert first.labels == ("outdoor", "road", "sky")
    assert first.mask_labels == {1: ("sky",), 2: ("road",)}
    assert second.labels == ("indoor", "outdoor") and second.mask_labels == {}
    assert first.mask_path == f"{root}::train/0/annotation"
    np.testing.assert_array_equal(open_mask(first), masks[0])
    np.testing.assert_array_equal(open_mask(second), masks[1])


# --- safe opening ------------------------------------------------------------------------------


def png_bytes(array):
    """PNG-encoded bytes of an array."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_header(width, height):
    """A valid PNG header declaring `width` x `height` RGB, followed by almost no pixel data."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def noise(size=(32, 32, 3)):
    """Random pixels, so that the encoded data is long enough to damage in the middle."""
    return np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)


def corrupt_png():
    """A PNG whose header is fine and whose compressed pixel data is overwritten with zeros."""
    data = bytearray(png_bytes(noise()))
    i = data.index(b"IDAT")
    data[i + 100 : i + 140] = bytes(40)
    return bytes(data)


BAD_FILES = {
    # name: (file name, bytes, max_pixels, expected start of the reason)
    "empty": ("a.png", b"", None, "empty file"),
    "text with an image suffix": ("a.jpg", b"hello, I am a text file\n", None, "not an image"),
    "damaged header": ("a.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, None, "corrupt header"),
    "damaged pixel data": ("a.png", corrupt_png(), None, "corrupt image data"),
    "truncated png": ("a.png", png_bytes(noise())[:600], None, "truncated file"),
    "truncated jpeg": ("a.jpg", None, None, "truncated file"),  # made in the test
    "32-bit int": ("a.tif", None, None, "32-bit or float"),  # made in the test
    "over max_pixels": ("a.png", png_bytes(rgb(1, (10, 10))), 99, "too large: 10x10"),
    # 81 MP declared, a few bytes of data: refused from the header, before any decoding
    # (decoding would have said "truncated")
    "huge header": ("a.png", png_header(9000, 9000), None, "too large: 9000x9000"),
    # 400 MP is over PIL's own bomb limit even when max_pixels allows it
    "decompression bomb": ("a.png", png_header(20000, 20000), 10**12, "too large: over PIL"),
    # 100 MP: PIL only warns (over its limit, under twice it); its limit refuses it all the same
    "over PIL's limit": ("a.png", png_header(10000, 10000), 10**12, "too large: 10000x10000"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_files_raise_with_their_reason(tmp_path, kind):
    name, data, max_pixels, reason = BAD_FILES[kind]
    if kind == "truncated jpeg":
        buf = io.BytesIO()
        Image.fromarray(noise()).save(buf, format="JPEG")
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
    if kind == "32-bit int":
        buf = io.BytesIO()
        Image.fromarray(np.full((4, 4), 70000, np.int32)).save(buf, format="TIFF")
        data = buf.getvalue()
    path = tmp_path / name
    path.write_bytes(data)
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    with pytest.raises(BadImage) as err:
        open_image(file_record(path), **kwargs)
    assert err.value.reason.startswith(reason), err.value.reason
    assert isinstance(err.value, ValueError)


def test_bad_file_reasons_are_distinct():
    kinds = {reason.split(":")[0] for _, _, _, reason in BAD_FILES.values()}
    assert len(kinds) == 7  # empty, not an image, 2 x corrupt, truncated, 32-bit, too large


def test_missing_file_is_bad(tmp_path):
    with pytest.raises(BadImage, match="file not found"):
        open_image(file_record(tmp_path / "gone.png"))


def test_truncated_images_are_not_loaded_leniently():
    # open_image relies on PIL raising for cut-off files; nothing here may switch that off
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


GOOD = {
    "grey L": (Image.fromarray(np.full((3, 5), 100, np.uint8)), (100, 100, 100)),
    "grey + alpha LA": (Image.new("LA", (5, 3), (100, 7)), (100, 100, 100)),
    "RGBA": (Image.new("RGBA", (5, 3), (1, 2, 3, 0)), (1, 2, 3)),
    "palette P": (palette_mask(np.zeros((3, 5))), (200, 10, 10)),
    "1-bit": (Image.new("1", (5, 3), 1), (255, 255, 255)),
}


@pytest.mark.parametrize("kind", list(GOOD))
def test_good_modes_open_as_rgb(tmp_path, kind):
    im, pixel = GOOD[kind]
    path = save(tmp_path / "a.png", im)
    out = open_image(file_record(path))
    assert out.mode == "RGB" and out.size == (5, 3)
    assert tuple(np.asarray(out)[1, 2]) == pixel


# --- converted modes: CMYK and 16-bit grey ------------------------------------------------------


def s15(x):
    return struct.pack(">i", round(x * 65536))


def cmyk_profile():
    """A minimal ICC v2 CMYK printer profile (CMYK -> Lab through a 2-point lut8 A2B0) whose
    cyan ink prints red: honouring it and ignoring it give visibly different colours."""

    def lab(c, m, y, k):
        if k:
            return (0, 0, 0)
        if c and not (m or y):
            return (54, 80, 67)  # sRGB red's Lab (D50)
        return (50, 0, 0) if (c or m or y) else (100, 0, 0)

    clut = b"".join(
        bytes([round(L * 255 / 100), a + 128, b + 128])
        for L, a, b in (lab(*corner) for corner in itertools.product((0, 1), repeat=4))
    )  # first input channel varies slowest, as ICC lays out a CLUT
    ident = bytes(range(256))
    matrix = b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    mft1 = b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + matrix + ident * 4 + clut + ident * 3
    d50 = s15(0.9642) + s15(1.0) + s15(0.8249)
    text = b"test CMYK\x00"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(78)
    tags = [(b"desc", desc), (b"wtpt", b"XYZ " + bytes(4) + d50), (b"A2B0", mft1)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for sig, data in tags:
        data += bytes(-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (
        struct.pack(">I", offset + len(body)) + bytes(4) + struct.pack(">I", 0x02100000)
        + b"prtrCMYKLab " + bytes(12) + b"acsp" + bytes(28) + d50 + bytes(48)
    )  # fmt: skip
    assert len(header) == 128
    return header + table + body


def cmyk_file(path, icc=None):
    """A CMYK JPEG: left half white paper, right half full cyan, right-bottom some of every ink."""
    arr = np.zeros((16, 16, 4), np.uint8)
    arr[:, 8:, 0] = 255
    arr[8:, 8:] = (40, 90, 160, 30)
    kwargs = {"icc_profile": icc} if icc else {}
    Image.fromarray(arr, "CMYK").save(path, format="JPEG", quality=100, **kwargs)
    return path


def test_cmyk_with_an_icc_profile_goes_to_srgb_through_it(tmp_path):
    icc = cmyk_profile()
    path = cmyk_file(tmp_path / "a.jpg", icc)
    im, how = read_image(file_record(path))
    assert how == CMYK_ICC and im.mode == "RGB" and im.size == (16, 16)
    # the independent conversion: ImageCms directly, from the file's own CMYK pixels
    src = Image.open(path)
    want = ImageCms.profileToProfile(
        src,
        ImageCms.ImageCmsProfile(io.BytesIO(icc)),
        ImageCms.createProfile("sRGB"),
        outputMode="RGB",
    )
    np.testing.assert_array_equal(np.asarray(im), np.asarray(want))
    got = np.asarray(im).astype(int)
    assert (np.abs(got[4, 2] - (255, 255, 255)) <= 2).all()  # paper is white
    assert (np.abs(got[4, 12] - (255, 0, 0)) <= 16).all()  # this profile's cyan ink is red
    assert (np.abs(got[4, 12] - (0, 255, 255)) > 200).all()  # not what the plain formula says


def test_cmyk_without_a_profile_gets_the_plain_conversion(tmp_path):
    path = cmyk_file(tmp_path / "a.jpg")
    im, how = read_image(file_record(path))
    assert how == CMYK_PLAIN
    cmyk = np.asarray(Image.open(path)).astype(float)
    c, k = cmyk[..., :3], cmyk[..., 3:]
    want = (255 - c) * (255 - k) / 255  # the textbook CMYK -> RGB, written out here
    np.testing.assert_allclose(np.asarray(im).astype(float), want, atol=1)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path, fmt):
    values = np.array(
        [[0, 1, 128, 129, 255, 256], [257, 385, 386, 40000, 65534, 65535]], dtype=np.uint16
    )
    path = save(tmp_path / f"a.{fmt.lower()}", values, fmt)
    im, how = read_image(file_record(path))
    assert how == GREY16 and im.mode == "RGB"
    want = np.round(values / 257).astype(np.uint8)  # 65535 -> 255, exact rescale
    np.testing.assert_array_equal(np.asarray(im), np.repeat(want[..., None], 3, axis=2))
    assert np.asarray(im)[1, 3, 0] == 156  # 40000 / 257, where PIL's convert gives 255


@pytest.mark.parametrize("kind", ["cmyk", "16-bit grey"])
def test_strict_refuses_what_it_would_convert(tmp_path, kind):
    if kind == "cmyk":
        path, reason = cmyk_file(tmp_path / "a.jpg", cmyk_profile()), "CMYK"
    else:
        path = save(tmp_path / "a.png", np.full((4, 4), 40000, np.uint16))
        reason = "16-bit grey"
    with pytest.raises(BadImage) as err:
        open_image(file_record(path), strict=True)
    assert err.value.reason.startswith(reason), err.value.reason
    assert read_image(file_record(path))[1] is not None  # converted by default
    # a plain RGB image is the same either way, and not listed as converted
    plain = save(tmp_path / "b.png", rgb(7))
    assert read_image(file_record(plain), strict=True)[1] is None


def test_open_image_on_the_shapes_world(tiny_world):
    records = load_records(tiny_world, ["val"])
    assert len(records) == 6 and len({r.key for r in records}) == 6
    r = records[0]
    assert r.path == tiny_world / r.key
    assert open_image(r).size == Image.open(r.path).size
    np.testing.assert_array_equal(open_mask(r), np.asarray(Image.open(r.mask_path)))
    assert set(np.unique(open_mask(r))) - {0} == set(r.mask_labels)


# --- load_records errors -----------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="image data directory not found: .*nowhere"):
        load_records(tmp_path / "nowhere")


def test_empty_directory(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train/readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images found in .*image files \(\.bmp"):
        load_records(tmp_path)


def test_unknown_split(tmp_path):
    save(tmp_path / "train/cat/a.png", rgb(1))
    save(tmp_path / "val/cat/b.png", rgb(1))
    with pytest.raises(
        ValueError, match=r"none of the splits \['tset'\] .* it has \['train', 'val'\]"
    ):
        load_records(tmp_path, ["tset"])
    # one split missing among several is fine: extract asks for train, val and test by default
    assert len(load_records(tmp_path, ["train", "val", "test"])) == 2


def test_open_image_from_many_threads(tmp_path):
    # extraction decodes in a thread pool: answers must not depend on what other threads open
    from concurrent.futures import ThreadPoolExecutor

    paths = []
    for i in range(24):
        if i % 3 == 0:
            paths.append(save(tmp_path / f"{i}.png", rgb(i)))
        elif i % 3 == 1:
            paths.append(tmp_path / f"{i}.png")
            paths[-1].write_bytes(png_header(9000, 9000))
        else:  # converted through its ICC profile: ImageCms from several threads at once
            paths.append(cmyk_file(tmp_path / f"{i}.jpg", cmyk_profile()))

    def outcome(path):
        try:
            return np.asarray(open_image(file_record(path)))[:, :, 0].tolist()
        except BadImage as e:
            return e.reason.split(":")[0]

    red = outcome(paths[2])  # one at a time
    assert red[4][12] > 230 and red[4][2] > 250
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(outcome, paths))
    assert got == [[rgb(i)[..., 0].tolist(), "too large", red][i % 3] for i in range(24)]


# --- orientation and mask shape ----------------------------------------------------------------


def test_exif_orientation_is_applied_as_pil_does(tmp_path):
    """A phone photo stored sideways (EXIF orientation 6) opens upright, as ImageOps shows it."""
    from PIL import ImageOps

    from saev_core.data import read_image

    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)  # a marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=100)
    image, _ = read_image(file_record(path))
    with Image.open(path) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert image.size == (4, 6)  # turned by 90 degrees
    np.testing.assert_array_equal(np.asarray(image), want)


def test_a_mask_of_another_aspect_ratio_is_refused(tmp_path):
    from saev_core.data import open_mask

    save(tmp_path / "a.png", rgb(5, (8, 8)))
    save(tmp_path / "half.png", np.zeros((4, 4), np.uint8))  # an exact scale: accepted
    save(tmp_path / "wide.png", np.zeros((8, 12), np.uint8))
    record = ImageRecord(0, "val", "a.png", tmp_path / "a.png", (), tmp_path / "half.png", {})
    assert open_mask(record).shape == (4, 4)
    with pytest.raises(BadImage, match=r"wide.png is 12x8 px but its image .*a.png is 8x8"):
        open_mask(dataclasses.replace(record, mask_path=tmp_path / "wide.png"))
