"""Does `dvc repro` give the same outputs as a commit before? Compares every stage output in
dvc.lock here with the one in `--before`'s dvc.lock, reading both versions from the DVC cache.

    .venv/bin/python bench/same_outputs.py --before HEAD~3

Per output: `same bytes` (same md5), else `same content`, else `DIFFERENT` (or `not in cache`
when a version's objects are gone). Content is compared
where bytes differ by design:
- JSON: keys that are timings (`*_s`, `seconds`, `per_s`, `*_time*`) dropped at every level;
- Parquet: the `mlflow_run_id` column dropped (a new run each time), rows compared;
- DuckDB: every table and view's rows, in sorted order, `mlflow_run_id` dropped (the file's
  bytes vary);
- a directory: file by file, as above.
Both runs must be on one machine: float rounding differs between CPUs. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

import yaml

CACHE = Path(".dvc/cache/files/md5")
TIMING = re.compile(r"(_s$|_seconds|seconds$|per_s|_time|^time)")
DROP_COLUMNS = ("mlflow_run_id",)


def cached(md5: str) -> Path:
    return CACHE / md5[:2] / md5[2:]


def outs(lock_text: str) -> dict[str, str]:
    """Output path -> md5, every stage."""
    lock = yaml.safe_load(lock_text)
    return {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}


def files_of(md5: str) -> dict[str, str]:
    """A directory output's relpath -> md5, from its `.dir` object (or the one file itself)."""
    if not md5.endswith(".dir"):
        return {"": md5}
    return {e["relpath"]: e["md5"] for e in json.loads(cached(md5).read_text())}


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not TIMING.search(str(k))}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _duckdb_rows(path: Path) -> dict:
    import duckdb

    with tempfile.TemporaryDirectory() as tmp:  # the cache is read-only: open a copy
        copy = Path(tmp) / "db.duckdb"
        copy.write_bytes(path.read_bytes())
        con = duckdb.connect(str(copy), read_only=True)
        names = [
            r[0] for r in con.sql("select table_name from information_schema.tables").fetchall()
        ]
        rows = {}
        for name in sorted(names):
            try:
                columns = con.sql(
                    "select column_name from information_schema.columns where table_name = ?",
                    params=[name],
                ).fetchall()
                drop = [c for (c,) in columns if c in DROP_COLUMNS]
                exclude = f" exclude ({', '.join(drop)})" if drop else ""
                rows[name] = con.sql(f'select *{exclude} from "{name}" order by all').fetchall()
            except duckdb.Error as e:  # a view over files not here (relative paths)
                rows[name] = f"unreadable: {type(e).__name__}"
        con.close()
    return rows


def same_content(name: str, a: Path, b: Path) -> bool:
    if name.endswith(".json"):
        return _untimed(json.loads(a.read_text())) == _untimed(json.loads(b.read_text()))
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        ta, tb = pq.read_table(a), pq.read_table(b)
        drop = [c for c in DROP_COLUMNS if c in ta.column_names]
        return ta.drop_columns(drop).equals(tb.drop_columns(drop))
    if name.endswith(".duckdb"):
        return _duckdb_rows(a) == _duckdb_rows(b)
    return False


def _uncached_file(path: str, rev: str | None, tmp: Path) -> Path | None:
    """A single-file output kept in git (`cache: false`, as metrics are): at `rev`, or here."""
    if rev is None:
        return Path(path) if Path(path).exists() else None
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True)
    if shown.returncode:
        return None
    (tmp / "before").write_bytes(shown.stdout)
    return tmp / "before"


def compare(path: str, before: str, after: str, rev: str) -> tuple[str, list[str]]:
    if before == after:
        return "same bytes", []
    if not before.endswith(".dir") and not (cached(before).exists() and cached(after).exists()):
        with tempfile.TemporaryDirectory() as tmp:
            a = cached(before) if cached(before).exists() else _uncached_file(path, rev, Path(tmp))
            b = cached(after) if cached(after).exists() else _uncached_file(path, None, Path(tmp))
            if a is None or b is None:
                return "not in cache", [m for m, f in ((before, a), (after, b)) if f is None]
            return ("same content", []) if same_content(path, a, b) else ("DIFFERENT", [path])
    missing = [m for m in (before, after) if not cached(m).exists()]
    if missing:  # an older session's cache, or a `dvc gc`: nothing to compare with
        return "not in cache", missing
    fa, fb = files_of(before), files_of(after)
    if set(fa) != set(fb):
        return "DIFFERENT", [
            f"files only before: {sorted(set(fa) - set(fb))[:5]}, "
            f"only after: {sorted(set(fb) - set(fa))[:5]}"
        ]
    differ = [r for r in fa if fa[r] != fb[r]]
    if any(not cached(m).exists() for r in differ for m in (fa[r], fb[r])):
        return "not in cache", differ
    bad = [r for r in differ if not same_content(r or path, cached(fa[r]), cached(fb[r]))]
    if bad:
        return "DIFFERENT", bad
    return "same content", differ


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="a git revision whose dvc.lock is the baseline")
    args = p.parse_args()
    old = outs(subprocess.check_output(["git", "show", f"{args.before}:dvc.lock"], text=True))
    new = outs(Path("dvc.lock").read_text())
    verdicts = {}
    for path in sorted(set(old) | set(new)):
        if path not in old or path not in new:
            verdicts[path] = "only before" if path in old else "only after"
            continue
        verdict, detail = compare(path, old[path], new[path], args.before)
        verdicts[path] = verdict
        print(f"{verdict:>13}  {path}" + (f"  ({', '.join(detail)[:200]})" if detail else ""))
    counts = {v: list(verdicts.values()).count(v) for v in sorted(set(verdicts.values()))}
    print(json.dumps({"before": args.before, "outputs": len(verdicts), **counts}))
    return 0 if set(verdicts.values()) <= {"same bytes", "same content"} else 1


if __name__ == "__main__":
    raise SystemExit(main())
