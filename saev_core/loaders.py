"""Readers of activation shards: ordered, per image, and shuffled, all in background threads.

Ordered readers (`iter_ordered`, `iter_images`, `iter_image_batches`) go through the files in
manifest order; the shuffled one (`iter_shuffled`) visits row groups in a seeded random order
and mixes rows across a window of them. Both read in background threads through bounded
queues, so the caller's work (an SAE step, an encode) overlaps reading and casting, and memory
stays at a fixed number of row groups whatever the size of the shard set.

What made them fast (bench/loader.py, 1M x 768 float16, 2 shared cores): reading row groups
through a memory map in slices of a few MiB (a whole row group read into fresh memory costs
~1 GB/s to touch, and pyarrow's allocator handed it back erratically once another thread freed
it), gathering batches straight from those slices, casting float16 -> float32 with torch in a
thread of its own, and reusing batch buffers once the caller has let go of them.
"""

from __future__ import annotations

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

# Files are read through a memory map: it saves the copy into a read buffer (row groups read
# about 1.5x faster than with buffered reads). Shard files are never edited in place (written under
# a temporary name and renamed; DVC replaces, never truncates), so a mapped file cannot shrink
# under the reader.
_MEMORY_MAP = True

# Rows per slice when reading a row group (4096 x 768 float16 = 6 MiB): small allocations that
# pyarrow's allocator reuses, and for the ordered readers still in cache when cast or copied out.
_READ_ROWS = 4096

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
    """One row group of one file: where it is and how many rows it holds."""

    path: Path
    index: int
    n_rows: int


def _row_groups(m: Manifest, layer: int, splits: Sequence[str] | None) -> list[_Group]:
    """Every row group of the layer's files, in manifest order, checked against the manifest."""
    groups = []
    for f in m.files(layer, splits):
        path = m.dir / f["path"]
        try:
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
        groups += [_Group(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
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


def _read_shuffled(
    m: Manifest, groups: list[_Group], order: np.ndarray, tokens: str
) -> Iterator[list[np.ndarray]]:
    """The reader stage: each row group's kept rows as slices [n, d] (stored dtype), in `order`.

    The slices stay in pyarrow's memory, uncopied: small allocations that its allocator reuses,
    where whole row groups read into fresh memory were slow to touch and erratic once another
    thread freed them.
    """
    for i in order:
        yield [acts for _, _, acts in _read_slices(groups[i], m, tokens, with_ids=False)]


def _gather(parts: list[np.ndarray], offsets: np.ndarray, idx: np.ndarray, out: np.ndarray):
    """`out` = rows `idx` of `parts` seen as one pool (`offsets`: where each part starts)."""
    which = np.searchsorted(offsets, idx, side="right") - 1
    by_part = np.argsort(which, kind="stable")
    cuts = np.searchsorted(which[by_part], np.arange(len(parts) + 1))
    for k in np.flatnonzero(np.diff(cuts)):
        pos = by_part[cuts[k] : cuts[k + 1]]
        out[pos] = parts[k][idx[pos] - offsets[k]]
    return out


def _shuffle_batches(
    reader: _Background,
    n_groups: int,
    d_model: int,
    stored: np.dtype,
    batch_size: int,
    buffer_groups: int,
    drop_last: bool,
    rng: np.random.Generator,
    prefetch_batches: int,
) -> Iterator[np.ndarray]:
    """The batching stage: pool `buffer_groups` row groups, permute their rows, cut batches.

    The rows left after a window's last full batch (fewer than `batch_size`) are copied out and
    join the next window's pool, so every row is yielded once and every batch but the last is
    full. Only this stage draws from `rng`, in a fixed sequence, so the order depends on the seed
    alone, never on thread timing. Batches are in the stored dtype.
    """
    groups = iter(reader)
    # batch buffers: those queued, the next stage's current and previous one, the one filled
    batches = _Recycler((batch_size, d_model), stored, cap=prefetch_batches + 3)
    carry = np.empty((0, d_model), stored)
    n_left = n_groups
    try:
        while n_left:
            take = min(buffer_groups, n_left)
            n_left -= take
            window = [carry] + [part for _ in range(take) for part in next(groups)]
            offsets = np.cumsum([0] + [len(a) for a in window])
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
            del window  # let the window's row groups go before the next ones are pooled
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
) -> Iterator[np.ndarray]:
    """Yield batches [batch_size, d] in a seeded shuffled order, each vector exactly once.

    Row groups are visited in a random order; `buffer_groups` of them at a time are pooled and
    their rows permuted, so a batch mixes rows of up to `buffer_groups + 1` row groups. The order
    is a function of `seed` alone (pass `seed + epoch` for a new order each epoch).

    Background threads work while the caller trains: one reads row groups, up to
    `prefetch_groups` ahead (default `buffer_groups`, so the next window is read while this one
    is cut into batches); one gathers batches and, unless `dtype` is the stored one, one casts
    them, each up to `prefetch_batches` ahead. Memory: at most `buffer_groups + prefetch_groups
    + 3` row groups in the stored dtype plus `2 x (prefetch_batches + 3)` batches, whatever the
    size of the shard set. `dtype` is what batches hold (float32 for the trainer; None: the
    stored dtype, e.g. to cast on the GPU instead). Each batch is the caller's to keep; its
    buffer is reused only once the caller has let go of it.
    """
    _check_tokens(tokens)
    if batch_size < 1 or buffer_groups < 1 or prefetch_batches < 1:
        raise ValueError(
            f"batch_size, buffer_groups and prefetch_batches must be >= 1, got "
            f"{batch_size}, {buffer_groups}, {prefetch_batches}"
        )
    m = read_manifest(shard_dir)
    groups = _row_groups(m, layer, splits)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    prefetch_groups = buffer_groups if prefetch_groups is None else max(1, prefetch_groups)
    out_dtype = _out_dtype(dtype, m)
    stages = [_Background(_read_shuffled(m, groups, order, tokens), prefetch_groups, "saev-reader")]
    try:
        batches = _shuffle_batches(
            stages[-1],
            len(groups),
            m.d_model,
            m.dtype,
            batch_size,
            buffer_groups,
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
