"""Flows as Prefect sees them: the schedule of the deployment, and a stage flow run by the engine."""

import pytest

from saev_core import shards


def test_deployment_has_cron_schedule():
    from flows.deploy import build_deployment

    d = build_deployment(name="nightly", cron="15 2 * * *", params="p.yaml")
    assert d.name == "nightly" and d.parameters == {"params": "p.yaml"}
    assert [s.schedule.cron for s in d.schedules] == ["15 2 * * *"]


def test_pipeline_lists_every_stage_in_order():
    from flows.pipeline import STAGES

    assert list(STAGES) == [
        "backbone",
        "extract",
        "validate",
        "train",
        "stats",
        "probe",
        "intervene",
        "warehouse",
    ]


@pytest.mark.slow
def test_validate_flow_stops_on_bad_shards(prefect_harness, tmp_path):
    import numpy as np
    from test_shards import write_set
    from test_validate import _rewrite

    from flows.validate import validate_flow
    from saev_core.validate import ShardValidationError

    write_set(tmp_path / "s")
    params = tmp_path / "params.yaml"
    params.write_text(
        f"validate:\n  shard_dir: {tmp_path / 's'}\n  report: {tmp_path / 'r.json'}\n"
    )
    report = validate_flow(params=str(params))
    assert report["success"]
    _rewrite(
        tmp_path / "s",
        "layer=0/train-00000.parquet",
        acts_fn=lambda a: a.__setitem__((0, 0), np.inf),
    )
    with pytest.raises(ShardValidationError, match="train-00000.parquet"):
        validate_flow(params=str(params))
    assert shards.read_manifest(tmp_path / "s")  # the shards themselves are left as they were
