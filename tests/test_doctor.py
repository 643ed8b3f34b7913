"""`saev doctor` against a working offline configuration and a broken one (dead servers, an
unknown DVC remote, a disk too small). Run as a user runs it: the command, in a project
directory, with only the environment saying where things live. With live servers it is checked
in tests/test_service.py."""

import json
import subprocess
import sys
from pathlib import Path

import yaml
from servers import free_port

BIN = Path(sys.executable).parent


def doctor(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "saev"), "doctor", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def make_project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text(
        yaml.safe_dump(
            {"extract": {"out_dir": "artifacts/acts"}, "warehouse": {"db": "warehouse/w.duckdb"}}
        )
    )
    for args in (
        ["init", "--no-scm", "-q"],
        ["config", "core.analytics", "false"],
        ["remote", "add", "-d", "shared", str(tmp_path / "remote")],
    ):
        subprocess.run([str(BIN / "dvc"), *args], cwd=root, check=True, capture_output=True)
    (tmp_path / "remote").mkdir()
    return root


def clean_env(tmp_path: Path) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAEV_", "PREFECT_API"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile with an API URL
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env["SAEV_MIN_FREE_GB"] = "0.001"
    return env


def by_name(report: dict) -> dict:
    return {c["name"]: c for c in report["checks"]}


def test_doctor_on_a_working_offline_configuration(tmp_path):
    root = make_project(tmp_path)
    out = doctor(root, clean_env(tmp_path), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    checks = by_name(report)
    assert report["settings"]["prefect_api_url"] is None
    assert checks["Prefect API"]["status"] == "info"
    assert "temporary local server" in checks["Prefect API"]["detail"]
    assert checks["MLflow"]["status"] == "ok" and "will be created" in checks["MLflow"]["detail"]
    assert checks["DVC remote"]["status"] == "ok"
    assert str(tmp_path / "remote") in checks["DVC remote"]["detail"]
    assert checks["disk"]["status"] == "ok"
    assert checks["GPU"]["status"] in ("ok", "info")
    assert not [c for c in report["checks"] if c["status"] == "fail"]


def test_doctor_on_a_broken_configuration(tmp_path):
    root = make_project(tmp_path)
    dead = free_port()  # nothing listens there
    env = {
        **clean_env(tmp_path),
        "PREFECT_API_URL": f"http://127.0.0.1:{dead}/api",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{dead}",
        "SAEV_DVC_REMOTE": "nosuch",
        "SAEV_MIN_FREE_GB": "1e12",
    }
    out = doctor(root, env)
    assert out.returncode == 1
    text = out.stdout
    assert f"http://127.0.0.1:{dead}/api does not answer" in text
    assert f"tracking server http://127.0.0.1:{dead} does not answer" in text
    assert "remote 'nosuch' is not defined" in text
    assert "below SAEV_MIN_FREE_GB" in text
    assert "not working: Prefect API, MLflow, DVC remote, disk" in text
    # Outside a DVC repository, it says so.
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "params.yaml").write_text("extract: {}\n")
    out = doctor(tmp_path / "bare", clean_env(tmp_path), "--json")
    assert out.returncode == 1
    assert "is not a DVC repository" in by_name(json.loads(out.stdout))["DVC"]["detail"]


def test_doctor_probes_an_s3_remote_with_the_credentials_in_dvc_config(tmp_path, s3_server):
    """Credentials in `.dvc/config.local` are the ones DVC uses, so the probe uses them too:
    with none in the environment, the bucket is reached and written with DVC's, and the secret
    is never printed. On a dead endpoint the same remote is unreachable, not "no credentials"."""
    root = make_project(tmp_path)
    secret = "s3cr3t-n0t-t0-b3-pr1nt3d"
    for args in (
        ["remote", "add", "-f", "-d", "bucket", "s3://saev/dvc"],
        ["remote", "modify", "bucket", "endpointurl", s3_server.endpoint],
        ["remote", "modify", "--local", "bucket", "access_key_id", "AKIDVCONLY"],
        ["remote", "modify", "--local", "bucket", "secret_access_key", secret],
    ):
        subprocess.run([str(BIN / "dvc"), *args], cwd=root, check=True, capture_output=True)
    env = clean_env(tmp_path)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        env.pop(var, None)  # none in the environment: only DVC's config has credentials
    env["AWS_SHARED_CREDENTIALS_FILE"] = env["AWS_CONFIG_FILE"] = str(tmp_path / "none")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    out = doctor(root, env, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    check = by_name(json.loads(out.stdout))["DVC remote"]
    assert check["status"] == "ok", check
    assert "'bucket' = s3://saev/dvc" in check["detail"]
    assert "reachable, writable" in check["detail"]
    assert "with DVC config's access_key_id, secret_access_key" in check["detail"]
    assert secret not in out.stdout + out.stderr
    assert s3_server.keys("dvc/") == []  # the probe object was deleted again
    # A dead endpoint: DVC's credentials are found, the store does not answer.
    subprocess.run(
        [
            str(BIN / "dvc"),
            "remote",
            "modify",
            "bucket",
            "endpointurl",
            f"http://127.0.0.1:{free_port()}",
        ],
        cwd=root,
        check=True,
        capture_output=True,
    )
    out = doctor(root, env, "--json")
    assert out.returncode == 1
    check = by_name(json.loads(out.stdout))["DVC remote"]
    assert check["status"] == "fail" and "unreachable" in check["detail"], check
    assert secret not in out.stdout + out.stderr
    # The same remote with the credentials gone from DVC's config is probed, and fails.
    subprocess.run(
        [str(BIN / "dvc"), "remote", "modify", "--local", "--unset", "bucket", "access_key_id"],
        cwd=root,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [str(BIN / "dvc"), "remote", "modify", "--local", "--unset", "bucket", "secret_access_key"],
        cwd=root,
        check=True,
        capture_output=True,
    )
    out = doctor(root, env, "--json")
    assert out.returncode == 1
    check = by_name(json.loads(out.stdout))["DVC remote"]
    assert check["status"] == "fail" and "no credentials" in check["detail"], check
