"""The MLflow UI in headless Chromium: the address the intervene flow prints opens the runs
table of a model-training experiment, with the parent's summary metrics among its columns.

MLflow 3.17's UI opens an experiment on whatever its sidebar's workflow switch holds (GenAI by
default: the overview of traces), whatever the experiment's `mlflow.experimentKind` tag says,
and its runs table shows no metric column until one is chosen: `flows.common.runs_table_url`
sets the switch in the address and opens the saved view `save_runs_view` stored. Skips without
chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A lean `mlflow server` (2 processes) on a sqlite store in tmp_path, holding an intervene
    parent run with the summary metrics and one child."""
    import mlflow
    from test_flows import intervention_results

    from flows.common import mlflow_run, save_runs_view
    from flows.intervene import CHILD_COLUMNS, RUNS_VIEW, child_metrics, summary_metrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rows = [row for r in intervention_results() for row in r.rows]
    with mlflow_run("intervene", run_name="hyp") as parent:
        summary = summary_metrics(rows)
        mlflow.log_metrics(summary)
        with mlflow_run("intervene", run_name=rows[0]["experiment"], nested=True):
            mlflow.log_metrics(child_metrics(rows[0]))
        save_runs_view(parent.info.experiment_id, RUNS_VIEW, "saev: verdicts",
                       metrics=[*summary, *CHILD_COLUMNS])  # fmt: skip
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", uri,
         "--default-artifact-root", str(tmp_path / "mlartifacts")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError((tmp_path / "server.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        yield base, parent.info.experiment_id
    finally:
        os.killpg(proc.pid, 15)  # the server and its worker: the group this test started
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


@pytest.mark.slow
def test_printed_address_opens_the_runs_table(mlflow_server, chromium_tab):
    from flows.common import runs_table_url
    from flows.intervene import RUNS_VIEW

    base, exp_id = mlflow_server
    page = chromium_tab.page
    # wide enough that the grid renders every column (it draws only those in sight)
    page.set_viewport_size({"width": 3600, "height": 900})
    page.goto(runs_table_url(exp_id, base, view=RUNS_VIEW))
    href, text = "", ""
    deadline = time.time() + 90
    while time.time() < deadline:
        page.wait_for_timeout(500)
        href = page.evaluate("location.href")
        text = page.evaluate("document.body ? document.body.innerText : ''") or ""
        if "share_supported" in text and "hyp" in text:
            break
    assert f"#/experiments/{exp_id}/runs" in href, href
    assert "workflowType=machine_learning" in href
    # the runs table in the saved view: the parent run, its summary metrics as columns
    assert "saev: verdicts" in text and "share key is invalid" not in text
    assert "hyp" in text and "share_supported" in text, text[:2000]
    assert "n_supported" in text and "p_adjusted" in text
