"""What every flow shares: the params file, the MLflow run, and provenance tags.

Configuration comes from environment variables with offline defaults:
- `SAEV_PARAMS` (default `params.yaml`): the params file;
- `MLFLOW_TRACKING_URI` (default `sqlite:///<root>/mlruns/mlflow.db`; artifacts then go to
  `mlruns/<experiment id>/`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path.cwd()


def params_path() -> Path:
    return Path(os.environ.get("SAEV_PARAMS", "params.yaml"))


def parse_args(stage: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The command line every stage flow accepts."""
    p = argparse.ArgumentParser(
        prog=f"saev {stage}",
        description=f"Run the `{stage}` stage as a Prefect flow, with the `{stage}` section of "
        "the params file (the same code `dvc repro` runs).",
    )
    p.add_argument(
        "--params", default=str(params_path()), help="params file (default: %(default)s)"
    )
    return p.parse_args(argv)


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    (ROOT / "mlruns").mkdir(exist_ok=True)
    return f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=ROOT
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=ROOT,
        ).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_version() -> str:
    """The DVC hash of the input corpus, from `data.dvc` (or 'untracked')."""
    path = ROOT / "data.dvc"
    if not path.exists():
        return "untracked"
    import yaml

    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "untracked"))


def file_sha256(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        return "missing"
    return hashlib.sha256(p.read_bytes()).hexdigest()


@contextlib.contextmanager
def mlflow_run(
    experiment: str, run_name: str, tags: dict[str, str] | None = None, nested: bool = False
) -> Iterator[Any]:
    """Open an MLflow run tagged with the git commit and the data version."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(experiment)
    all_tags = {"git_commit": git_commit(), "data_version": data_version(), **(tags or {})}
    with mlflow.start_run(
        experiment_id=exp_id, run_name=run_name, tags=all_tags, nested=nested
    ) as run:
        yield run


def mlflow_logger(prefix: str = ""):
    """A `log(metrics, step)` callback for saev_core that writes to the active MLflow run."""
    import mlflow

    def log(metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics({prefix + k: float(v) for k, v in metrics.items()}, step=step)

    return log


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """A DVC metrics file (JSON), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
