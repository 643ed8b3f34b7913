"""The fast path and what the explorer keeps per image: `resume_after`, `returns_tuple`, the
per-image and per-task state, an upload's bytes as a record source, and `HeatMaps`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------
# the fast path


@contextlib.contextmanager
def resume_after(blocks: Any, layer: int, x: Any, tuple_output: bool = False) -> Iterator[None]:
    """Within the block, a forward of the model skips its blocks 0..layer: blocks before
    `layer` return their input, block `layer` returns `x` (its cached output, [1, T, D] or
    [B, T, D]); hooks on block `layer` (a splice) still see and edit that output, and the later
    blocks run as usual. The embeddings still run (cheap) and are discarded."""

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if tuple_output else h

    def cached(*args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        out = x.to(h.dtype).expand(h.shape[0], *x.shape[1:])
        return (out,) if tuple_output else out

    patched = []
    try:
        for i in range(layer + 1):
            blocks[i].forward = cached if i == layer else passthrough
            patched.append(blocks[i])
        yield
    finally:
        for block in patched:
            del block.forward  # back to the class's forward


def returns_tuple(blocks: Any, layer: int, forward: Any, image_size: Any, device: str) -> bool:
    """Whether block `layer` returns a tuple (older transformers) rather than a tensor (5.x),
    seen in one forward of a blank image; `resume_after` must return the same."""
    import torch

    seen = {}

    def hook(module, args, output):
        seen["tuple"] = isinstance(output, (tuple, list))

    handle = blocks[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            forward(torch.zeros(1, 3, *image_size, device=device))
    finally:
        handle.remove()
    return bool(seen.get("tuple", False))


@dataclass
class _TaskState:
    pixels: Any
    resid: Any
    """The residual stream after the SAE's block, [1, T, D] float."""
    before: np.ndarray
    """Unedited probabilities: [C] (classification) or [P, C] (segmentation)."""


@dataclass
class _ImageState:
    record: Any
    tasks: dict[str, _TaskState] = field(default_factory=dict)
    codes: Any = None
    """SAE codes of every token [T, d_sae], sparse (CSR): a ViT-B's dense 197 x 24,576 codes
    would hold 19 MB per image."""
    png: bytes = b""
    """The image as the model sees it (`Explorer._view_png`); the decoded picture itself, up to
    16 MP for an upload, is not kept."""
    truth: list[int] | None = None


class _Bytes:
    """An upload's bytes, where `data.read_image` looks for a record's source."""

    def __init__(self, data: bytes):
        self.data = data

    def image_file(self, key: str) -> bytes:
        return self.data


# ---------------------------------------------------------------------------------------------
# the run


class HeatMaps:
    """The stats' heat maps as one float32 `[rows, patches]` array and a (feature, image_id) ->
    row index: 24,576 features x 16 exemplars x 196 patches are 300 MB as float32, several GB as
    Python float lists; `get` converts only the row a response needs."""

    def __init__(self, values_rp: np.ndarray, index: dict[tuple[int, int], int]) -> None:
        self.values_rp, self.index = values_rp, index

    @classmethod
    def empty(cls) -> HeatMaps:
        return cls(np.zeros((0, 0), np.float32), {})

    @classmethod
    def read(cls, path: Path) -> HeatMaps:
        """heatmaps.parquet (`feature`, `image_id`, `values`: one list of patch values a row)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        t = pq.read_table(path, columns=["feature", "image_id", "values"])
        values = t.column("values").combine_chunks()
        lengths = np.unique(pc.list_value_length(values).to_numpy(zero_copy_only=False))
        if len(lengths) > 1:
            raise ValueError(f"{path}: heat maps of unequal lengths {lengths.tolist()[:5]}")
        n = int(lengths[0]) if len(lengths) else 0
        flat = values.flatten().to_numpy(zero_copy_only=False)  # nulls -> NaN
        arr = np.asarray(flat, np.float32).reshape(len(t), n)
        feature = t.column("feature").to_numpy().astype(np.int64)
        image_id = t.column("image_id").to_numpy().astype(np.int64)
        pairs = zip(feature.tolist(), image_id.tolist(), strict=True)
        return cls(arr, {fi: r for r, fi in enumerate(pairs)})

    def __len__(self) -> int:
        return len(self.index)

    def get(self, key: tuple[int, int]) -> list[float | None] | None:
        """The heat map of (feature, image_id) as a JSON list (4 decimals, None for no value)."""
        r = self.index.get((int(key[0]), int(key[1])))
        if r is None:
            return None
        row = self.values_rp[r].astype(np.float64).round(4)
        return [None if v != v else float(v) for v in row]
