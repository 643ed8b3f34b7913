"""The train stage over a real (tiny) shard set: a sweep on one pass of the data, resume after a
kill, shard checks that fail before training, and the flow's MLflow runs and DVC sweep metrics."""

from __future__ import annotations

import json

import pytest
import torch
from test_shards import write_set

from saev_core import shards
from saev_core.sae import SAE
from saev_core.training.stage import TrainStage, train_stage

torch.set_num_threads(min(2, torch.get_num_threads()))

SAE_PARAMS = {
    "arch": "topk",
    "d_sae": 24,
    "k": 4,
    "batch_size": 16,
    "n_epochs": 2,
    "warmup_steps": 2,
    "aux_k": 8,
    "dead_after_tokens": 64,
    "device": "cpu",
    "log_every": 1,
    "checkpoint_every": 2,
}


@pytest.fixture()
def shard_dir(tmp_path):
    root = tmp_path / "shards"
    write_set(root, n_images=24, n_tokens=5, d=6, n_train=18)
    return root


def stage(shard_dir, tmp_path, **kw) -> TrainStage:
    base = dict(shard_dir=str(shard_dir), layer=0, out_dir=str(tmp_path / "sae"), sae=SAE_PARAMS)
    return TrainStage(**{**base, **kw})


def test_sweep_members_train_together_and_land_beside_the_main_sae(shard_dir, tmp_path):
    sweep = {
        "k2": {"k": 2},
        "relu": {"arch": "relu", "l1_coeff": 0.01},
        "bt": {"arch": "batchtopk"},
    }
    io = stage(shard_dir, tmp_path, sweep=sweep)
    steps = {}
    metrics = train_stage(
        io, progress=False, member_log=lambda n: lambda m, s: steps.__setitem__(n, s)
    )
    assert set(metrics["sweep"]) == set(sweep)
    assert 0 < metrics["fvu"] < 1.5 and metrics["l0"] <= 4
    main = SAE.load(tmp_path / "sae")
    assert main.cfg.k == 4 and main.extra["layer"] == 0
    for name in sweep:
        member = SAE.load(tmp_path / "sae" / "sweep" / name)
        assert member.extra["metrics"]["fvu"] == pytest.approx(metrics["sweep"][name]["fvu"])
        assert member.extra["summary"]["n_steps"] == 2 * 6  # 18 images x 5 tokens / 16, twice
        assert steps[name] == 11
    assert SAE.load(tmp_path / "sae" / "sweep" / "k2").cfg.k == 2
    assert not (tmp_path / "sae.ckpt").exists()  # removed once the run finished


def test_stage_resumes_a_killed_run(shard_dir, tmp_path):
    io = stage(shard_dir, tmp_path)
    train_stage(io, progress=False)
    whole = SAE.load(tmp_path / "sae")

    def die(metrics, step):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_stage(io, log=die, progress=False)
    state = json.loads((tmp_path / "sae.ckpt" / "state.json").read_text())
    assert state["step"] == 6
    train_stage(io, progress=False)  # finds the checkpoint and goes on from step 6
    resumed = SAE.load(tmp_path / "sae")
    assert resumed.extra["summary"]["resumed_from_step"] == 6
    assert resumed.extra["summary"]["n_steps"] == whole.extra["summary"]["n_steps"]
    for name, t in whole.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name


def test_bad_shards_and_configs_fail_before_training(shard_dir, tmp_path):
    calls = []
    log = lambda m, s: calls.append(s)  # noqa: E731
    with pytest.raises(ValueError, match="k=40 must be <= d_sae=24"):
        train_stage(stage(shard_dir, tmp_path, sae={**SAE_PARAMS, "k": 40}), log=log)
    with pytest.raises(ValueError, match="must share batch_size"):
        train_stage(stage(shard_dir, tmp_path, sweep={"b": {"batch_size": 8}}), log=log)
    with pytest.raises(ValueError, match="train.layer 3"):
        train_stage(stage(shard_dir, tmp_path, layer=3), log=log)
    with pytest.raises(ValueError, match="no rows of split 'test'"):
        train_stage(stage(shard_dir, tmp_path, eval_split="test"), log=log)
    m = json.loads((shard_dir / shards.MANIFEST).read_text())
    m["d_model"] = 8  # the manifest lies about the width of the vectors
    (shard_dir / shards.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match="d_model 8"):
        train_stage(stage(shard_dir, tmp_path), log=log)
    m["d_model"] = 6
    m["files"][0]["rows"] += 1
    (shard_dir / shards.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match="rows"):
        train_stage(stage(shard_dir, tmp_path), log=log)
    (shard_dir / m["files"][1]["path"]).unlink()
    m["files"][0]["rows"] -= 1
    (shard_dir / shards.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(FileNotFoundError, match="missing"):
        train_stage(stage(shard_dir, tmp_path), log=log)
    assert calls == []  # not one training step ran
    with pytest.raises(ValueError, match="bad member name"):
        stage(shard_dir, tmp_path, sweep={"a/b": {}})


@pytest.mark.slow
def test_train_flow_logs_nested_mlflow_runs_and_sweep_metrics(
    prefect_harness, shard_dir, tmp_path, monkeypatch
):
    import mlflow
    import yaml

    from flows.train import train_flow

    monkeypatch.chdir(tmp_path)
    params = {
        "train": {
            "shard_dir": str(shard_dir),
            "layer": 0,
            "out_dir": "saes/demo",
            "sae": SAE_PARAMS,
            "sweep": {"k2": {"k": 2}, "k8": {"k": 8}},
            "register_as": "shapes-sae",
            "register_max_l0": 4,
        }
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    metrics = train_flow(params="params.yaml")
    assert metrics["l0"] <= 4
    rows = json.loads((tmp_path / "metrics/train_sweep.json").read_text())
    assert [r["name"] for r in rows] == ["k2", "main", "k8"]  # sorted by L0: the Pareto order
    assert rows[0]["l0"] < rows[1]["l0"] < rows[2]["l0"]
    runs = mlflow.search_runs(experiment_names=["train"], output_format="list")
    parent = next(r for r in runs if r.info.run_name == "demo")
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in kids) == ["k2", "k8"]
    for r in [parent, *kids]:
        assert {"l0", "fvu", "dead_frac", "dense_frac", "train/loss"} <= set(r.data.metrics)
        assert r.data.tags["shard_manifest_sha256"] == parent.data.tags["shard_manifest_sha256"]
        assert "git_commit" in r.data.tags
        arts = {a.path for a in mlflow.MlflowClient().list_artifacts(r.info.run_id)}
        assert {"sae", "feature_density.png"} <= arts
    # the best SAE with L0 <= 4 and < 10% dead (never k8, L0 8) is the registered version
    best = min((r for r in rows if r["l0"] <= 4 and r["dead_frac"] < 0.1), key=lambda r: r["fvu"])
    (version,) = mlflow.MlflowClient().search_model_versions("name='shapes-sae'")
    assert version.tags["member"] == best["name"] != "k8"
    by_name = {"main" if r.info.run_name == "demo" else r.info.run_name: r for r in [parent, *kids]}
    assert version.run_id == by_name[best["name"]].info.run_id
    assert version.source.endswith("/sae")
