"""A real S3-compatible object store on loopback (moto's server, tests/servers.py `MotoServer`,
the `s3_server` fixture): DVC pushes the shards to it and pulls them into a clean clone, an MLflow
tracking server keeps a run's artifacts in it, the warehouse builds from stats Parquet in it, and
`saev doctor` says whether it is reachable and writable. Every server is stopped by its PID.

Each test prints one JSON line of timings (`pytest -s` shows them): the figures of the scale-out
docs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from servers import start_mlflow_server, wait_http
from test_doctor import by_name, clean_env, doctor
from test_doctor import make_project as make_doctor_project
from test_warehouse import SQL_DIR
from test_warehouse import make_project as make_stats_project

from saev_core import object_store
from saev_core.extract import ExtractConfig, extract
from saev_core.shards import sha256_file
from saev_core.warehouse import Source, build_warehouse, load_sources, run_query

BIN = Path(sys.executable).parent
GIT_ENV = {
    "GIT_AUTHOR_NAME": "saev test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "saev test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def sh(*cmd: str, cwd: Path) -> str:
    out = subprocess.run(
        list(cmd), cwd=cwd, env={**os.environ, **GIT_ENV}, capture_output=True, text=True
    )
    assert out.returncode == 0, f"{cmd}: {out.stdout}\n{out.stderr}"
    return out.stdout


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    return {
        str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_dvc_pushes_shards_to_s3_and_a_clean_clone_pulls_them(
    s3_server, tiny_world, tiny_vit, tmp_path
):
    repo = tmp_path / "repo"
    repo.mkdir()
    dvc = str(BIN / "dvc")
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh(dvc, "init", "-q", cwd=repo)
    sh(dvc, "config", "core.analytics", "false", cwd=repo)
    sh(dvc, "remote", "add", "-d", "bucket", "s3://saev/dvc", cwd=repo)
    sh(dvc, "remote", "modify", "bucket", "endpointurl", s3_server.endpoint, cwd=repo)
    cfg = ExtractConfig(
        model=str(tiny_vit),
        data=str(tiny_world),
        out_dir=str(repo / "artifacts" / "acts"),
        layers=(0, -1),
        batch_size=6,
        images_per_file=8,
    )
    manifest = extract(cfg, progress=False)
    shards = repo / "artifacts" / "acts"
    sh(dvc, "add", "artifacts/acts", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-q", "-m", "shards", cwd=repo)

    t = time.perf_counter()
    sh(dvc, "push", cwd=repo)
    push_s = time.perf_counter() - t
    # dvc-s3 wrote its content-addressed objects to the bucket: every shard, the manifest and
    # the directory listing
    keys = s3_server.keys("dvc/")
    assert len(keys) >= len(manifest["files"]) + 2, keys
    assert all(k.startswith("dvc/files/md5/") for k in keys)

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    assert not (clone / "artifacts" / "acts").exists()
    t = time.perf_counter()
    sh(dvc, "pull", cwd=clone)
    pull_s = time.perf_counter() - t

    local, pulled = tree(shards), tree(clone / "artifacts" / "acts")
    assert pulled == local
    assert set(local) >= {f["path"] for f in manifest["files"]} | {"manifest.json"}
    for f in manifest["files"]:
        assert pulled[f["path"]] == f["sha256"]
    size = sum(p.stat().st_size for p in shards.rglob("*") if p.is_file())
    print(
        json.dumps(
            {
                "dvc_s3": {
                    "files": len(local),
                    "bytes": size,
                    "push_s": round(push_s, 2),
                    "pull_s": round(pull_s, 2),
                }
            }
        )
    )


def test_mlflow_keeps_a_runs_artifacts_in_the_bucket(s3_server, tmp_path, request):
    from mlflow import MlflowClient

    home = tmp_path / "mlflow"
    home.mkdir()
    uri, server = start_mlflow_server(
        home, request, artifacts="s3://saev/mlflow", env=s3_server.env
    )
    wait_http(f"{uri}/health", server)
    client = MlflowClient(uri)
    exp = client.create_experiment("object-store")
    run = client.create_run(exp)
    note = tmp_path / "note.txt"
    note.write_text("features 3 and 7 read red\n")
    client.log_artifact(run.info.run_id, str(note), artifact_path="notes")
    client.set_terminated(run.info.run_id)

    keys = s3_server.keys("mlflow/")
    assert any(k.endswith(f"{run.info.run_id}/artifacts/notes/note.txt") for k in keys), (
        f"{keys}\n{server.tail()}"
    )
    key = next(k for k in keys if k.endswith("notes/note.txt"))
    body = s3_server.client().get_object(Bucket="saev", Key=key)["Body"].read()
    assert body == note.read_bytes()
    # and a client reads it back through the server
    got = client.download_artifacts(run.info.run_id, "notes/note.txt", str(tmp_path / "dl"))
    assert Path(got).read_bytes() == note.read_bytes()


def rows_without_filename(db: Path, root: Path) -> dict[str, list[tuple]]:
    """Every table's rows, the `filename` column left out (it names the file or the object)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        names = [r[0] for r in con.execute("select table_name from duckdb_tables()").fetchall()]
        out = {}
        for name in sorted(set(names) - {"warehouse_info"}):
            cols = [r[0] for r in con.execute(f"describe {name}").fetchall()]
            keep = ", ".join(f'"{c}"' for c in cols if c != "filename")
            out[name] = con.execute(f"select {keep} from {name} order by all").fetchall()
        return out
    finally:
        con.close()


def test_warehouse_builds_from_stats_parquet_in_the_bucket(s3_server, tmp_path):
    root = tmp_path / "project"
    make_stats_project(root)
    t = time.perf_counter()
    local = build_warehouse(root / "warehouse" / "local.duckdb", root=root, sql_dir=SQL_DIR)
    local_s = time.perf_counter() - t

    # the stats, images and interventions Parquet go to the bucket (the SAEs stay local: the
    # feature matching reads their decoders from the root)
    client = s3_server.client()
    uploaded = 0
    for path in sorted((root / "artifacts").rglob("*.parquet")):
        key = f"proj/{path.relative_to(root)}"
        client.upload_file(str(path), "saev", key)
        uploaded += 1
    assert uploaded >= 8
    sources = [Source(s.name, f"s3://saev/proj/{s.path}", s.columns) for s in load_sources(SQL_DIR)]
    assert all(s.path.startswith("s3://saev/proj/artifacts/") for s in sources)
    t = time.perf_counter()
    remote = build_warehouse(
        root / "warehouse" / "s3.duckdb", root=root, sql_dir=SQL_DIR, sources=sources
    )
    s3_s = time.perf_counter() - t

    assert remote["empty_sources"] == local["empty_sources"]
    assert {n: s["files"] for n, s in remote["sources"].items()} == {
        n: s["files"] for n, s in local["sources"].items()
    }
    assert remote["views"] == local["views"] and remote["views"]["features"] > 0
    # the same rows in every table, and the rows come from the bucket
    assert rows_without_filename(root / "warehouse" / "s3.duckdb", root) == rows_without_filename(
        root / "warehouse" / "local.duckdb", root
    )
    con = duckdb.connect(str(root / "warehouse" / "s3.duckdb"), read_only=True)
    files = [r[0] for r in con.execute("select distinct filename from src_runs").fetchall()]
    dirs = con.execute("select value from warehouse_info where key = 'source_dirs'").fetchall()
    con.close()
    assert json.loads(dirs[0][0]) == [
        "s3://saev/proj/artifacts/stats",
        "s3://saev/proj/artifacts/activations",
        "s3://saev/proj/artifacts/interventions",
    ]
    assert sorted(files) == [f"s3://saev/proj/artifacts/stats/relu_{r}/run.parquet" for r in "ab"]
    # a named query answers the same on both
    answers = [
        run_query(
            root / "warehouse" / f"{db}.duckdb",
            "top_features_for_label",
            {"label": "red", "run": "relu_a"},
            fmt="json",
            root=root,
            sql_dir=SQL_DIR,
        )
        for db in ("local", "s3")
    ]
    assert answers[0] == answers[1] and json.loads(answers[0])
    print(json.dumps({"warehouse": {"local_s": round(local_s, 2), "s3_s": round(s3_s, 2)}}))
    print(json.dumps({"local": local["seconds"], "s3": remote["seconds"]}))


def test_views_mode_over_the_bucket_is_refused(tmp_path):
    sources = [Source("runs", "s3://saev/stats/*/run.parquet", {"run": "varchar"})]
    with pytest.raises(ValueError, match="materialize=True"):
        build_warehouse(
            tmp_path / "w.duckdb", tmp_path, SQL_DIR, sources=sources, materialize=False
        )


def test_doctor_checks_the_object_store(s3_server, tmp_path):
    root = make_doctor_project(tmp_path)
    env = {**clean_env(tmp_path), **s3_server.env, object_store.OBJECT_STORE_ENV: "s3://saev/proj"}
    out = doctor(root, env, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    check = by_name(json.loads(out.stdout))["object store"]
    assert check["status"] == "ok", check
    for words in (s3_server.endpoint, "bucket 'saev'", "reachable", "writable"):
        assert words in check["detail"]
    assert s3_server.keys() == []  # the probe object was deleted

    # A missing bucket, and a DVC remote on S3 at a port where nothing listens: both said.
    from servers import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    dvc = str(BIN / "dvc")
    sh(dvc, "remote", "add", "-f", "-d", "shared", "s3://saev/dvc", cwd=root)
    sh(dvc, "remote", "modify", "shared", "endpointurl", dead, cwd=root)
    env[object_store.OBJECT_STORE_ENV] = "s3://nosuch/proj"
    out = doctor(root, env)
    assert out.returncode == 1
    text = out.stdout
    assert "s3://nosuch/proj" in text and "bucket missing" in text
    assert "bucket 'nosuch' does not exist" in text
    assert f"'shared' = s3://saev/dvc: endpoint {dead}, bucket 'saev': unreachable" in text
    assert "not working: DVC remote, object store" in text


def test_probe_says_what_is_missing(s3_server, tmp_path, monkeypatch):
    good = object_store.probe("s3://saev/x")
    assert (good.reachable, good.bucket_exists, good.writable, good.problem) == (
        True,
        True,
        True,
        None,
    )
    assert good.endpoint == s3_server.endpoint and good.bucket == "saev"
    # no credentials anywhere (environment, files, instance metadata)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bare = object_store.probe("s3://saev/x")
    assert not bare.credentials and not bare.reachable and "no credentials" in bare.problem
    with pytest.raises(ValueError, match="bucket"):
        object_store.split_url("s3:///x")
    assert object_store.split_url("s3://b/some/prefix/") == ("b", "some/prefix")
