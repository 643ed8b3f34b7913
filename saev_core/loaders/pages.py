"""Parquet page locations of the `act` column, for mapping vectors straight from the file.

The writer stores `act` uncompressed and plain-encoded (shards.py), so a data page of it is a
small Thrift header, the definition levels and then the vectors, back to back; this module parses
those headers and maps the pages, within the process's limit on open files.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import numpy as np

from saev_core.loaders.common import _MAP_FLAGS, _OTHER_FILES, _Group, _open_same
from saev_core.shards import Manifest

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
