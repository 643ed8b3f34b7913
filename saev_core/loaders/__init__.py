"""Readers of activation shards: ordered, per image, and shuffled, all in background threads.

Ordered readers (`iter_ordered`, `iter_images`, `iter_image_batches`) go through the files in
manifest order; the shuffled one (`iter_shuffled`) cuts row groups into pieces of a few MiB,
visits the pieces of the whole set in a seeded random order and mixes rows across a window of
them; `sample_rows` draws a uniform sample of the whole set (the trainer's normalisation). All
read in background threads through bounded queues, so the caller's work (an SAE step, an
encode) overlaps reading and casting, and memory stays at a fixed number of row groups whatever
the size of the shard set.

What made them fast (bench/loader.py, 1M x 768 float16, 2 shared cores): the ordered readers
read row groups through a memory map in slices of a few MiB (a whole row group read into fresh
memory costs ~1 GB/s to touch, and pyarrow's allocator handed it back erratically once another
thread freed it). The shuffled reader skips pyarrow: `ShardWriter` stores the vectors
uncompressed and plain, one data page per row group, so a piece is a memory map of the file
(its pages read in by the reader thread) and a batch is gathered from the maps with one `take`
per piece, as fast as a gather from a raw `.npy` memmap. Casting float16 -> float32 runs with
torch in a thread of its own, and batch buffers are reused once the caller has let go of them.

- `common`: `TOKEN_CHOICES`, `SHUFFLE_ORDER`, the reading knobs, row groups, sliced reads, casts
  and the background thread.
- `ordered`: `iter_ordered`, `iter_images`, `iter_image_batches`.
- `pages`: Parquet page locations of `act`, for the memory map.
- `shuffled`: `iter_shuffled`, `sample_rows`.
"""

# ruff: noqa: F401  (re-exports: the public names of saev_core.loaders)
from .common import SHUFFLE_ORDER, TOKEN_CHOICES
from .ordered import iter_image_batches, iter_images, iter_ordered
from .shuffled import iter_shuffled, sample_rows
