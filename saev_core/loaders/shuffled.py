"""The shuffled reader (`iter_shuffled`) and the uniform sample of a shard set (`sample_rows`).

Row groups are cut into pieces of a few MiB (`_PIECE_BYTES`); the pieces of the whole set are
visited in a seeded random order and rows mixed across a window of them, gathered from memory maps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from saev_core.loaders.common import (
    _MEMORY_MAP,
    _PIECE_BYTES,
    _Background,
    _check_tokens,
    _convert,
    _Group,
    _keep_mask,
    _max_rows,
    _out_dtype,
    _read_slices,
    _Recycler,
    _row_groups,
)
from saev_core.loaders.pages import _act_runs, _allow_open_files, _map_rows
from saev_core.shards import Manifest, read_manifest


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
