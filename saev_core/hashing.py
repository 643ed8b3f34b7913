"""sha256 of files, and a cache of it for large files that rarely change (model weights).

Every stage that loads a backbone records its weights' sha256, so a run names exactly the model
it used: about 1 s for ViT-B's 350 MB, 10 s for a 4 GB ViT-g, in every stage. Like DVC's state
database, `sha256_file_cached` remembers each file's digest next to its size, mtime and inode in
`<cache dir>/sha256.json` and hashes again only when one of them changes. The cache dir is
`$SAEV_CACHE_DIR`, else `$XDG_CACHE_HOME/saev-flow`, else `~/.cache/saev-flow`. A missing,
unreadable or corrupt cache is only a cache miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

CACHE_NAME = "sha256.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (`sha256sum` agrees)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where `sha256_file_cached` keeps its digests (see the module docstring)."""
    if os.environ.get("SAEV_CACHE_DIR"):
        return Path(os.environ["SAEV_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "saev-flow"


def sha256_file_cached(path: str | Path) -> str:
    """`sha256_file`, from the cache when the file's size, mtime and inode are unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    cache_path = cache_dir() / CACHE_NAME
    try:
        cache = json.loads(cache_path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and "sha256" in entry:
        return str(entry["sha256"])
    digest = sha256_file(path)
    st = path.stat()
    if [st.st_size, st.st_mtime_ns, st.st_ino] != stamp:
        return digest  # written to while we read it: do not remember a digest of a moving file
    cache[str(path)] = {"stamp": stamp, "sha256": digest}
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f"{CACHE_NAME}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, cache_path)
    except OSError:
        pass  # a read-only home: hash every time, as before
    return digest
