"""saev-flow as a service, with real parts: a Prefect server and a process worker, a lean MLflow
tracking server, and a DVC remote in a local directory.

`saev deploy` registers the deployments, a run of `saev-refresh` is triggered through the API
and watched to completion: new images in the watched folder are appended to the shards, stats
and warehouse are rebuilt, the outputs are pushed to the DVC remote, and the MLflow server holds
the run with its provenance tags. A second run with a bad image in strict mode fails: its
extraction task is retried per its policy, and nothing half-written appears. All processes are
stopped by their PIDs at the end (tests/servers.py).
"""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from servers import BIN, Proc, base_env, start_mlflow_server, start_prefect_server, wait_http
from test_extract_safety import _folder, digest

from saev_core.extract import ExtractConfig, extract
from saev_core.training.stage import TrainStage, train_stage

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def sh(*cmd, cwd, env=None):
    out = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def project(root: Path, tiny_world: Path, tiny_vit: Path) -> dict:
    """A project directory as a user has it after a first run: images in a watched folder under
    DVC, their shards, a trained SAE, a DVC remote. Returns its params."""
    root.mkdir()
    shutil.copytree(REPO / "sql", root / "sql")
    _folder(root / "data", tiny_world, 8)
    small = dict(batch_size=4, images_per_row_group=2, images_per_file=4, n_workers=1)
    params = {
        "extract": {
            "model": str(tiny_vit),
            "data": "data",
            "out_dir": "artifacts/activations/acts",
            "layers": [1],
            "val_fraction": 0.5,  # a flat folder: half of its 8 images held out as val
            **small,
        },
        "validate": {
            "shard_dir": "artifacts/activations/acts",
            "report": "artifacts/activations/acts.validation.json",
        },
        "train": {
            "shard_dir": "artifacts/activations/acts",
            "layer": 1,
            "eval_split": "train",
            "out_dir": "artifacts/saes/t",
            "sae": {"arch": "topk", "expansion": 2, "k": 4, "batch_size": 32, "n_epochs": 1},
        },
        "stats": {
            "sae_dir": "artifacts/saes/t",
            "shard_dir": "artifacts/activations/acts",
            "out_dir": "artifacts/stats/t",
            "run": "t",
            "options": {"n_top": 2, "splits": ["train", "val"], "n_heatmaps": 0},
        },
        "warehouse": {"db": "warehouse/saev.duckdb", "sql_dir": "sql"},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cwd = Path.cwd()
    try:  # the stage functions take paths relative to the project, as the flows do
        import os

        os.chdir(root)
        extract(ExtractConfig(**{**params["extract"], "layers": (1,)}), progress=False)
        train_stage(TrainStage(**params["train"]), progress=False)
    finally:
        os.chdir(cwd)
    dvc = BIN / "dvc"
    sh(dvc, "init", "--no-scm", "-q", cwd=root)
    sh(dvc, "config", "core.analytics", "false", cwd=root)
    sh(dvc, "remote", "add", "-d", "shared", root.parent / "remote", cwd=root)
    sh(dvc, "add", "-q", "data", cwd=root)
    return params


def test_refresh_deployment_on_real_servers(tiny_world, tiny_vit, tmp_path, request):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    t0 = time.time()
    home = tmp_path / "home"
    home.mkdir()
    # Both servers start while the project is prepared.
    api, server = start_prefect_server(home, request)
    mlflow_uri, mlflow_server = start_mlflow_server(home, request)
    root = tmp_path / "project"
    params = project(root, tiny_world, tiny_vit)
    wait_http(api + "/health", server)
    wait_http(mlflow_uri + "/health", mlflow_server)
    timings = {"servers_up": time.time() - t0}

    env = {**base_env(home), "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_uri}
    deployed = sh(BIN / "saev", "deploy", "--only", "saev-refresh", cwd=root, env=env)
    assert "pool=local" in deployed and "no work pool 'gpu'" in deployed
    worker = Proc(
        [str(BIN / "saev"), "worker"],
        home / "worker.log",
        {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"},
        cwd=root,
    )
    request.addfinalizer(worker.stop)
    timings["deployed"] = time.time() - t0

    shards_before = digest(root / "artifacts/activations/acts")
    _folder(root / "data", tiny_world, 12)  # 4 new images arrive in the watched folder
    # A second project config whose run must fail: a corrupt image under strict mode, with
    # extraction in 2 partitions, and outputs of its own (none of which may appear).
    bad = root / "data_bad"
    _folder(bad, tiny_world, 6)
    next(bad.rglob("*.png")).write_bytes(b"not a png")
    broken = {
        **params,
        "extract": {
            **params["extract"],
            "data": "data_bad",
            "out_dir": "artifacts/activations/bad",
            "strict": True,
        },
        "stats": {**params["stats"], "out_dir": "artifacts/stats/bad"},
        "warehouse": {**params["warehouse"], "db": "warehouse/bad.duckdb"},
    }
    (root / "broken.yaml").write_text(yaml.safe_dump(broken))

    with temporary_settings(updates={PREFECT_API_URL: api}):
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("refresh/saev-refresh")
            assert dep.parameters == {"params": "params.yaml", "version": True}
            assert dep.work_pool_name == "local"
            assert [s.schedule.interval.total_seconds() for s in dep.schedules] == [600]
            assert dep.job_variables["working_dir"] == str(root)
            assert dep.job_variables["env"]["MLFLOW_TRACKING_URI"] == mlflow_uri

            # Both runs at once: the worker runs them side by side.
            run = client.create_flow_run_from_deployment(dep.id)
            failing = client.create_flow_run_from_deployment(
                dep.id, parameters={"params": "broken.yaml", "partitions": 2}
            )
            state = wait_run(client, run.id, worker)
            timings["run_ok"] = time.time() - t0
            assert state.is_completed(), f"{state}\n{worker.tail()}"
            # The doctor, with both servers up and the worker online (it has just run a flow).
            doctor = subprocess.Popen(
                [str(BIN / "saev"), "doctor", "--json"],
                cwd=root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            request.addfinalizer(doctor.kill)
            logs = " ".join(
                entry.message
                for entry in client.read_logs(LogFilter(flow_run_id={"any_": [run.id]}), limit=200)
            )
            assert "no GPU work pool 'gpu' exists: running on local process pool 'local'" in logs
            tags = client.read_flow_run(run.id).tags
            data_md5 = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]
            assert f"data_version:{data_md5}" in tags
            assert any(t.startswith("git_commit:") for t in tags)

            # Outputs: the shards grew by the new images, old files untouched; stats, warehouse.
            manifest = json.loads((root / "artifacts/activations/acts/manifest.json").read_text())
            assert manifest["n_images"] == 12
            after = digest(root / "artifacts/activations/acts")
            assert all(after[f] == h for f, h in shards_before.items() if "layer=" in f)
            assert (root / "artifacts/stats/t/features.parquet").exists()
            import duckdb

            con = duckdb.connect(str(root / "warehouse/saev.duckdb"), read_only=True)
            con.execute("set file_search_path = ?", [str(root)])
            assert con.sql("select count(*) from images").fetchall() == [(12,)]
            con.close()

            # DVC: the new data version and every output committed and pushed to the remote.
            for dvc_file in (
                "data.dvc",
                "artifacts/activations/acts.dvc",
                "artifacts/stats/t.dvc",
                "warehouse/saev.duckdb.dvc",
            ):
                assert (root / dvc_file).exists(), dvc_file
            status = sh(BIN / "dvc", "status", "-c", "-q", cwd=root)  # empty: remote has it all
            assert status.strip() == ""
            assert sum(1 for p in (tmp_path / "remote").rglob("*") if p.is_file()) > 10

            # MLflow, over HTTP: the refresh run with its provenance.
            import mlflow

            ml = mlflow.MlflowClient(mlflow_uri)
            found = ml.search_runs([ml.get_experiment_by_name("service").experiment_id])
            assert len(found) == 1  # the failing run never got that far
            r = found[0]
            assert r.data.metrics["new_images"] == 4 and r.data.metrics["n_images"] == 12
            assert r.data.tags["data_version"] == data_md5
            assert r.data.tags["prefect_flow_run_id"] == str(run.id)
            assert r.data.tags["dvc_pushed_to"] == "shared"

            # The failing run: its partitions retried per their policy, nothing half-written.
            state = wait_run(client, failing.id, worker)
            timings["run_failed"] = time.time() - t0
            assert state.is_failed(), f"{state}\n{worker.tail()}"
            every = [(t.name, t.state.type.value, t.run_count) for t in client.read_task_runs()]
            tasks = [t for t in every if t[0].startswith("partition_task") and t[1] == "FAILED"]
            # retries=2 in flows/extract.py: three tries, then the run fails
            assert tasks and all(t[2] == 3 for t in tasks), f"{timings} {every}\n{worker.tail()}"
            assert not (root / "artifacts/activations/bad").exists()
            assert not (root / "artifacts/stats/bad").exists()
            assert not (root / "warehouse/bad.duckdb").exists()
            assert (root / "artifacts/activations/.bad.partial/plan.json").exists()  # resumable

    out, err = doctor.communicate(timeout=120)
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert doctor.returncode == 0, [c for c in checks.values() if c["status"] == "fail"]
    assert checks["Prefect API"]["status"] == "ok" and api in checks["Prefect API"]["detail"]
    assert checks["work pool 'local'"]["detail"].endswith("a worker is online")
    assert checks["MLflow"]["status"] == "ok" and mlflow_uri in checks["MLflow"]["detail"]
    assert checks["DVC remote"]["status"] == "ok"
    timings["total"] = time.time() - t0
    print(f"timings (s from start): {timings}")


def wait_run(client, run_id, worker: Proc, timeout: float = 150.0):
    """Poll the API until the flow run is final; its state."""
    start = time.time()
    while time.time() - start < timeout:
        state = client.read_flow_run(run_id).state
        if state and state.is_final():
            return state
        if worker.popen.poll() is not None:
            raise RuntimeError(f"the worker died:\n{worker.tail()}")
        time.sleep(0.5)
    raise TimeoutError(f"flow run {run_id} not finished in {timeout} s:\n{worker.tail()}")
