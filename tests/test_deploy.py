"""The deployments as specs, without a server: parameters come from the params file path only,
GPU work falls back to the local pool, the sweep hook, and `saev worker --gpu` on a CPU machine.
With a real server they are exercised in tests/test_service.py."""

import os
import subprocess
import sys
from pathlib import Path

from servers import free_port

from flows import deploy, settings


def test_specs_and_pools(monkeypatch):
    monkeypatch.setenv("SAEV_CRON", "15 2 * * *")
    monkeypatch.setenv("SAEV_GPU_POOL", "a100")
    monkeypatch.delenv("SAEV_CPU_POOL", raising=False)
    cfg = settings.load()
    specs = {s.name: s for s in deploy.specs()}
    assert list(specs) == ["saev-pipeline", "saev-refresh", "saev-sweep"]
    assert specs["saev-pipeline"].cron == "15 2 * * *"
    assert all(s.needs_gpu for s in specs.values())
    # No GPU pool on the server: the local process pool; once it exists, the GPU pool.
    assert deploy.pool_for(specs["saev-refresh"], cfg, {"local"}) == "local"
    assert deploy.pool_for(specs["saev-refresh"], cfg, {"local", "a100"}) == "a100"
    rows = deploy.deploy(params="p.yaml", dry_run=True)
    assert [r["parameters"] for r in rows] == [
        {"params": "p.yaml", "version": True},
        {"params": "p.yaml", "version": True},
        {"params": "p.yaml"},
    ]
    assert all("no work pool 'a100'" in r["note"] for r in rows)


def test_runner_deployment_imports_the_installed_flow(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    spec = next(s for s in deploy.specs(watch_every_s=120) if s.name == "saev-refresh")
    d = deploy.to_deployment(spec, "local", "params.yaml", tmp_path)
    assert d.entrypoint == "flows.refresh.refresh_flow"  # a module path: no upload needed
    assert d.work_pool_name == "local"
    assert [s.schedule.interval.total_seconds() for s in d.schedules] == [120]
    assert d.job_variables["working_dir"] == str(tmp_path.resolve())
    assert d.job_variables["env"]["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"


def test_sweep_hook_falls_back_to_train(monkeypatch):
    import importlib.util

    has_sweep = importlib.util.find_spec("flows.sweep") is not None
    ref = deploy.sweep_flow_ref()
    assert ref == ("flows.sweep:sweep_flow" if has_sweep else "flows.train:train_flow")
    assert deploy.load_flow(ref).name in ("sweep", "train")


def test_gpu_worker_refuses_a_machine_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        return  # on a GPU machine the worker would start: nothing to refuse
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    out = subprocess.run(
        [str(Path(sys.executable).with_name("saev")), "worker", "--gpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "no CUDA device" in out.stderr
