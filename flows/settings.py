"""Where things live: the one place that says which services and stores the flows use.

Every setting is an environment variable with a default that works offline on one machine:

| variable | default (offline) | what it says |
| --- | --- | --- |
| `SAEV_PARAMS` | `params.yaml` | the params file every flow and deployment reads |
| `MLFLOW_TRACKING_URI` | `sqlite:///<root>/mlruns/mlflow.db` | MLflow backend, or `http://host:5000` |
| `PREFECT_API_URL` | unset: a temporary local server per process | a Prefect server (`http://host:4200/api`) |
| `SAEV_DVC_REMOTE` | unset: the repository's default remote (`dvc remote default`), if any | the DVC remote scheduled runs push to |
| `SAEV_GPU_POOL` | `gpu` | work pool for tasks that need a GPU (training, extraction) |
| `SAEV_CPU_POOL` | `local` | process work pool for everything else, and the GPU work when no GPU pool exists |
| `SAEV_OBJECT_STORE` | unset | `s3://bucket/prefix`: the bucket `saev doctor` checks (reachable, writable), with `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_ENDPOINT_URL` for a non-AWS store |
| `SAEV_ZOMBIE_AFTER_S` | `90` | seconds without a heartbeat before a distributed piece's flow run is marked Crashed (`flows/deploy.py`, `flows/distributed.py`) |
| `SAEV_FANOUT_TIMEOUT_S` | `86400` | how long a distributed stage waits for its pieces (`flows/distributed.py`) |
| `SAEV_MIN_FREE_GB` | `10` | free disk below which `saev doctor` warns about the shard directory |
| `SAEV_CACHE_DIR` | `$XDG_CACHE_HOME/saev-flow` or `~/.cache/saev-flow` | the weights' sha256 cache; read by `saev_core/hashing.py` itself |

Paths of stage outputs (shards, checkpoints, the warehouse `warehouse.db`) stay in `params.yaml`,
because `dvc.yaml` reads them from there to know what to version.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_GPU_POOL = "gpu"
DEFAULT_CPU_POOL = "local"
GPU_TAG = "gpu"
"""Prefect tag on every task that wants a GPU; `prefect concurrency-limit create gpu 1` then
keeps two of them off one card."""


@dataclass(frozen=True)
class Settings:
    """The effective configuration, read from the environment (see the module docstring)."""

    params: str
    """The params file."""
    mlflow_tracking_uri: str
    """Where MLflow runs go."""
    prefect_api_url: str | None
    """The Prefect API, or None for a temporary local server."""
    dvc_remote: str | None
    """The DVC remote to push to by name, or None for the repository's default remote."""
    gpu_pool: str
    """Work pool for GPU work."""
    cpu_pool: str
    """Process work pool for CPU work (and the GPU fallback)."""
    min_free_gb: float
    """Disk space the doctor asks for next to the shards."""
    root: str
    """The project directory (the current directory)."""

    def as_dict(self) -> dict:
        return asdict(self)


def default_tracking_uri(root: Path) -> str:
    """MLflow on sqlite under `mlruns/` of the project (DESIGN.md)."""
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


def load(root: str | Path | None = None) -> Settings:
    """The settings of this process, from the environment and its defaults."""
    root = Path(root or Path.cwd()).resolve()
    env = os.environ
    return Settings(
        params=env.get("SAEV_PARAMS", "params.yaml"),
        mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root),
        prefect_api_url=env.get("PREFECT_API_URL") or _prefect_profile_api_url(),
        dvc_remote=env.get("SAEV_DVC_REMOTE") or None,
        gpu_pool=env.get("SAEV_GPU_POOL", DEFAULT_GPU_POOL),
        cpu_pool=env.get("SAEV_CPU_POOL", DEFAULT_CPU_POOL),
        min_free_gb=float(env.get("SAEV_MIN_FREE_GB", "10")),
        root=str(root),
    )


def _prefect_profile_api_url() -> str | None:
    """`PREFECT_API_URL` from the active Prefect profile (`prefect config set`), if any."""
    try:
        from prefect.settings import PREFECT_API_URL

        return PREFECT_API_URL.value() or None
    except Exception:  # prefect not importable or its profile unreadable: say "unset"
        return None
