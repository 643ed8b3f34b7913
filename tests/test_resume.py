"""Resume is safe: a killed train stage resumes only a checkpoint of the same data and the same
result-changing settings, says so, and says why when it starts over (issue 13, point 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_train_stage import SAE_PARAMS  # the same tiny TopK recipe

from saev_core import shards
from saev_core.sae import SAE
from saev_core.training.stage import TrainStage, train_stage

torch.set_num_threads(min(2, torch.get_num_threads()))

N_IMAGES, N_TRAIN, N_TOKENS, D = 24, 18, 5, 6
N_STEPS = 2 * -(-N_TRAIN * N_TOKENS // 16)  # 2 epochs of 90 tokens in batches of 16: 12


def write_two_layer_set(root):
    """A shard set with layers 0 and 1 (different activations), as extract writes one."""
    rng = np.random.default_rng(0)
    files = []
    for layer in (0, 1):
        acts = rng.normal(size=(N_IMAGES, N_TOKENS, D)).astype("float16")
        for split, ids in (("train", range(N_TRAIN)), ("val", range(N_TRAIN, N_IMAGES))):
            w = shards.ShardWriter(root, layer, split, D, np.dtype("float16"), N_TOKENS, 3, 4)
            ids = np.array(list(ids))
            for start in range(0, len(ids), 2):
                sel = ids[start : start + 2]
                w.add(sel, np.arange(N_TOKENS, dtype=np.int32), acts[sel])
            files += w.close()
    manifest = {
        "schema": shards.SCHEMA_VERSION,
        "model": {"name": "tiny", "weights_sha256": "x"},
        "layers": [0, 1],
        "tokens": {
            "policy": "all",
            "n_prefix_tokens": 1,
            "n_patches": N_TOKENS - 1,
            "written": list(range(N_TOKENS)),
            "n_tokens_written": N_TOKENS,
        },
        "dtype": "float16",
        "d_model": D,
        "n_images": N_IMAGES,
        "files": files,
    }
    split = ["train"] * N_TRAIN + ["val"] * (N_IMAGES - N_TRAIN)
    images = pa.table({"image_id": pa.array(np.arange(N_IMAGES), pa.int64()), "split": split})
    pq.write_table(images, root / shards.IMAGES)
    (root / shards.MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture()
def shard_dir(tmp_path):
    root = tmp_path / "shards"
    write_two_layer_set(root)
    return root


def stage(shard_dir, out_dir, sae=None, **kw) -> TrainStage:
    values = dict(shard_dir=str(shard_dir), layer=0, out_dir=str(out_dir))
    values.update(checkpoint_dir=str(out_dir.parent / "ckpt"))
    return TrainStage(**{**values, "sae": {**SAE_PARAMS, **(sae or {})}, **kw})


def kill_after_the_step_6_checkpoint(io: TrainStage) -> None:
    """Train until step 7 and die there (a checkpoint is written every 2 steps: after step 6)."""

    def die(metrics, step):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_stage(io, log=die, progress=False)
    assert json.loads((Path(io.checkpoint_dir) / "state.json").read_text())["step"] == 6


def same_weights(a: SAE, b: SAE) -> bool:
    return all(torch.equal(t, b.state_dict()[n]) for n, t in a.state_dict().items())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"layer": 1}, "checkpoint is for layer 0, this run is layer 1: starting over"),
        ({"tokens": "patches"}, "checkpoint is for tokens all, this run is tokens patches"),
        ({"sae": {"k": 3}}, "checkpoint is for k=4, this run is k=3: starting over"),
    ],
)
def test_other_data_or_config_starts_over_and_says_why(shard_dir, tmp_path, capsys, change, reason):
    # The reference: the changed run, never interrupted, with no checkpoint around.
    train_stage(stage(shard_dir, tmp_path / "fresh", **change), progress=False)
    fresh = SAE.load(tmp_path / "fresh")

    kill_after_the_step_6_checkpoint(stage(shard_dir, tmp_path / "sae"))
    capsys.readouterr()
    train_stage(stage(shard_dir, tmp_path / "sae", **change), progress=False)
    rerun = SAE.load(tmp_path / "sae")
    assert rerun.extra["summary"]["resumed_from_step"] == 0
    assert same_weights(rerun, fresh)  # none of the other run's weights came along
    out = capsys.readouterr().out
    assert reason in out
    assert "resuming" not in out


@pytest.mark.parametrize(
    "change",
    [
        {"sae": {"log_every": 3}},
        {"sae": {"device": "auto", "checkpoint_every": 3, "dense_threshold": 0.05}},
        {"register_as": "x", "register_max_l0": 8.0},
    ],
    ids=["log_every", "device-checkpoint_every-dense_threshold", "stage-fields"],
)
def test_fields_that_do_not_change_the_result_resume(shard_dir, tmp_path, capsys, change):
    train_stage(stage(shard_dir, tmp_path / "whole"), progress=False)
    whole = SAE.load(tmp_path / "whole")

    kill_after_the_step_6_checkpoint(stage(shard_dir, tmp_path / "sae"))
    capsys.readouterr()
    # another out_dir too: only the checkpoint directory says where to resume from
    train_stage(stage(shard_dir, tmp_path / "sae2", **change), progress=False)
    resumed = SAE.load(tmp_path / "sae2")
    assert resumed.extra["summary"]["resumed_from_step"] == 6
    assert same_weights(resumed, whole)
    out = capsys.readouterr().out
    assert f"resuming from step 6 of {N_STEPS}" in out
    assert "starting over" not in out


def test_a_checkpoint_without_a_data_fingerprint_starts_over(shard_dir, tmp_path, capsys):
    io = stage(shard_dir, tmp_path / "sae")
    kill_after_the_step_6_checkpoint(io)
    state_path = tmp_path / "ckpt" / "state.json"
    state = json.loads(state_path.read_text())
    del state["fingerprint"]["data"]  # as written before the data was part of it
    state_path.write_text(json.dumps(state))
    capsys.readouterr()
    train_stage(io, progress=False)
    assert "without a data fingerprint: starting over" in capsys.readouterr().out
    assert SAE.load(tmp_path / "sae").extra["summary"]["resumed_from_step"] == 0


def test_another_loader_order_starts_over(shard_dir, tmp_path, capsys, monkeypatch):
    # resuming skips the batches trained on before by their place in the shuffled order: a
    # loader whose order changed (another version of it between the kill and the rerun) would
    # skip other batches than those trained on, so the checkpoint is not resumed
    from saev_core.loaders import common as loaders  # where the train stage reads it

    train_stage(stage(shard_dir, tmp_path / "fresh"), progress=False)
    fresh = SAE.load(tmp_path / "fresh")
    kill_after_the_step_6_checkpoint(stage(shard_dir, tmp_path / "sae"))
    capsys.readouterr()
    monkeypatch.setattr(loaders, "SHUFFLE_ORDER", loaders.SHUFFLE_ORDER + 1)
    train_stage(stage(shard_dir, tmp_path / "sae"), progress=False)
    out = capsys.readouterr().out
    assert f"this run is shuffle_order {loaders.SHUFFLE_ORDER}: starting over" in out
    rerun = SAE.load(tmp_path / "sae")
    assert rerun.extra["summary"]["resumed_from_step"] == 0
    assert same_weights(rerun, fresh)


@pytest.mark.parametrize("piece_bytes", [None, 4 * D * 2], ids=["whole-groups", "4-row-pieces"])
def test_a_run_killed_mid_epoch_resumes_where_an_uninterrupted_run_goes(
    shard_dir, tmp_path, monkeypatch, piece_bytes
):
    # killed at step 5: the last checkpoint is step 4, batch 4 of epoch 0's 6, so the rerun must
    # skip exactly those 4 batches of the loader's order (row groups of 15 rows cut into pieces
    # of 4 rows, or whole) and end with the uninterrupted run's weights
    from saev_core.loaders import shuffled

    if piece_bytes:  # read by the shuffled reader, from its own module
        monkeypatch.setattr(shuffled, "_PIECE_BYTES", piece_bytes)
    train_stage(stage(shard_dir, tmp_path / "whole"), progress=False)
    whole = SAE.load(tmp_path / "whole")

    def die(metrics, step):
        if step == 5:
            raise KeyboardInterrupt

    io = stage(shard_dir, tmp_path / "sae")
    with pytest.raises(KeyboardInterrupt):
        train_stage(io, log=die, progress=False)
    state = json.loads((Path(io.checkpoint_dir) / "state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (4, 0, 4)
    train_stage(io, progress=False)
    resumed = SAE.load(tmp_path / "sae")
    assert resumed.extra["summary"]["resumed_from_step"] == 4
    assert same_weights(resumed, whole)
