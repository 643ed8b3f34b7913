"""What the benchmarks share: the manifest of a synthetic shard set (layer 0, CLS + patches)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saev_core import shards


def write_manifest(
    shard_dir: Path, files: list[dict[str, Any]], n_images: int, tokens: int, d_model: int
) -> Path:
    """A manifest for float16 shards written by `ShardWriter` at layer 0; returns `shard_dir`."""
    manifest = {
        "schema": shards.SCHEMA_VERSION,
        "model": {"name": "bench", "weights_sha256": "-"},
        "layers": [0],
        "tokens": {
            "policy": "all",
            "n_prefix_tokens": 1,
            "n_patches": tokens - 1,
            "written": list(range(tokens)),
            "n_tokens_written": tokens,
        },
        "dtype": "float16",
        "d_model": d_model,
        "n_images": n_images,
        "files": files,
    }
    (shard_dir / shards.MANIFEST).write_text(json.dumps(manifest))
    return shard_dir
