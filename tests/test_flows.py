"""Flows as Prefect sees them: the schedule of the deployment, and a stage flow run by the engine."""

import json
from types import SimpleNamespace

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


# ---------------------------------------------------------------------------------------------
# intervene: what the flow logs to MLflow (a real sqlite store), with the measurements faked


def intervention_results():
    """Two hypotheses x two strengths as `run_all` hands them to the flow (after the
    multiplicity correction), and their specificity rows over three concepts."""
    from types import SimpleNamespace

    from saev_core.hypotheses import Result

    concepts = ["blue", "red", "green"]
    results = []
    for hyp, target, deltas in (("red", "red", (-0.1, -0.6)), ("blue", "blue", (0.02, -0.3))):
        rows, spec = [], []
        for s, d in zip((-1.0, -5.0), deltas, strict=True):
            supported = d < -0.2
            rows.append({
                "experiment": f"{hyp}@{s:g}", "hypothesis": hyp, "concept": target,
                "task": "classifier", "features": "3", "control_features": "1,2",
                "edit": "clamp", "relative": True, "strength": s, "scope": "all", "layer": 2,
                "select_split": "val", "eval_split": "test", "n_images": 40,
                "delta": d, "delta_lo": d - 0.05, "delta_hi": d + 0.05,
                "control_delta": -0.01, "direction_delta": 0.0,
                "n_controls": 20, "control_median": -0.01, "control_lo": -0.04 + s / 100,
                "control_hi": 0.03, "vs_control": d + 0.01, "vs_control_lo": d - 0.04,
                "vs_control_hi": d + 0.06, "p_value": 0.001 if supported else 0.3,
                "p_adjusted": 0.004 if supported else 0.6, "alternative": "less",
                "correction": "holm", "verdict": "supported" if supported else "not supported",
                "off_target_abs_delta": abs(d) / 10, "target_change_rate": 0.1,
                "held_out": True, "nan_metric": float("nan"),
            })  # fmt: skip
            for k, c in enumerate(concepts):
                v = d if c == target else 0.01 * (k + 1) * s
                spec.append({"experiment": f"{hyp}@{s:g}", "hypothesis": hyp,
                             "edited_concept": target, "strength": s, "concept": c,
                             "delta": v, "delta_lo": v - 0.02, "delta_hi": v + 0.02})  # fmt: skip
        h = SimpleNamespace(title=hyp, sae_dir="sae", stats_dir="stats")
        results.append(Result(h, rows, [], spec))
    return results


@pytest.fixture
def logged_intervention(tmp_path, monkeypatch, capsys):
    """The intervene task run against a sqlite MLflow store in tmp_path, on faked results, with
    the `intervene` experiment created beforehand the way older code did (no kind tag)."""
    import mlflow

    from flows.intervene import intervene_task
    from saev_core import hypotheses
    from saev_core.hypotheses import InterveneConfig

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("intervene", artifact_location=str(tmp_path / "artifacts-mlflow"))
    results = intervention_results()

    def run_all(hs, cache, on_result=None, skip_missing=True):
        for r in results:
            on_result(r)
        return results

    monkeypatch.setattr(hypotheses, "Cache", lambda settings: None)
    monkeypatch.setattr(hypotheses, "plan", lambda cfg, cache: [])
    monkeypatch.setattr(hypotheses, "run_all", run_all)
    monkeypatch.setattr(hypotheses, "provenance", lambda sae, stats: {"stats_run": "toy"})
    # a before/after figure per row, made with pyplot as a caller might: the flow closes them
    from saev_core.plots import _plt

    plt = _plt()
    plt.close("all")
    for r in results:
        r.figures[:] = [plt.figure() for _ in r.rows]
    out = tmp_path / "interventions" / "hyp"
    rows = intervene_task.fn(InterveneConfig(out_dir=str(out)))
    printed = capsys.readouterr().out
    open_figures = plt.get_fignums()
    plt.close("all")
    return SimpleNamespace(uri=uri, out=out, rows=rows, results=results, printed=printed,
                           open_figures=open_figures)  # fmt: skip


def test_intervene_closes_every_figure_it_logs(logged_intervention):
    """Figures logged to MLflow are closed (pyplot warns past 20 open: 8 concepts x 3 strengths
    is 24 before/after grids), the before/after grids logged on every child first."""
    import mlflow

    li = logged_intervention
    assert li.open_figures == []
    client = mlflow.MlflowClient(li.uri)
    exp = client.get_experiment_by_name("intervene")
    for run in client.search_runs([exp.experiment_id]):
        if run.data.tags.get("mlflow.parentRunId"):
            assert "before_after.png" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_intervene_logs_verdicts_summary_and_specificity(logged_intervention):
    import mlflow
    import pandas as pd

    li = logged_intervention
    client = mlflow.MlflowClient(li.uri)
    exp = client.get_experiment_by_name("intervene")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "hyp")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    want = pd.DataFrame([row for r in li.results for row in r.rows])
    assert sorted(c.info.run_name for c in children) == sorted(want.experiment)

    # the parent's summary metrics, as pandas computes them from the rows
    m = parent.data.metrics
    ok = want.verdict == "supported"
    assert m["n_experiments"] == len(want) and m["n_supported"] == ok.sum() == 2
    assert m["share_supported"] == pytest.approx(ok.mean())
    for s, share in ok.groupby(want.strength).mean().items():
        assert m[f"share_supported_at_{s:g}"] == pytest.approx(share)
    assert m["share_supported_at_-5"] == 1.0 and m["share_supported_at_-1"] == 0.0
    assert m["median_p_adjusted"] == pytest.approx(want.p_adjusted.median())
    assert m["mean_off_target_abs_delta"] == pytest.approx(want.off_target_abs_delta.mean())
    assert m["min_n_controls"] == 20

    # each child: the verdict's numbers as metrics, the verdict as a tag, strength as both
    for child in children:
        row = want.set_index("experiment").loc[child.info.run_name]
        cm = child.data.metrics
        for k in ("p_value", "p_adjusted", "vs_control_lo", "vs_control_hi", "control_lo",
                  "control_hi", "off_target_abs_delta", "delta", "strength"):  # fmt: skip
            assert cm[k] == pytest.approx(row[k]), k
        assert "nan_metric" not in cm
        assert child.data.tags["verdict"] == row.verdict
        assert child.data.tags["alternative"] == "less" and "below_control" not in child.data.tags
        assert float(child.data.params["strength"]) == row.strength
        assert child.data.params["eval_split"] == "test"

    # comparing one hypothesis' runs across strengths: the dose-response
    red = mlflow.search_runs(
        [exp.experiment_id], filter_string="params.hypothesis = 'red'",
        order_by=["metrics.strength ASC"],
    )  # fmt: skip
    assert list(red["metrics.strength"]) == [-5.0, -1.0]
    assert list(red["metrics.delta"]) == [-0.6, -0.1]
    assert list(red["tags.verdict"]) == ["supported", "not supported"]

    # one specificity heat map per strength, and the tables, on the parent
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "specificity")}
    assert arts == {"specificity/strength_-1.png", "specificity/strength_-5.png"}
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"dose_response.png", "results.json", "specificity.json"} <= top
    # ... and the Parquet the warehouse reads
    spec = pd.read_parquet(li.out / "specificity.parquet")
    assert len(spec) == 12 and set(spec.run) == {"hyp"}
    res = pd.read_parquet(li.out / "results.parquet")
    assert list(res.verdict) == list(want.verdict) and res.mlflow_run_id.notna().all()
    # the printed address: the runs table in a saved view whose columns are those metrics
    url = (
        f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs"
        "?workflowType=machine_learning&viewStateShareKey=saev-intervene"
    )
    assert f"MLflow runs table: {url}" in li.printed
    view = json.loads(exp.tags["mlflow.sharedViewState.saev-intervene"])
    columns = json.loads(view["state"])["selectedColumns"]
    assert {"metrics.`share_supported`", "metrics.`share_supported_at_-5`",
            "metrics.`p_adjusted`", "params.`strength`", "tags.`verdict`"} <= set(columns)  # fmt: skip


def test_specificity_heatmap_is_the_matrix():
    """The heat map's cells are the concept x concept matrix (pandas pivot), edited concept on
    rows, the edited concepts first among the columns."""
    import numpy as np
    import pandas as pd

    from saev_core.plots import specificity_heatmap

    spec = [row for r in intervention_results() for row in r.specificity]
    fig = specificity_heatmap(spec, -5.0)
    ax = fig.axes[0]
    shown = np.ma.filled(ax.images[0].get_array(), np.nan)
    df = pd.DataFrame(spec)
    want = df[df.strength == -5.0].pivot(index="edited_concept", columns="concept", values="delta")
    want = want.loc[["red", "blue"], ["red", "blue", "green"]]
    np.testing.assert_allclose(shown, want.to_numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["red", "blue"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["red", "blue", "green"]
    # blue under red's edit: 0.01 x 1 x -5 +- 0.02, green under blue's: 0.01 x 3 x -5
    assert {"-0.05*", "-0.15*", "-0.60*"} <= {t.get_text() for t in ax.texts}
    with pytest.raises(ValueError, match="strength 3"):
        specificity_heatmap(spec, 3.0)


def test_experiments_are_created_as_model_training(tmp_path, monkeypatch):
    import mlflow

    from flows.common import ensure_experiment, mlflow_run, runs_table_url

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    with mlflow_run("train", run_name="a") as run:
        pass
    exp = mlflow.MlflowClient(uri).get_experiment(run.info.experiment_id)
    assert exp.name == "train" and exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # a kind someone chose in the UI stays
    other = mlflow.create_experiment("genai", tags={"mlflow.experimentKind": "genai_development"})
    assert ensure_experiment("genai") == other
    assert mlflow.get_experiment(other).tags["mlflow.experimentKind"] == "genai_development"
    assert runs_table_url("7", "http://h:5000/") == (
        "http://h:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    assert runs_table_url("7", "http://h:5000", view="v").endswith("&viewStateShareKey=v")
    assert runs_table_url("7").startswith("http://127.0.0.1:5000/#/")  # sqlite: the local UI


def test_a_run_with_overrides_leaves_the_dvc_metrics_alone(tmp_path, capsys):
    """metrics/*.json are the params.yaml run's (DVC tracks them): `saev train -S ...` tried by
    hand must not overwrite them with a variant's figures."""
    from flows.common import write_metrics

    path = tmp_path / "metrics" / "train.json"
    write_metrics(path, {"fvu": 0.07})
    write_metrics(path, {"fvu": 0.5}, {"sae.encoder_init_scale": 1.0})
    assert json.loads(path.read_text()) == {"fvu": 0.07}
    assert "left as it is" in capsys.readouterr().out
    write_metrics(path, {"fvu": 0.06}, {})
    assert json.loads(path.read_text()) == {"fvu": 0.06}


@pytest.mark.parametrize("name", ["pipeline", "refresh"])
def test_pipeline_and_refresh_take_distributed(name, tmp_path, monkeypatch, capsys):
    """`distributed` is a flow parameter of both scheduled flows (a deployment run may set it),
    off by default; with it and no Prefect server, the flow and the command refuse at once,
    before any stage runs (tests/test_distributed.py runs the fan-out on real workers)."""
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline_flow
    from flows.refresh import refresh_flow
    from saev_core.cli import main

    flow = {"pipeline": pipeline_flow, "refresh": refresh_flow}[name]
    schema = parameter_schema(flow.fn).model_dump()
    assert schema["properties"]["distributed"]["default"] is False

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))  # no profile with an API url either
    missing = str(tmp_path / "no-such-params.yaml")  # refused before the params are read
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # an earlier flow test in this process leaves its temporary server's URL in Prefect's
    # settings; with no server configured, that setting is unset
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(ValueError, match="needs a Prefect server and workers"):
            flow.fn(params=missing, partitions=2, distributed=True)
        assert main([name, "--params", missing, "--partitions", "2", "--distributed"]) == 1
    err = capsys.readouterr().err
    assert f"saev {name} --distributed needs a Prefect server" in err and "saev worker" in err
