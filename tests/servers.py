"""Real servers for tests: a Prefect server, a Prefect worker, a lean MLflow tracking server and
an S3-compatible object store (moto's server mode) on loopback, each in its own process group and
stopped by its PID (SIGTERM, then SIGKILL) when the test ends, failed or not. Every process writes
its output to a log file that a failing test shows."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process in a new session (its own process group), logging to `log`."""

    def __init__(self, cmd: list[str], log: Path, env: dict, cwd: Path | None = None):
        self.cmd, self.log = cmd, log
        self._out = log.open("wb")
        self.popen = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `grace` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; children of a worker (flow runs) may linger a moment.
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        self._out.close()

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def wait_http(url: str, proc: Proc, timeout: float = 90.0) -> float:
    """Poll `url` until it answers 200; seconds it took. Fails early if `proc` died."""
    start = time.time()
    while time.time() - start < timeout:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.cmd[:3]} exited {proc.popen.returncode}:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.time() - start
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout} s:\n{proc.tail()}")


def base_env(home: Path) -> dict:
    """An environment for server and worker processes: quiet, offline, one thread."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    env.pop("PREFECT_API_URL", None)
    return env


def start_prefect_server(home: Path, request) -> tuple[str, Proc]:
    """`prefect server start --host 127.0.0.1` on a free port (scheduler off: runs are
    triggered by the test, never by the clock)."""
    port = free_port()
    env = {**base_env(home), "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    proc = Proc(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        home / "prefect-server.log",
        env,
    )
    request.addfinalizer(proc.stop)
    return f"http://127.0.0.1:{port}/api", proc


def start_mlflow_server(
    home: Path, request, artifacts: str | None = None, env: dict | None = None
) -> tuple[str, Proc]:
    """The lean MLflow tracking server of STACK.md: one worker, no job execution, sqlite.
    `artifacts` is where it stores the artifacts it proxies (default: `home/mlflow-artifacts`;
    `s3://bucket/prefix` with a `MotoServer`'s `env` in `env`)."""
    port = free_port()
    proc = Proc(
        [
            str(BIN / "mlflow"),
            "server",
            "--workers",
            "1",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{home / 'mlflow-server.db'}",
            "--artifacts-destination",
            artifacts or str(home / "mlflow-artifacts"),
        ],
        home / "mlflow-server.log",
        {**base_env(home), **(env or {})},
    )
    request.addfinalizer(proc.stop)
    return f"http://127.0.0.1:{port}", proc


# Fake credentials for the loopback object store: moto accepts any, and the clients (boto3, s3fs,
# dvc-s3, MLflow) refuse to sign a request without some.
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoServer:
    """moto's S3 server (`moto_server -H 127.0.0.1 -p PORT`) with one bucket, in memory.

    `start()` returns the endpoint url once the server answers and the bucket exists; `env` holds
    what a client process needs to reach it (fake credentials, `AWS_ENDPOINT_URL`, which boto3,
    s3fs and dvc-s3 read, and `MLFLOW_S3_ENDPOINT_URL` for MLflow); `stop()` ends it by its PID
    and is safe to call twice. The log is `home/moto-server.log`; `tail()` shows it."""

    def __init__(self, home: Path, bucket: str = "saev"):
        self.home, self.bucket = Path(home), bucket
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: Proc | None = None

    @property
    def env(self) -> dict:
        return {
            **FAKE_AWS,
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def start(self, timeout: float = 60.0) -> str:
        env = {**os.environ, **self.env}
        self.proc = Proc(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            self.home / "moto-server.log",
            env,
        )
        wait_http(f"{self.endpoint}/moto-api/data.json", self.proc, timeout)
        if self.bucket:
            self.client().create_bucket(Bucket=self.bucket)
        return self.endpoint

    def client(self):
        """A boto3 S3 client on this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
            region_name=FAKE_AWS["AWS_DEFAULT_REGION"],
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under `prefix`, sorted."""
        pages = (
            self.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.bucket, Prefix=prefix)
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def tail(self, n: int = 3000) -> str:
        return self.proc.tail(n) if self.proc else ""

    def stop(self) -> None:
        if self.proc is not None and not self.proc._out.closed:
            self.proc.stop(grace=5.0)
