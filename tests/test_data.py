"""Image sources and safe opening: every source yields the right records; bad files are refused."""

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from saev_core.data import BadImage, ImageRecord, load_records, open_image, open_mask


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


def test_folder_without_splits_is_train(tmp_path):
    save(tmp_path / "cat/a.png", rgb(1))
    save(tmp_path / "loose.png", rgb(2))  # no class folder: no label
    records = load_records(tmp_path)
    assert [(r.split, r.key, r.labels) for r in records] == [
        ("train", "cat/a.png", ("cat",)),
        ("train", "loose.png", ()),
    ]


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


def cmyk_jpeg():
    """A CMYK JPEG (as print workflows write them)."""
    buf = io.BytesIO()
    Image.new("CMYK", (4, 4), (0, 255, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


BAD_FILES = {
    # name: (file name, bytes, max_pixels, expected start of the reason)
    "empty": ("a.png", b"", None, "empty file"),
    "text with an image suffix": ("a.jpg", b"hello, I am a text file\n", None, "not an image"),
    "damaged header": ("a.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, None, "corrupt header"),
    "damaged pixel data": ("a.png", corrupt_png(), None, "corrupt image data"),
    "truncated png": ("a.png", png_bytes(noise())[:600], None, "truncated file"),
    "truncated jpeg": ("a.jpg", None, None, "truncated file"),  # made in the test
    "cmyk": ("a.jpg", cmyk_jpeg(), None, "CMYK"),
    "16-bit grey": ("a.png", png_bytes(np.full((4, 4), 40000, np.uint16)), None, "16-bit"),
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
    path = tmp_path / name
    path.write_bytes(data)
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    with pytest.raises(BadImage) as err:
        open_image(file_record(path), **kwargs)
    assert err.value.reason.startswith(reason), err.value.reason
    assert isinstance(err.value, ValueError)


def test_bad_file_reasons_are_distinct():
    kinds = {reason.split(":")[0] for _, _, _, reason in BAD_FILES.values()}
    assert len(kinds) == 8  # empty, not an image, 2 x corrupt, truncated, CMYK, 16-bit, too large


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
        else:
            paths.append(tmp_path / f"{i}.jpg")
            paths[-1].write_bytes(cmyk_jpeg())

    def outcome(path):
        try:
            return int(np.asarray(open_image(file_record(path)))[0, 0, 0])
        except BadImage as e:
            return e.reason.split(":")[0]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(outcome, paths))
    assert got == [[i, "too large", "CMYK colour"][i % 3] for i in range(24)]
