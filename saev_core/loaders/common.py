"""Shared parts of the shard readers: token choices, the shuffle-order version, reading knobs,
row groups, sliced reads through a memory map, dtype conversion and the background thread.
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

from saev_core.shards import Manifest, arrow_to_acts

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
