"""The sha256 cache for model weights: hits while the file is unchanged, misses when it changes."""

from __future__ import annotations

import hashlib
import os

from saev_core import hashing


def test_cached_sha256_hits_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEV_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: calls.append(p) or real(p))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    want = hashlib.sha256(b"a" * 1000).hexdigest()
    assert hashing.sha256_file_cached(weights) == want
    assert hashing.sha256_file_cached(weights) == want
    assert len(calls) == 1  # the second answer came from sha256.json
    # Same size, new bytes and a new mtime: hashed again.
    weights.write_bytes(b"b" * 1000)
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert hashing.sha256_file_cached(weights) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert len(calls) == 2


def test_a_corrupt_or_unwritable_cache_is_only_a_miss(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / hashing.CACHE_NAME).write_text("{not json")
    monkeypatch.setenv("SAEV_CACHE_DIR", str(cache))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"xyz")
    assert hashing.sha256_file_cached(weights) == hashlib.sha256(b"xyz").hexdigest()
    # A cache dir that cannot be created (its parent is a file): still the right digest.
    monkeypatch.setenv("SAEV_CACHE_DIR", str(weights / "cache"))
    assert hashing.sha256_file_cached(weights) == hashlib.sha256(b"xyz").hexdigest()


def test_a_file_that_changes_while_hashed_is_not_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEV_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"old")
    real, calls = hashing.sha256_file, []

    def hash_then_append(p):
        calls.append(p)
        digest = real(p)
        if len(calls) == 1:
            with open(weights, "ab") as f:  # a writer appends while we read
                f.write(b" and more")
        return digest

    monkeypatch.setattr(hashing, "sha256_file", hash_then_append)
    hashing.sha256_file_cached(weights)
    want = hashlib.sha256(b"old and more").hexdigest()
    assert hashing.sha256_file_cached(weights) == want and len(calls) == 2
