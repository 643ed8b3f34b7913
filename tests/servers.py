"""Real servers for tests: a Prefect server, a Prefect worker and a lean MLflow tracking server on
loopback, each in its own process group and stopped by its PID (SIGTERM, then SIGKILL) when the
test ends, failed or not. Every process writes its output to a log file that a failing test
shows."""

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


def start_mlflow_server(home: Path, request) -> tuple[str, Proc]:
    """The lean MLflow tracking server of STACK.md: one worker, no job execution, sqlite."""
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
            str(home / "mlflow-artifacts"),
        ],
        home / "mlflow-server.log",
        base_env(home),
    )
    request.addfinalizer(proc.stop)
    return f"http://127.0.0.1:{port}", proc
