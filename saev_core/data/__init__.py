"""Image sources: the records (id, key, split, labels, mask) that extraction reads, and safe opening.

`load_records(data_dir)` recognises four sources by what the directory holds:

1. The built-in `shapes` world: `images.csv` is present (layout in `saev_core/shapes/`).
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

Submodules (records -> folders, datasets -> layout -> images; never the other way):

- `images`: the constants, `BadImage`, `ImageRecord`, `open_image`, `read_image`, `open_mask`
  and the decoding behind them; `_DatasetSource`, which a record of a datasets source holds.
- `layout`: `held_out_split`, `is_held_out` and the split and folder helpers both kinds of
  source use.
- `folders`: the records of the shapes world, of class folders and of a segmentation folder.
- `datasets`: the records of a `datasets` save_to_disk directory.
- `records`: `load_records`, which tells the sources apart.
"""

# ruff: noqa: F401  (re-exports: the public names of saev_core.data)

from .images import (
    CMYK_ICC,
    CMYK_PLAIN,
    GREY16,
    SPLITS,
    VAL_FRACTION,
    BadImage,
    ImageRecord,
    open_image,
    open_mask,
    read_image,
)
from .layout import held_out_split
from .records import load_records
