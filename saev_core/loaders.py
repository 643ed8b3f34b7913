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
"""

from __future__ import annotations

import mmap
import os
import queue
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from saev_core.shards import Manifest, arrow_to_acts, read_manifest

TOKEN_CHOICES = ("all", "patches", "prefix")

# The version of `iter_shuffled`'s order for a given seed and shard set: bump it whenever a change
# here (`_PIECE_BYTES`, how pieces, windows or permutations are drawn) gives other batches. The
# train stage puts it in the checkpoint's fingerprint, since resuming skips the batches trained
# on before by their position in that order.
SHUFFLE_ORDER = 2

# Files are read through a memory map: it saves the copy into a read buffer (row groups read
# about 1.5x faster than with buffered reads). Shard files are never edited in place (written under
# a temporary name and renamed; DVC replaces, never truncates), so a mapped file cannot shrink
# under the reader.
_MEMORY_MAP = True

# Rows per slice when reading a row group (4096 x 768 float16 = 6 MiB): small allocations that
# pyarrow's allocator reuses, and for the ordered readers still in cache when cast or copied out.
_READ_ROWS = 4096

# Bytes of vectors per piece of a row group, the shuffled reader's unit (4 MiB: 2,730 vectors of
# width 768 in float16, about 14 ViT-B images). A window pools pieces drawn from all over the set,
# so a batch mixes many places even where each row group holds one class.
_PIECE_BYTES = 4 * 2**20

# Pieces are mapped with their pages populated (read and entered in the page table) by the
# reader thread, which releases the GIL meanwhile, so the batcher's gathers do not stop at page
# faults. Where MAP_POPULATE does not exist the batcher faults the pages in instead.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)

# Open files the process keeps besides the mapped pieces (its own, pyarrow's, torch's, MLflow's):
# the margin `_allow_open_files` leaves above the pieces.
_OTHER_FILES = 256

# Elements per torch cast call: just under torch's GRAIN_SIZE (32768), below which an op runs in
# the calling thread instead of waking an OpenMP team. On a shared 2-core machine the team made
# the cast 2-15x slower and erratic; one thread casts about 3.5-5 M vectors of width 768 a second.
_CAST_CHUNK = 32_000


def _check_tokens(tokens: str) -> None:
    if tokens not in TOKEN_CHOICES:
        raise ValueError(f"tokens must be 'all', 'patches' or 'prefix', got {tokens!r}")


def _keep_mask(toks: np.ndarray, tokens: str, n_prefix: int) -> np.ndarray | None:
    """Boolean mask of the rows the token policy keeps; None when it keeps them all."""
    if tokens == "all":
        return None
    return toks >= n_prefix if tokens == "patches" else toks < n_prefix


def _out_dtype(dtype: np.dtype | str | None, m: Manifest) -> np.dtype:
    """The dtype readers yield: `dtype`, or the stored one when `dtype` is None."""
    return m.dtype if dtype is None else np.dtype(dtype)


def _convert(x: np.ndarray, dtype: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
    """`x` cast to `dtype`, into `out` when given (else `x` itself if it has the dtype already).

    float16 -> float32 goes through torch: numpy's half conversion is scalar (1.1 M vectors/s of
    width 768 on these machines), torch's is vectorised (3.5-5 M/s in one thread), and the cast
    is the largest single cost of a float32 loader.
    """
    if out is None:
        if x.dtype == dtype:
            return x
        out = np.empty(x.shape, dtype)
    if x.dtype == np.float16 and out.dtype in (np.float32, np.float64) and out.flags.c_contiguous:
        import torch  # lazy: shards is imported by light CLI commands too

        src = torch.from_numpy(np.ascontiguousarray(x).reshape(-1))
        dst = torch.from_numpy(out.reshape(-1))
        for lo in range(0, len(src), _CAST_CHUNK):
            dst[lo : lo + _CAST_CHUNK].copy_(src[lo : lo + _CAST_CHUNK])
    else:
        np.copyto(out, x, casting="unsafe")
    return out


class _Recycler:
    """Buffers of one shape that are reused once nobody but this pool refers to them.

    Fresh memory costs about 1 GB/s to touch on these machines (STACK.md), more than the cast or
    copy that fills it. A buffer is handed out again only when this pool holds the last reference
    to it (its reference count says so; views of it and `torch.from_numpy` tensors count), so a
    caller that keeps what it was given is safe and simply gets fresh buffers from then on.
    """

    def __init__(self, shape: tuple[int, int], dtype: np.dtype, cap: int):
        self._shape, self._dtype, self._cap = shape, dtype, cap
        self._bufs: list[np.ndarray] = []
        probe = [object()]
        self._free_count = sys.getrefcount(probe[0])  # the list's reference + the call's

    def get(self, n_rows: int) -> np.ndarray:
        """A buffer view of `n_rows` rows (at most the pool's row count), contents undefined."""
        for i in range(len(self._bufs)):
            if sys.getrefcount(self._bufs[i]) == self._free_count:
                return self._bufs[i][:n_rows]
        buf = np.empty(self._shape, self._dtype)
        if len(self._bufs) < self._cap:
            self._bufs.append(buf)
        return buf[:n_rows]


@dataclass(frozen=True)
class _Group:
    """One row group of one file: where it is, how many rows it holds, and where its vectors
    are in the file (the `act` column chunk) if they can be mapped straight from it."""

    path: Path
    index: int
    n_rows: int
    act_offset: int = 0
    act_bytes: int = 0
    act_max_def: int = 0
    direct: bool = False
    """Uncompressed plain-encoded vectors with no dictionary: readable without pyarrow."""
    stat: tuple[int, int, int] = (0, 0, 0)
    """(inode, size, mtime ns) of the file when listed: a mapped file must still be that one."""


def _open_same(group: _Group, m: Manifest):
    """The group's file opened for reading, refused if it is not the file listed at the start."""
    try:
        f = open(group.path, "rb")  # noqa: SIM115 (the caller closes it)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"shard file {group.path} is listed in {m.path} but missing (deleted while reading?)"
        ) from None
    st = os.fstat(f.fileno())
    if (st.st_ino, st.st_size, st.st_mtime_ns) != group.stat:
        f.close()
        raise OSError(
            f"shard file {group.path} changed while it was being read (it is not the file "
            f"listed in {m.path} when this pass began)"
        )
    return f


def _act_column(meta: Any, path: Path, m: Manifest) -> int:
    """Index of the `act` leaf column: fixed-size binary of the manifest's vector width.

    Refused otherwise (another layout, e.g. a fixed-size list, or another width), naming the
    file: neither the mapped nor the pyarrow reading could make sense of it.
    """
    schema = meta.schema
    width = m.d_model * m.dtype.itemsize
    for j in range(len(schema)):
        desc = schema.column(j)
        if desc.path == "act" and desc.physical_type == "FIXED_LEN_BYTE_ARRAY":
            if desc.length != width:
                raise ValueError(
                    f"shard file {path}: vectors of {desc.length} bytes, but {m.path} says "
                    f"d_model {m.d_model} x {m.dtype} = {width} bytes"
                )
            return j
    acts = [schema.column(j) for j in range(len(schema)) if schema.column(j).path.startswith("act")]
    found = f"column {acts[0].path} of {acts[0].physical_type}" if acts else "no column `act`"
    raise ValueError(
        f"shard file {path}: expected a column `act` of fixed-size binary vectors "
        f"({width} bytes), found {found}: not a shard file ShardWriter wrote"
    )


def _act_chunk(meta: Any, g: int, j: int) -> dict[str, Any]:
    """Where row group `g`'s `act` column chunk (column `j`) lies, and whether it can be
    mapped directly."""
    schema = meta.schema
    col, desc = meta.row_group(g).column(j), schema.column(j)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    direct = (
        col.compression == "UNCOMPRESSED"
        and not col.has_dictionary_page
        and set(col.encodings) <= {"PLAIN", "RLE", "BIT_PACKED"}
        and desc.max_repetition_level == 0
        and desc.max_definition_level <= 1
    )
    return {
        "act_offset": int(start),
        "act_bytes": int(col.total_compressed_size),
        "act_max_def": int(desc.max_definition_level),
        "direct": bool(direct),
    }


def _row_groups(m: Manifest, layer: int, splits: Sequence[str] | None) -> list[_Group]:
    """Every row group of the layer's files, in manifest order, checked against the manifest."""
    groups = []
    for f in m.files(layer, splits):
        path = m.dir / f["path"]
        try:
            # stat first: a file swapped in after this is refused when mapped (`_open_same`)
            st = path.stat()
            meta = pq.read_metadata(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"shard file {path} is listed in {m.path} but missing; re-run extract or "
                "restore the shard set (dvc checkout)"
            ) from None
        except (OSError, pa.ArrowException) as e:
            raise OSError(f"cannot read shard file {path} (listed in {m.path}): {e}") from e
        if meta.num_rows != int(f["rows"]):
            raise ValueError(
                f"shard file {path} has {meta.num_rows} rows, {m.path} says {f['rows']}: "
                "the file changed after the manifest was written"
            )
        stat = (st.st_ino, st.st_size, st.st_mtime_ns)
        j = _act_column(meta, path, m)
        groups += [
            _Group(path, g, meta.row_group(g).num_rows, **_act_chunk(meta, g, j), stat=stat)
            for g in range(meta.num_row_groups)
        ]
    return groups


def _read_slices(
    group: _Group, m: Manifest, tokens: str, with_ids: bool
) -> Iterator[tuple[np.ndarray | None, np.ndarray | None, np.ndarray]]:
    """One row group's kept rows, in slices of up to `_READ_ROWS`: `(image_id, token, acts)`.

    `acts` is a read-only view of pyarrow's memory (a copy where tokens were dropped);
    `image_id` and `token` are None unless `with_ids`. Errors name the file.
    """
    columns = ["image_id", "token"] if with_ids else ["token"] if tokens != "all" else []
    n_read = 0
    try:
        # Opened per row group, not kept open: a shuffled epoch visits files in random order,
        # and the footer is small next to a row group.
        pf = pq.ParquetFile(group.path, memory_map=_MEMORY_MAP)
        for batch in pf.iter_batches(
            batch_size=_READ_ROWS,
            row_groups=[group.index],
            columns=[*columns, "act"],
            use_threads=False,
        ):
            n_read += batch.num_rows
            if batch.column("act").null_count:  # their slots hold whatever the writer left
                raise ValueError(
                    f"row group {group.index} of shard file {group.path} has "
                    f"{batch.column('act').null_count} null vectors: not a shard file "
                    "ShardWriter wrote"
                )
            acts = arrow_to_acts(batch.column("act"), m.dtype, m.d_model)
            ids = batch.column("image_id").to_numpy() if with_ids else None
            toks = batch.column("token").to_numpy() if columns else None
            keep = _keep_mask(toks, tokens, m.n_prefix_tokens)
            if keep is not None:
                acts, toks = acts[keep], toks[keep]
                ids = ids[keep] if with_ids else None
            yield ids, toks if with_ids else None, acts
    except FileNotFoundError:
        raise FileNotFoundError(
            f"shard file {group.path} is listed in {m.path} but missing (deleted while reading?)"
        ) from None
    except (OSError, pa.ArrowException) as e:
        raise OSError(f"cannot read row group {group.index} of shard file {group.path}: {e}") from e
    if n_read != group.n_rows:
        raise ValueError(
            f"row group {group.index} of {group.path} has {n_read} rows, expected "
            f"{group.n_rows}: the file changed after the manifest was written"
        )


def _read_group(
    group: _Group, m: Manifest, tokens: str, out: _Recycler
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row group's kept rows `(image_id, token, acts)`, acts cast into a buffer from `out`."""
    acts = out.get(group.n_rows)
    ids, toks = [], []
    n = 0
    for i, t, x in _read_slices(group, m, tokens, with_ids=True):
        _convert(x, acts.dtype, acts[n : n + len(x)])  # the slice is still in cache
        ids.append(i)
        toks.append(t)
        n += len(x)
    return np.concatenate(ids), np.concatenate(toks), acts[:n]


class _Background:
    """Runs a generator in a daemon thread and hands its items over through a bounded queue.

    At most `maxsize` items wait in the queue, plus the one the thread is making: that is what
    bounds a prefetching reader's memory. An exception in the thread is re-raised in the
    consumer. Iterating ends with `close()`, also when the consumer stops early (break, an
    exception, the generator collected), which stops and joins the thread.
    """

    _ITEM, _END, _ERROR = range(3)

    def __init__(self, gen: Iterator[Any], maxsize: int, name: str):
        self._gen = gen
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._gen:
                if not self._put((self._ITEM, item)):
                    return
            self._put((self._END, None))
        except BaseException as e:  # handed to the consumer, who re-raises it
            self._put((self._ERROR, e))
        finally:
            # Runs the generator's own `finally` (closing inner stages) in the thread running it.
            self._gen.close()

    def _put(self, msg: tuple[int, Any]) -> bool:
        """Put `msg` unless the consumer has stopped; False when it has."""
        while not self._stop.is_set():
            try:
                self._queue.put(msg, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                kind, item = self._queue.get()
                if kind == self._ITEM:
                    yield item
                elif kind == self._END:
                    return
                else:
                    raise item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the thread, wait for it, and drop whatever it had queued."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()


def _max_rows(groups: list[_Group]) -> int:
    return max((g.n_rows for g in groups), default=0)


def _ordered_groups(
    m: Manifest, groups: list[_Group], tokens: str, out: _Recycler
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    for group in groups:
        yield _read_group(group, m, tokens, out)


def iter_ordered(
    shard_dir: str | Path,
    layer: int,
    splits: Sequence[str] | None = None,
    tokens: str = "all",
    dtype: np.dtype | str | None = np.float32,
    prefetch_groups: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield `(image_id [n], token [n], acts [n, d])` one row group at a time, in file order.

    Row groups hold whole images, so every image's tokens arrive in one batch. `dtype=None`
    yields the stored dtype. A background thread reads up to `prefetch_groups` row groups ahead
    (0: read in the caller's thread). Each batch is the caller's to keep.
    """
    _check_tokens(tokens)
    m = read_manifest(shard_dir)
    groups = _row_groups(m, layer, splits)
    # buffers: the queued groups, the one being read, the caller's current and previous one
    out = _Recycler((_max_rows(groups), m.d_model), _out_dtype(dtype, m), prefetch_groups + 3)
    gen = _ordered_groups(m, groups, tokens, out)
    if prefetch_groups > 0:
        gen = iter(_Background(gen, prefetch_groups, "saev-ordered-reader"))
    yield from gen


def iter_images(
    shard_dir: str | Path,
    layer: int,
    splits: Sequence[str] | None = None,
    tokens: str = "all",
    dtype: np.dtype | str | None = np.float32,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield `(image_id, token [t], acts [t, d])` per image, all its (kept) tokens together."""
    for ids, toks, acts in iter_ordered(shard_dir, layer, splits, tokens, dtype):
        # an image's rows are contiguous in its row group (the writer tiles them per image)
        starts = np.flatnonzero(np.diff(ids)) + 1
        for lo, hi in zip(np.r_[0, starts], np.r_[starts, len(ids)], strict=True):
            yield int(ids[lo]), toks[lo:hi], acts[lo:hi]


def iter_image_batches(
    shard_dir: str | Path,
    layer: int,
    images_per_batch: int,
    splits: Sequence[str] | None = None,
    tokens: str = "all",
    dtype: np.dtype | str | None = np.float32,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield `(image_id [n], token [n], acts [n, d])` holding `images_per_batch` whole images.

    The batches `stats.compute_stats` takes (`StatsConfig.batch_images`), sized by images
    instead of by row group; the last batch may hold fewer images.
    """
    if images_per_batch < 1:
        raise ValueError(f"images_per_batch must be >= 1, got {images_per_batch}")
    pending: list[tuple[int, np.ndarray, np.ndarray]] = []
    for image in iter_images(shard_dir, layer, splits, tokens, dtype):
        pending.append(image)
        if len(pending) == images_per_batch:
            yield _stack_images(pending)
            pending = []
    if pending:
        yield _stack_images(pending)


def _stack_images(
    images: list[tuple[int, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.concatenate([np.full(len(t), i, np.int64) for i, t, _ in images])
    return ids, np.concatenate([t for _, t, _ in images]), np.concatenate([a for _, _, a in images])


# ---------------------------------------------------------------------------------------------
# Vectors mapped straight from the file
#
# The writer stores `act` uncompressed and plain-encoded (shards.py), so a data page of it is a
# small Thrift header, the definition levels and then the vectors, back to back. Mapping those
# bytes saves the copy pyarrow's decoder makes (half a shuffled loader's time, bench/loader.py),
# and lets a reader take a piece of a row group without reading the rest of it.


def _varint(b: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = b[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _thrift_skip(b: bytes, i: int, kind: int) -> int:
    """Index after one Thrift compact value of type `kind` starting at `b[i]`."""
    if kind in (1, 2):  # booleans: the value is in the type (or one byte in a list)
        return i
    if kind == 3:
        return i + 1
    if kind in (4, 5, 6):
        return _varint(b, i)[1]
    if kind == 7:
        return i + 8
    if kind == 8:
        n, i = _varint(b, i)
        return i + n
    if kind in (9, 10):
        head = b[i]
        n, elem, i = head >> 4, head & 0x0F, i + 1
        if n == 15:
            n, i = _varint(b, i)
        for _ in range(n):
            i = i + 1 if elem in (1, 2) else _thrift_skip(b, i, elem)
        return i
    if kind == 11:
        n, i = _varint(b, i)
        if n:
            kinds, i = b[i], i + 1
            for _ in range(n):
                i = _thrift_skip(b, _thrift_skip(b, i, kinds >> 4), kinds & 0x0F)
        return i
    if kind == 12:
        return _thrift_struct(b, i)[1]
    raise ValueError(f"unknown Thrift compact type {kind}")


def _thrift_struct(b: bytes, i: int) -> tuple[dict[int, Any], int]:
    """A Thrift compact struct at `b[i]`: {field id: int, bool or nested struct}, and its end.

    Only what a Parquet page header needs: integers, booleans and structs are kept, anything
    else is skipped.
    """
    fields: dict[int, Any] = {}
    fid = 0
    while True:
        head = b[i]
        i += 1
        if head == 0:
            return fields, i
        kind, delta = head & 0x0F, head >> 4
        if delta:
            fid += delta
        else:
            v, i = _varint(b, i)
            fid = (v >> 1) ^ -(v & 1)
        if kind in (4, 5, 6):
            v, i = _varint(b, i)
            fields[fid] = (v >> 1) ^ -(v & 1)
        elif kind in (1, 2):
            fields[fid] = kind == 1
        elif kind == 12:
            fields[fid], i = _thrift_struct(b, i)
        else:
            i = _thrift_skip(b, i, kind)


def _act_runs(group: _Group, m: Manifest) -> list[tuple[int, int, int]] | None:
    """`(file offset, first row, rows)` of each data page of the group's vectors, or None when a
    page is not plain vectors without nulls (then the group is read through pyarrow)."""
    try:
        return _parse_runs(group, m)
    except (IndexError, ValueError, KeyError) as e:
        raise OSError(
            f"cannot read the page headers of row group {group.index} of shard file "
            f"{group.path}: {e!r} (is it still the file listed in {m.path}?)"
        ) from e


def _parse_runs(group: _Group, m: Manifest) -> list[tuple[int, int, int]] | None:
    width = m.d_model * m.dtype.itemsize
    runs: list[tuple[int, int, int]] = []
    row = 0
    with _open_same(group, m) as f:
        fd = f.fileno()
        pos, end = group.act_offset, group.act_offset + group.act_bytes
        while pos < end:
            head = os.pread(fd, 1024, pos)
            try:
                page, n = _thrift_struct(head, 0)
            except IndexError:  # a header longer than 1 KiB (statistics): read more
                page, n = _thrift_struct(os.pread(fd, 1 << 20, pos), 0)
            data, size = pos + n, page.get(3, -1)
            if page.get(1) == 0:  # DATA_PAGE
                h = page.get(5, {})
                n_values, encoding = h.get(1, -1), h.get(2, -1)
                levels = 0
                if group.act_max_def:
                    if h.get(3) != 3:  # levels not RLE (BIT_PACKED: no length prefix)
                        return None
                    levels = 4 + int.from_bytes(os.pread(fd, 4, data), "little")
            elif page.get(1) == 3:  # DATA_PAGE_V2
                h = page.get(8, {})
                n_values, encoding = h.get(1, -1), h.get(4, -1)
                levels = h.get(5, 0) + h.get(6, 0)
                if h.get(2, 0):
                    return None
            else:
                return None
            if encoding != 0 or size - levels != n_values * width:  # not PLAIN, or nulls
                return None
            runs.append((data + levels, row, n_values))
            row += n_values
            pos = data + size
    return runs if row == group.n_rows else None


def _map_rows(
    group: _Group,
    runs: list[tuple[int, int, int]],
    start: int,
    stop: int,
    m: Manifest,
    populate: bool = True,
) -> list[np.ndarray]:
    """Rows `start:stop` of the group as read-only byte arrays [n, d x itemsize] over a memory
    map of the file.

    One map per call, so its pages leave this process once the arrays are dropped; `populate`
    reads them all in now (`_MAP_FLAGS`), else only the pages touched later are read.
    """
    width = m.d_model * m.dtype.itemsize
    sel = [
        (off + (max(start, r0) - r0) * width, min(stop, r0 + n) - max(start, r0))
        for off, r0, n in runs
        if r0 < stop and r0 + n > start
    ]
    lo, hi = sel[0][0], sel[-1][0] + sel[-1][1] * width
    base = lo - lo % mmap.ALLOCATIONGRANULARITY
    try:
        with _open_same(group, m) as f:
            mm = mmap.mmap(
                f.fileno(),
                hi - base,
                flags=_MAP_FLAGS if populate else mmap.MAP_SHARED,
                prot=mmap.PROT_READ,
                offset=base,
            )
    except ValueError as e:  # ValueError: the file is shorter than its metadata says
        raise OSError(
            f"cannot map row group {group.index} of shard file {group.path}: {e} "
            "(did the file change after the manifest was written?)"
        ) from e
    # Bytes, not m.dtype: the vectors start wherever the page header ends, often at an odd
    # address, and numpy copies misaligned float16 rows element by element (30x slower).
    return [
        np.frombuffer(mm, np.uint8, count=n * width, offset=off - base).reshape(n, width)
        for off, n in sel
    ]


def _allow_open_files(n_maps: int) -> None:
    """Make sure this process may hold `n_maps` memory maps open at once, raising its soft
    limit on open files (up to the hard one) if it must.

    Python's `mmap` (before 3.13) keeps a duplicate of the file's descriptor for as long as the
    map lives, so every mapped piece in the shuffled reader's window and queue is an open file:
    `buffer_groups + prefetch_groups` row groups of pieces, which passes a common soft limit of
    1,024 with large row groups or small pieces. Refused with what to change when the hard
    limit does not allow it, instead of "Too many open files" halfway through an epoch.
    """
    try:
        import resource
    except ImportError:  # not Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = _OTHER_FILES
    need = n_maps + open_now + _OTHER_FILES
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard == resource.RLIM_INFINITY or hard >= need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
            return
        except (OSError, ValueError):  # e.g. macOS caps the soft limit below an infinite hard one
            pass
    raise OSError(
        f"the shuffled reader keeps up to {n_maps} pieces of row groups mapped, each an open "
        f"file, and this process may open only {soft} files (hard limit {hard}): lower "
        "buffer_groups or prefetch_groups, raise piece_rows, or raise the limit (ulimit -n)"
    )


@dataclass(frozen=True)
class _Piece:
    """Rows `start:stop` of row group `group` (an index into the epoch's group list)."""

    group: int
    start: int
    stop: int


def _piece_rows(m: Manifest, piece_rows: int | None) -> int:
    if piece_rows is None:
        return max(1, _PIECE_BYTES // (m.d_model * m.dtype.itemsize))
    if piece_rows < 1:
        raise ValueError(f"piece_rows must be >= 1, got {piece_rows}")
    return piece_rows


def _pieces(groups: list[_Group], piece_rows: int) -> list[_Piece]:
    """Every group cut into pieces of `piece_rows` rows; a group pyarrow must read stays whole."""
    out = []
    for i, g in enumerate(groups):
        step = piece_rows if g.direct else max(g.n_rows, 1)
        out += [_Piece(i, a, min(a + step, g.n_rows)) for a in range(0, g.n_rows, step)]
    return out


_Part = tuple[np.ndarray, np.ndarray | None]
"""Rows of a pool: an array [n, d] (or its bytes) and the indices of its kept rows (None: all)."""


class _PieceReader:
    """Reads pieces of one epoch's row groups as parts of a pool (`_Part`s), stored dtype.

    Direct groups are mapped (`_map_rows`, page runs parsed once per group); others are read
    whole through pyarrow. Token policies keep rows by the token layout the writer tiles per
    image (`Manifest.written_tokens`), checked once per group against its token column.
    """

    def __init__(self, m: Manifest, groups: list[_Group], tokens: str, populate: bool = True):
        self.m, self.groups, self.tokens, self.populate = m, groups, tokens, populate
        self._runs: dict[int, list[tuple[int, int, int]] | None] = {}
        self._tiled: set[tuple[Path, int]] = set()  # groups whose token column was checked
        written = np.asarray(m.written_tokens)
        self._written = written
        self._keep_t = _keep_mask(written, tokens, m.n_prefix_tokens)

    def kept(self, group: _Group, start: int, stop: int) -> np.ndarray | None:
        """Indices (from `start`) of the rows in `start:stop` the token policy keeps."""
        if self._keep_t is None:
            return None
        t = len(self._keep_t)
        if group.n_rows % t:
            raise ValueError(
                f"row group {group.index} of {group.path} has {group.n_rows} rows, not a "
                f"multiple of the {t} tokens per image in {self.m.path}"
            )
        if (group.path, group.index) not in self._tiled:
            self._check_tiled(group)
        rows = np.arange(start, stop)
        return np.flatnonzero(self._keep_t[rows % t])

    def _check_tiled(self, group: _Group) -> None:
        try:
            pf = pq.ParquetFile(group.path, memory_map=_MEMORY_MAP)
            toks = pf.read_row_group(group.index, columns=["token"]).column(0).to_numpy()
        except (OSError, pa.ArrowException) as e:
            raise OSError(f"cannot read row group {group.index} of {group.path}: {e}") from e
        if not np.array_equal(toks, np.tile(self._written, len(toks) // len(self._written))):
            raise ValueError(
                f"row group {group.index} of {group.path} does not hold whole images with the "
                f"tokens {self.m.path} lists, in order: not a shard file ShardWriter wrote"
            )
        self._tiled.add((group.path, group.index))

    def read(self, piece: _Piece) -> list[_Part]:
        group = self.groups[piece.group]
        runs = None
        if group.direct:
            if piece.group not in self._runs:
                self._runs[piece.group] = _act_runs(group, self.m)
            runs = self._runs[piece.group]
        if runs is None:  # through pyarrow: the whole group, then the piece's rows
            acts = [x for _, _, x in _read_slices(group, self.m, "all", with_ids=False)]
            whole = acts[0] if len(acts) == 1 else np.concatenate(acts)
            arrays = [whole[piece.start : piece.stop]]
            if piece.stop - piece.start < len(whole):
                # a copy: a view would keep the whole group alive with every piece of it in
                # the window (a group mapped at first whose pages turned out not plain)
                arrays = [arrays[0].copy()]
        else:
            arrays = _map_rows(group, runs, piece.start, piece.stop, self.m, self.populate)
        keep = self.kept(group, piece.start, piece.stop)
        if keep is None:
            return [(a, None) for a in arrays]
        parts, lo = [], 0
        for a in arrays:
            k = keep[(keep >= lo) & (keep < lo + len(a))] - lo
            if len(k):
                parts.append((a, k))
            lo += len(a)
        return parts


def _slots(piece: _Piece, piece_rows: int) -> int:
    """Places a piece takes in the reader's queue and the batcher's window: 1 for a mapped
    piece, as many as pieces of `piece_rows` it holds for a group read whole by pyarrow, so that
    both hold a bounded number of rows whatever the layout."""
    return max(1, -(-(piece.stop - piece.start) // piece_rows))


def _read_shuffled(
    reader: _PieceReader, pieces: list[_Piece], order: np.ndarray, piece_rows: int
) -> Iterator[list[_Part]]:
    """The reader stage: each piece's parts, in `order`, each followed by empty fillers for the
    further `_slots` it takes. Mapping is cheap; the pages are touched (read) only when the
    batcher gathers from them."""
    for i in order:
        yield reader.read(pieces[i])
        for _ in range(_slots(pieces[i], piece_rows) - 1):
            yield []


def _gather(parts: list[_Part], offsets: np.ndarray, idx: np.ndarray, out: np.ndarray):
    """`out` = rows `idx` of `parts` seen as one pool (`offsets`: where each part starts),
    grouped by part: each part's rows (in their order in `idx`) fill one stretch of `out`, in
    one `take` straight from the part (a map of the file, mostly), with no copy in between."""
    which = np.searchsorted(offsets, idx, side="right") - 1
    order = np.argsort(which, kind="stable")
    cuts = np.searchsorted(which[order], np.arange(len(parts) + 1))
    dst = _as_bytes(out)
    for k in np.flatnonzero(np.diff(cuts)):
        a, rows = parts[k]
        local = idx[order[cuts[k] : cuts[k + 1]]] - offsets[k]
        local = local if rows is None else rows[local]
        # mode="clip": no checking pass over the indices (they are in range by construction)
        np.take(_as_bytes(a), local, axis=0, out=dst[cuts[k] : cuts[k + 1]], mode="clip")
    return out


def _as_bytes(a: np.ndarray) -> np.ndarray:
    """A C-contiguous [n, d] array seen as [n, d x itemsize] bytes (no copy)."""
    return a if a.dtype == np.uint8 else a.view(np.uint8)


def _part_len(part: _Part) -> int:
    return len(part[0]) if part[1] is None else len(part[1])


def _shuffle_batches(
    reader: _Background,
    n_pieces: int,
    per_window: int,
    d_model: int,
    stored: np.dtype,
    batch_size: int,
    drop_last: bool,
    rng: np.random.Generator,
    prefetch_batches: int,
) -> Iterator[np.ndarray]:
    """The batching stage: pool `per_window` pieces, permute their rows, cut batches.

    A batch holds the rows of one slice of the permutation, grouped by the stretch of a file
    (part) they come from, parts in window order (random), rows within a part in the
    permutation's order: so each part is copied into the batch in one go. The rows left after a
    window's last full batch (fewer than `batch_size`) are copied out and join the next window's
    pool, so every row is yielded once and every batch but the last is full. Only this stage
    draws from `rng`, in a fixed sequence, so the order depends on the seed alone, never on
    thread timing. Batches are in the stored dtype.
    """
    pieces = iter(reader)
    # batch buffers: those queued, the next stage's current and previous one, the one filled
    batches = _Recycler((batch_size, d_model), stored, cap=prefetch_batches + 3)
    carry = np.empty((0, d_model), stored)
    n_left = n_pieces
    try:
        while n_left:
            take = min(per_window, n_left)
            n_left -= take
            window: list[_Part] = [(carry, None)]
            for _ in range(take):
                window += next(pieces)
            offsets = np.cumsum([0] + [_part_len(p) for p in window])
            perm = rng.permutation(int(offsets[-1]))
            last = n_left == 0
            n_out = len(perm) if last and not drop_last else len(perm) // batch_size * batch_size
            for lo in range(0, n_out, batch_size):
                idx = perm[lo : lo + batch_size]
                out = batches.get(len(idx))
                yield _gather(window, offsets, idx, out)
                del out  # hold no reference while the next stage has the batch
            rest = perm[n_out:] if not last else perm[:0]
            carry = _gather(window, offsets, rest, np.empty((len(rest), d_model), stored))
            del window  # let the window's maps go before the next ones are pooled
    finally:
        reader.close()


def _cast_batches(
    batcher: _Background, dtype: np.dtype, shape: tuple[int, int], prefetch_batches: int
) -> Iterator[np.ndarray]:
    """The casting stage: each batch cast to `dtype`, in its own thread.

    Gathering and casting each cost about as much as reading (bench/loader.py), so the cast gets
    a thread of its own rather than doubling the batcher's work.
    """
    batches = _Recycler(shape, dtype, cap=prefetch_batches + 3)
    try:
        for x in batcher:
            out = batches.get(len(x))
            yield _convert(x, dtype, out)
            del out
    finally:
        batcher.close()


def iter_shuffled(
    shard_dir: str | Path,
    layer: int,
    batch_size: int,
    seed: int,
    splits: Sequence[str] | None = None,
    tokens: str = "all",
    buffer_groups: int = 8,
    drop_last: bool = False,
    dtype: np.dtype | str | None = np.float32,
    prefetch_groups: int | None = None,
    prefetch_batches: int = 4,
    piece_rows: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield batches [batch_size, d] in a seeded shuffled order, each vector exactly once.

    Every row group is cut into pieces of `piece_rows` rows (default: 4 MiB of vectors) and the
    pieces of the whole set are visited in a random order; a window of `buffer_groups` row
    groups' worth of pieces at a time is pooled and its rows permuted, so a batch mixes rows from
    up to that many places anywhere in the set (dozens of row groups where a row group is a few
    pieces), not just a few row groups. A batch's rows come grouped by the piece (file stretch)
    they were read from, pieces in a random order and rows within each in a random order. The
    order is a function of `seed` alone (pass `seed + epoch` for a new order each epoch).

    Vectors are mapped straight from the files where the writer stored them plainly (every
    shard set `ShardWriter` writes), else read through pyarrow. Background threads work while
    the caller trains: one maps pieces (reading their pages in), up to `prefetch_groups` row
    groups' worth ahead (default `buffer_groups`); one gathers batches and, unless `dtype` is the
    stored one, one casts them, each up to `prefetch_batches` ahead. Memory: at most
    `buffer_groups + prefetch_groups + 1` row groups' worth of mapped or read rows in the stored
    dtype plus `2 x (prefetch_batches + 3)` batches, whatever the size of the shard set. `dtype`
    is what batches hold (float32 for the trainer; None: the stored dtype, e.g. to cast on the
    GPU instead). Each batch is the caller's to keep; its buffer is reused only once the caller
    has let go of it.
    """
    _check_tokens(tokens)
    if batch_size < 1 or buffer_groups < 1 or prefetch_batches < 1:
        raise ValueError(
            f"batch_size, buffer_groups and prefetch_batches must be >= 1, got "
            f"{batch_size}, {buffer_groups}, {prefetch_batches}"
        )
    m = read_manifest(shard_dir)
    groups = _row_groups(m, layer, splits)
    rows = _piece_rows(m, piece_rows)
    pieces = _pieces(groups, rows)
    per_group = max(1, -(-_max_rows(groups) // rows))  # pieces in the largest direct row group
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pieces))
    prefetch_groups = buffer_groups if prefetch_groups is None else max(1, prefetch_groups)
    out_dtype = _out_dtype(dtype, m)
    reader = _PieceReader(m, groups, tokens)
    if any(g.direct for g in groups):
        # mapped pieces alive at once: the window, the reader's queue, one being read, and one
        # each in the hand-over between stages
        _allow_open_files((buffer_groups + prefetch_groups) * per_group + 3)
    stages = [
        _Background(
            _read_shuffled(reader, pieces, order, rows),
            prefetch_groups * per_group,
            "saev-reader",
        )
    ]
    try:
        batches = _shuffle_batches(
            stages[-1],
            sum(_slots(p, rows) for p in pieces),
            buffer_groups * per_group,
            m.d_model,
            m.dtype,
            batch_size,
            drop_last,
            rng,
            prefetch_batches,
        )
        stages.append(_Background(batches, prefetch_batches, "saev-batcher"))
        if out_dtype != m.dtype:
            cast = _cast_batches(stages[-1], out_dtype, (batch_size, m.d_model), prefetch_batches)
            stages.append(_Background(cast, prefetch_batches, "saev-caster"))
        yield from stages[-1]
    finally:
        for stage in reversed(stages):  # each also closes the one before it; this covers
            stage.close()  # a stage that failed to start


def sample_rows(
    shard_dir: str | Path,
    layer: int,
    n: int,
    seed: int,
    splits: Sequence[str] | None = None,
    tokens: str = "all",
    dtype: np.dtype | str | None = np.float32,
) -> np.ndarray:
    """`min(n, rows)` vectors [n, d] drawn uniformly without replacement from the whole set.

    What the trainer fits the input normalisation and the geometric-median `b_dec` on: the first
    batches of a shuffled pass come from the few row groups of its first window, which need not
    look like the set (a class-sorted source, a set extended with other images). The rows come in
    a random order (a function of `seed`), so any prefix of them is a uniform sample too. Row
    groups are read one at a time (mapped, touching only the pages of the rows drawn), so memory
    is one row group plus the sample.
    """
    _check_tokens(tokens)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    m = read_manifest(shard_dir)
    groups = _row_groups(m, layer, splits)
    reader = _PieceReader(m, groups, tokens, populate=False)  # touch only the rows drawn
    kept = [
        g.n_rows if reader._keep_t is None else len(reader.kept(g, 0, g.n_rows)) for g in groups
    ]
    starts = np.cumsum([0] + kept)
    total = int(starts[-1])
    if total == 0:
        raise ValueError(f"no {tokens} tokens of layer {layer} in {shard_dir} (splits {splits})")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(total, size=min(n, total), replace=False)  # in a random order
    order = np.argsort(chosen)
    srt = chosen[order]
    out = np.empty((len(chosen), m.d_model), _out_dtype(dtype, m))
    cuts = np.searchsorted(srt, starts)
    for i in np.flatnonzero(np.diff(cuts)):
        parts = reader.read(_Piece(i, 0, groups[i].n_rows))
        offsets = np.cumsum([0] + [_part_len(p) for p in parts])
        local = srt[cuts[i] : cuts[i + 1]] - starts[i]
        rows = np.empty((len(local), m.d_model), m.dtype)
        _gather(parts, offsets, local, rows)
        del parts
        out[order[cuts[i] : cuts[i + 1]]] = rows
    return out
