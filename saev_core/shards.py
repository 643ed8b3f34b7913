"""Activation shards: Parquet files of one row per token, a manifest, and the writer.

Layout of a shard set (DESIGN.md, "Shards"):

    <shard_dir>/manifest.json                      model, preprocessing, layers, token layout, files
    <shard_dir>/images.parquet                     image_id, key, split, path, labels (list<string>)
    <shard_dir>/skipped.json                       images that could not be read, with the reason
    <shard_dir>/patch_labels.parquet               image_id, token, label   (one row per patch x concept)
    <shard_dir>/layer=<L>/<split>-<NNNNN>.parquet  image_id int64, token int32, act fixed_size_binary

`act` is the vector as fixed-size binary (d_model x itemsize bytes): STACK.md measured it 4.6x
faster to read than a fixed-size list, and dictionary encoding/compression are off on it because
they cost read time and save nothing on float16. Row groups hold whole images (a multiple of the
tokens per image), so a row group is also a unit for per-image readers (`saev_core.loaders`).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from saev_core.hashing import sha256_file

MANIFEST = "manifest.json"
IMAGES = "images.parquet"
PATCH_LABELS = "patch_labels.parquet"
SCHEMA_VERSION = 2  # 2: images.parquet has `key`; manifest has chunks, history, n_registers
ACT_PAGE_BYTES = 256 * 2**20  # largest data page the writer makes (Parquet allows < 2 GiB)


def _tmp_name(path: Path) -> Path:
    """Where `path` is written before its rename, `<name>.<host>-<random>.<pid>.tmp`: unique
    per writer, so that two writers of one file (a partition's flow run marked Crashed while
    still alive, and its retry on another worker, maybe on another machine of one NFS mount
    with the same PID) never write into each other's temporary file. The PID stays the last
    part before `.tmp`, for tools that look for a dead process's files."""
    unique = f"{socket.gethostname()}-{secrets.token_hex(4)}"
    return path.with_name(f"{path.name}.{unique}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = _tmp_name(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_table(table: pa.Table, path: Path, **kwargs: Any) -> None:
    tmp = _tmp_name(path)
    pq.write_table(table, tmp, **kwargs)
    os.replace(tmp, path)


def acts_to_arrow(acts: np.ndarray) -> pa.FixedSizeBinaryArray:
    """[n, d] array -> fixed-size binary column, zero-copy on a C-contiguous array."""
    acts = np.ascontiguousarray(acts)
    width = acts.shape[1] * acts.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(acts), [None, pa.py_buffer(acts.reshape(-1).view(np.uint8))]
    )


def arrow_to_acts(column: pa.Array | pa.ChunkedArray, dtype: np.dtype, d_model: int) -> np.ndarray:
    """Fixed-size binary column -> [n, d] array (zero-copy for a single chunk)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        width = chunk.type.byte_width
        if width != d_model * dtype.itemsize:
            raise ValueError(
                f"vector width {width} bytes != d_model {d_model} x {dtype.itemsize} bytes"
            )
        buf = chunk.buffers()[1]
        # A sliced chunk starts `offset` values into its buffer.
        arr = np.frombuffer(
            buf, dtype=dtype, count=len(chunk) * d_model, offset=chunk.offset * width
        )
        parts.append(arr.reshape(len(chunk), d_model))
    if not parts:
        return np.empty((0, d_model), dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass(frozen=True)
class Manifest:
    """The parsed `manifest.json` of a shard set, with the few derived numbers readers need."""

    path: Path
    data: dict[str, Any]

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def d_model(self) -> int:
        return int(self.data["d_model"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data["dtype"])

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.data["layers"]]

    @property
    def n_tokens(self) -> int:
        """Tokens written per image (after the token policy)."""
        return int(self.data["tokens"]["n_tokens_written"])

    @property
    def n_prefix_tokens(self) -> int:
        return int(self.data["tokens"]["n_prefix_tokens"])

    @property
    def written_tokens(self) -> list[int]:
        return [int(t) for t in self.data["tokens"]["written"]]

    @property
    def sha256(self) -> str:
        return sha256_file(self.path)

    def files(self, layer: int, splits: Sequence[str] | None = None) -> list[dict[str, Any]]:
        if layer not in self.layers:
            raise ValueError(
                f"layer {layer} not in this shard set (layers {self.layers}): {self.dir}"
            )
        return [
            f
            for f in self.data["files"]
            if int(f["layer"]) == layer and (splits is None or f["split"] in splits)
        ]


def read_manifest(shard_dir: str | Path) -> Manifest:
    path = Path(shard_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"no {MANIFEST} in {shard_dir}: not a shard set, or its extraction did not finish"
        )
    data = json.loads(path.read_text())
    if data.get("schema") != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: manifest schema {data.get('schema')!r}, expected {SCHEMA_VERSION}"
        )
    return Manifest(path, data)


class ShardWriter:
    """Writes one layer's rows into `layer=<L>/<split>-<NNNNN>.parquet` files.

    Rows are added per image batch; a file is closed every `images_per_file` images and row groups
    hold `images_per_row_group` whole images. A file becomes visible only when complete.
    """

    def __init__(
        self,
        shard_dir: Path,
        layer: int,
        split: str,
        d_model: int,
        dtype: np.dtype,
        tokens_per_image: int,
        images_per_row_group: int = 256,
        images_per_file: int = 4096,
        first_index: int = 0,
    ):
        self.dir = shard_dir / f"layer={layer}"
        self.first_index = first_index  # file numbers start here (a resumed run's next chunk)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.layer, self.split, self.d_model, self.dtype = layer, split, d_model, np.dtype(dtype)
        self.tokens_per_image = tokens_per_image
        self.rows_per_group = images_per_row_group * tokens_per_image
        self.images_per_file = images_per_file
        self.schema = pa.schema(
            [
                ("image_id", pa.int64()),
                ("token", pa.int32()),
                ("act", pa.binary(d_model * self.dtype.itemsize)),
            ]
        )
        self.files: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._images_in_file = 0
        self._rows_in_file = 0
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_rows = 0

    def add(self, image_ids: np.ndarray, tokens: np.ndarray, acts_btd: np.ndarray) -> None:
        """Add `acts_btd` [n_images, tokens_per_image, d_model] for `image_ids` [n_images]."""
        n, t, d = acts_btd.shape
        if t != self.tokens_per_image or d != self.d_model:
            raise ValueError(
                f"expected [*, {self.tokens_per_image}, {self.d_model}], got {acts_btd.shape}"
            )
        start = 0
        while start < n:
            if self._writer is None:
                self._open()
            take = min(n - start, self.images_per_file - self._images_in_file)
            sl = slice(start, start + take)
            self._pending.append(
                (
                    np.repeat(image_ids[sl].astype(np.int64), t),
                    np.tile(tokens.astype(np.int32), take),
                    acts_btd[sl].reshape(take * t, d).astype(self.dtype, copy=False),
                )
            )
            self._pending_rows += take * t
            self._images_in_file += take
            start += take
            while self._pending_rows >= self.rows_per_group:
                self._flush(self.rows_per_group)
            if self._images_in_file >= self.images_per_file:
                self._close_file()

    def _open(self) -> None:
        name = f"{self.split}-{self.first_index + len(self.files):05d}.parquet"
        self._final = self.dir / name
        self._tmp = _tmp_name(self._final)
        self._writer = pq.ParquetWriter(
            self._tmp,
            self.schema,
            compression="none",
            use_dictionary=["image_id", "token"],
            write_statistics=["image_id", "token"],
            # One data page per row group's vectors (pages are split at this size or row count
            # only): the shuffled loader maps the vectors straight from the file, a run per page.
            data_page_size=ACT_PAGE_BYTES,
            max_rows_per_page=2**31 - 1,
        )
        self._images_in_file = self._rows_in_file = 0

    def _flush(self, n_rows: int | None = None) -> None:
        if not self._pending:
            return
        ids = np.concatenate([p[0] for p in self._pending])
        toks = np.concatenate([p[1] for p in self._pending])
        acts = np.concatenate([p[2] for p in self._pending])
        n_rows = len(ids) if n_rows is None else n_rows
        table = pa.table(
            [pa.array(ids[:n_rows]), pa.array(toks[:n_rows]), acts_to_arrow(acts[:n_rows])],
            schema=self.schema,
        )
        self._writer.write_table(table, row_group_size=n_rows)
        self._rows_in_file += n_rows
        rest = (ids[n_rows:], toks[n_rows:], acts[n_rows:])
        self._pending = [rest] if len(rest[0]) else []
        self._pending_rows = len(rest[0])

    def _close_file(self) -> None:
        if self._writer is None:
            return
        self._flush()
        self._writer.close()
        final = self._final
        os.replace(self._tmp, final)
        self.files.append(
            {
                "path": str(final.relative_to(self.dir.parent)),
                "layer": self.layer,
                "split": self.split,
                "rows": self._rows_in_file,
                "images": self._images_in_file,
                "sha256": sha256_file(final),
            }
        )
        self._writer = None

    def close(self) -> list[dict[str, Any]]:
        self._close_file()
        return self.files


def read_images(shard_dir: str | Path):
    """The shard set's image table (pandas): image_id, split, path, labels."""
    return pq.read_table(Path(shard_dir) / IMAGES).to_pandas()


def read_patch_labels(shard_dir: str | Path):
    """The long patch-label table (pandas): image_id, token, label. Empty if the data has none."""
    path = Path(shard_dir) / PATCH_LABELS
    if not path.exists():
        import pandas as pd

        return pd.DataFrame({"image_id": [], "token": [], "label": []})
    return pq.read_table(path).to_pandas()
