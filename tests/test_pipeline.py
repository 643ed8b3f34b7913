"""The whole pipeline through `dvc repro` on a tiny world: every stage is a real Prefect flow run
in its own process, and DVC re-runs only what a change touches."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY_PARAMS = {
    "backbone": {
        "data_dir": "data/shapes",
        "out_dir": "artifacts/backbone",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 8,
        "epochs": 1,
        "batch_size": 16,
    },
    "extract": {
        "model": "artifacts/backbone",
        "data": "data/shapes",
        "out_dir": "artifacts/activations/shapes",
        "layers": [1],
        "batch_size": 16,
        "images_per_row_group": 8,
    },
    "validate": {
        "shard_dir": "artifacts/activations/shapes",
        "report": "artifacts/activations/shapes.validation.json",
    },
    "train": {
        "shard_dir": "artifacts/activations/shapes",
        "layer": 1,
        "out_dir": "artifacts/saes/demo",
        "sae": {
            "arch": "topk",
            "expansion": 4,
            "k": 4,
            "batch_size": 64,
            "n_epochs": 1,
            "warmup_steps": 2,
            "aux_k": 16,
            "dead_after_tokens": 500,
            "norm_max_tokens": 1000,
        },
    },
    "stats": {
        "sae_dir": "artifacts/saes/demo",
        "shard_dir": "artifacts/activations/shapes",
        "out_dir": "artifacts/stats/demo",
        "run": "demo",
        "options": {"n_top": 4, "splits": ["train", "val"]},
    },
    "probe": {
        "model": "artifacts/backbone",
        "data": "data/shapes",
        "out_dir": "artifacts/probes/demo",
        "seg_classes": ["red", "green", "blue", "yellow"],
        "epochs": 2,
    },
    "intervene": {
        "model": "artifacts/backbone",
        "sae_dir": "artifacts/saes/demo",
        "stats_dir": "artifacts/stats/demo",
        "data": "data/shapes",
        "out_dir": "artifacts/interventions/demo",
        "strengths": [0.0, -2.0],
        "n_bootstrap": 50,
        "n_grid": 2,
    },
    "warehouse": {"db": "warehouse/saev.duckdb", "sql_dir": "sql"},
}


# a key that names a timing or a date; a value that is a date
TIMING_KEY = re.compile(r"(^|_)(s|sec|secs|seconds|time|timestamp|date|datetime|elapsed|duration)$")
DATE = re.compile(r"\b(19|20)\d\d-[01]\d-[0-3]\d[T ][0-2]\d:[0-5]\d")


def tracked_files(root: Path) -> list[Path]:
    """Every file of every output dvc.lock records (directories walked)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    out = []
    for stage in lock["stages"].values():
        for entry in stage.get("outs", []):
            path = root / entry["path"]
            out += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return out


def strings_of(path: Path) -> tuple[list[str], list[str]]:
    """(keys, string values) a tracked file holds: JSON keys and values, Parquet column names
    and cells, DuckDB tables, safetensors metadata, text files; other binaries hold none."""
    import json

    import duckdb
    import pyarrow.parquet as pq

    keys: list[str] = []
    values: list[str] = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                keys.append(str(k))
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, str):
            values.append(x)

    suffix = path.suffix
    if suffix == ".json":
        walk(json.loads(path.read_text()))
    elif suffix == ".parquet":
        table = pq.read_table(path)
        keys += table.column_names
        walk(table.to_pylist())
        walk(
            {
                k.decode(): v.decode(errors="replace")
                for k, v in (table.schema.metadata or {}).items()
            }
        )
    elif suffix == ".duckdb":
        con = duckdb.connect(str(path), read_only=True)
        try:
            for (name,) in con.execute("select table_name from duckdb_tables()").fetchall():
                cur = con.execute(f"select * from {name}")
                rows = cur.fetchall()
                keys += [d[0] for d in cur.description]
                walk([[str(v) for v in r] for r in rows])
            walk(
                [
                    r[0]
                    for r in con.execute(
                        "select sql from duckdb_views() where not internal"
                    ).fetchall()
                ]
            )
        finally:
            con.close()
    elif suffix == ".safetensors":
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            walk(json.loads(f.read(n)).get("__metadata__", {}))
    elif suffix in (".html", ".txt", ".csv", ".yaml", ".md"):
        values.append(path.read_text(errors="replace"))
    return keys, values


def untracked_leaks(root: Path, dirs: list[Path]) -> list[str]:
    """What in the tracked outputs names a timing, a date, one of `dirs` or this host."""
    import socket

    needles = {str(d) for d in dirs} | {str(Path(d).resolve()) for d in dirs}
    host = socket.gethostname()
    if len(host) >= 4 and host != "localhost":
        needles.add(host)
    found = []
    for path in tracked_files(root):
        keys, values = strings_of(path)
        rel = path.relative_to(root)
        found += [f"{rel}: timing key {k!r}" for k in set(keys) if TIMING_KEY.search(k)]
        for v in values:
            for n in needles:
                if n in v:
                    i = v.index(n)
                    found.append(f"{rel}: {n!r} in {v[max(0, i - 60) : i + 60]!r}")
            if DATE.search(v):
                found.append(f"{rel}: date {DATE.search(v).group(0)!r}")
    return sorted(set(found))


def dvc(root, *args, env):
    r = subprocess.run(
        [str(BIN / "dvc"), *args], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


@pytest.mark.slow
def test_dvc_repro_end_to_end(tiny_world, tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    for name in ("saev_core", "flows", "sql"):
        (root / name).symlink_to(REPO / name)
    # the demo's stages only: the backbone comparison (compare-*, `make compare`) reads a
    # `compare` params section the tiny params do not have; tests/test_compare.py runs its own
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    pipeline["stages"] = {
        k: v for k, v in pipeline["stages"].items() if not k.startswith("compare-")
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    shutil.copytree(tiny_world, root / "data" / "shapes")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    dvc(root, "init", "--no-scm", "-q", env=env)

    out = dvc(root, "repro", env=env)
    for stage in (
        "backbone",
        "extract",
        "validate",
        "train",
        "stats",
        "probe",
        "intervene",
        "warehouse",
    ):
        assert f"Running stage '{stage}'" in out
    for path in (
        "artifacts/backbone/model.safetensors",
        "artifacts/activations/shapes/manifest.json",
        "artifacts/activations/shapes.validation.json",
        "artifacts/saes/demo/sae.safetensors",
        "artifacts/saes/demo/cfg.json",
        "artifacts/stats/demo/feature_labels.parquet",
        "artifacts/interventions/demo/results.parquet",
        "warehouse/saev.duckdb",
        "metrics/train.json",
        "metrics/intervene.json",
    ):
        assert (root / path).exists(), path
    metrics = dvc(root, "metrics", "show", "--json", env=env)
    assert "fvu" in metrics and "l0" in metrics

    # no tracked output holds a timing, a date, an absolute path or the host name
    lock = (root / "dvc.lock").read_text()
    found = untracked_leaks(root, [REPO, tmp_path, Path.home()])
    assert not found, found
    # same machine, same bytes: forcing the backbone or the SAE to retrain changes no hash
    for stage in ("backbone", "train"):
        forced = dvc(root, "repro", "-f", "-s", stage, env=env)
        assert f"Running stage '{stage}'" in forced
        assert (root / "dvc.lock").read_text() == lock, f"{stage}: dvc.lock changed"

    # nothing changed: nothing runs
    again = dvc(root, "repro", env=env)
    assert "Running stage" not in again

    # a stats option changes: stats and what reads it re-run, training does not
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["stats"]["options"]["n_top"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    partial = dvc(root, "repro", env=env)
    assert "Running stage 'stats'" in partial and "Running stage 'warehouse'" in partial
    for stage in ("backbone", "extract", "train"):
        assert f"Running stage '{stage}'" not in partial

    from saev_core.warehouse import run_query

    table = run_query(
        root / "warehouse/saev.duckdb", "best_feature_per_concept", {}, fmt="json", root=root
    )
    assert '"auroc"' in table

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["train", "intervene"], output_format="list")
    names = {r.info.run_name for r in runs}
    assert "demo" in names  # the train run and the intervene parent
    assert any("@-2" in n for n in names)  # one nested run per concept x strength
