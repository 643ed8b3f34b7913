"""`saev doctor`: what is configured, what answers and what does not, in plain words.

Reads the settings (`flows/settings.py`) and the params file, then checks each service the way
a flow would meet it: the Prefect API and its work pools, the MLflow tracking store, the DVC
remote, the object store (`SAEV_OBJECT_STORE`, and a DVC remote on S3: endpoint, bucket, reachable,
writable), the GPU, and the free disk next to the shards. Services are probed over HTTP, the
`dvc` command line and boto3, with short timeouts, so a dead server costs seconds, not minutes.
An S3 DVC remote whose credentials, profile or region live in DVC's own config (`dvc remote
modify --local NAME access_key_id ...`) is probed with those, as DVC would meet the store; the
secrets are never printed.
Exit status 1 when something configured does not work, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from flows import settings
from saev_core import object_store

TIMEOUT_S = 3.0


@dataclass
class Check:
    """One line of the report."""

    name: str
    """What was checked."""
    status: str
    """'ok', 'info' (fine, but worth knowing) or 'fail'."""
    detail: str
    """What was found, in words."""


def _get(url: str, data: bytes | None = None) -> tuple[int, str]:
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
        return r.status, r.read().decode(errors="replace")


def _why(e: Exception) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return str(e.reason)
    return str(e)


def check_prefect(cfg: settings.Settings) -> list[Check]:
    url = cfg.prefect_api_url
    if not url:
        return [
            Check(
                "Prefect API",
                "info",
                "PREFECT_API_URL is not set: each flow starts a temporary local server (fine on "
                "one machine). Schedules and work pools need a server: `prefect server start`, "
                "then export PREFECT_API_URL=http://127.0.0.1:4200/api",
            )
        ]
    try:
        _get(f"{url}/health")
        _, version = _get(f"{url}/admin/version")
    except Exception as e:
        return [Check("Prefect API", "fail", f"{url} does not answer: {_why(e)}")]
    out = [Check("Prefect API", "ok", f"{url} answers (server {version.strip(chr(34))})")]
    try:
        _, body = _get(f"{url}/work_pools/filter", data=b"{}")
        pools = {p["name"]: p for p in json.loads(body)}
    except Exception as e:
        return out + [Check("work pools", "fail", f"cannot list them: {_why(e)}")]
    for name, role in ((cfg.cpu_pool, "local process pool"), (cfg.gpu_pool, "GPU pool")):
        pool = pools.get(name)
        if pool is None:
            what = (
                "missing: `saev deploy` creates it"
                if name == cfg.cpu_pool
                else "missing: GPU work runs on the local process pool (start one with "
                "`saev worker --gpu` on a GPU machine)"
            )
            out.append(Check(f"work pool {name!r}", "info", f"{role} {what}"))
        else:
            ready = _workers_online(url, name) > 0
            out.append(
                Check(
                    f"work pool {name!r}",
                    "ok" if ready else "info",
                    f"{role}, type {pool['type']}, "
                    + ("a worker is online" if ready else "no worker online: `saev worker`"),
                )
            )
    return out


def _workers_online(url: str, pool: str) -> int:
    """Workers of `pool` whose heartbeat the server counts as online."""
    try:
        _, body = _get(f"{url}/work_pools/{pool}/workers/filter", data=b"{}")
    except Exception:
        return 0
    return sum(w.get("status") == "ONLINE" for w in json.loads(body))


def check_mlflow(cfg: settings.Settings) -> list[Check]:
    uri = cfg.mlflow_tracking_uri
    if uri.startswith(("http://", "https://")):
        try:
            _get(f"{uri.rstrip('/')}/health")
            return [Check("MLflow", "ok", f"tracking server {uri} answers")]
        except Exception as e:
            return [Check("MLflow", "fail", f"tracking server {uri} does not answer: {_why(e)}")]
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        parent = next((p for p in [db.parent, *db.parent.parents] if p.exists()), None)
        if db.exists() or (parent is not None and _writable(parent)):
            state = "exists" if db.exists() else "will be created on the first run"
            return [Check("MLflow", "ok", f"sqlite store {db} ({state})")]
        return [Check("MLflow", "fail", f"sqlite store {db}: its directory is not writable")]
    return [Check("MLflow", "info", f"tracking URI {uri} is set; not probed (not http or sqlite)")]


def _writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK)


def _dvc(args: list[str], root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("dvc")
    return subprocess.run(
        [str(exe) if exe.exists() else "dvc", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )


# An S3 remote's own credentials and region (`dvc remote modify [--local] NAME KEY VALUE`).
DVC_S3_CREDENTIALS = (
    "access_key_id",
    "secret_access_key",
    "session_token",
    "profile",
    "credentialpath",
    "configpath",
    "region",
)


def dvc_config(root: Path) -> dict[str, str]:
    """Every DVC setting in effect in `root`: system, global, `.dvc/config` and
    `.dvc/config.local` merged, the later winning, as `dvc config --list` prints them ({} when
    it fails). One call: each `dvc` start costs most of a second."""
    found = _dvc(["config", "--list"], root)
    if found.returncode != 0:
        return {}
    config = {}
    for line in found.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            config[key.strip()] = value.strip()
    return config


def check_dvc(cfg: settings.Settings) -> list[Check]:
    root = Path(cfg.root)
    if not (root / ".dvc").is_dir():
        return [Check("DVC", "fail", f"{root} is not a DVC repository (`dvc init`)")]
    config = dvc_config(root)
    name = cfg.dvc_remote or config.get("core.remote", "")
    if not name:
        return [
            Check(
                "DVC remote",
                "info",
                "none configured: outputs are versioned in the local cache only; add one "
                "with `dvc remote add -d shared /path/or/s3://bucket/saev`",
            )
        ]
    remote = {
        key.removeprefix(f"remote.{name}."): value
        for key, value in config.items()
        if key.startswith(f"remote.{name}.")
    }
    url = remote.get("url", "")
    if not url:
        return [Check("DVC remote", "fail", f"remote {name!r} is not defined (`dvc remote list`)")]
    if object_store.is_url(url):
        # The remote's own credentials, profile or region, as DVC would use them (never printed).
        own = {key: remote[key] for key in DVC_S3_CREDENTIALS if remote.get(key)}
        lead = f"{name!r} = "
        check = _probe_check("DVC remote", url, remote.get("endpointurl") or None, lead, own)
        if own:
            check.detail += f" (with DVC config's {', '.join(own)})"
        return [check]
    if "://" in url and not url.startswith("file://"):
        return [
            Check(
                "DVC remote",
                "info",
                f"{name!r} = {url}: not probed (credentials); `dvc status -c` checks it",
            )
        ]
    path = Path(url.removeprefix("file://"))
    path = path if path.is_absolute() else (root / ".dvc" / path).resolve()
    if path.is_dir() and _writable(path):
        return [Check("DVC remote", "ok", f"{name!r} = {path}, a writable directory")]
    parent = next((p for p in path.parents if p.exists()), None)
    if not path.exists() and parent is not None and parent.is_dir() and _writable(parent):
        return [Check("DVC remote", "ok", f"{name!r} = {path}, created by the first push")]
    return [Check("DVC remote", "fail", f"{name!r} = {path}: not a writable directory")]


def check_object_store() -> list[Check]:
    """The bucket `SAEV_OBJECT_STORE` names, at the endpoint the AWS variables name."""
    url = os.environ.get(object_store.OBJECT_STORE_ENV, "").strip()
    if not url:
        return [
            Check(
                "object store",
                "info",
                f"{object_store.OBJECT_STORE_ENV} is not set: nothing to check (fine on one "
                "machine). For several machines set it to s3://bucket/prefix, with "
                "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and, for a server other than AWS, "
                "AWS_ENDPOINT_URL",
            )
        ]
    if not object_store.is_url(url):
        return [
            Check(
                "object store",
                "fail",
                f"{object_store.OBJECT_STORE_ENV}={url!r} is not an s3://bucket/prefix URL",
            )
        ]
    return [_probe_check("object store", url, None)]


def _probe_check(
    name: str, url: str, endpoint: str | None, lead: str = "", settings: dict | None = None
) -> Check:
    """One line from `object_store.probe`: endpoint, bucket, reachable, writable. `settings`: a
    DVC remote's own credentials (`object_store.session`)."""
    try:
        p = object_store.probe(url, endpoint, timeout=TIMEOUT_S, settings=settings)
    except Exception as e:  # a malformed URL or endpoint: say it, do not crash the report
        return Check(name, "fail", f"{lead}{url}: cannot probe it: {e}")
    where = f"endpoint {p.endpoint or 'AWS S3 (AWS_ENDPOINT_URL not set)'}, bucket {p.bucket!r}"
    if p.problem is None:
        return Check(name, "ok", f"{lead}{url}: {where}: reachable, writable (probe put, deleted)")
    if not p.credentials:
        state, hint = "not probed", ""
    elif not p.reachable:
        state, hint = "unreachable", " (is the server running? AWS_ENDPOINT_URL names it)"
    elif not p.bucket_exists:
        state, hint = "reachable, bucket missing", " (create it, or name another bucket)"
    else:
        state, hint = "reachable, bucket present, not writable", " (check the credentials' rights)"
    return Check(name, "fail", f"{lead}{url}: {where}: {state}: {p.problem}{hint}")


def check_gpu() -> list[Check]:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return [Check("GPU", "ok", f"{len(names)} CUDA device(s): {', '.join(names)}")]
    smi = "present" if shutil.which("nvidia-smi") else "absent"
    return [
        Check(
            "GPU",
            "info",
            f"no CUDA device (torch {torch.__version__}, nvidia-smi {smi}): flows run on the CPU",
        )
    ]


def check_disk(cfg: settings.Settings) -> list[Check]:
    from saev_core.config import read_params

    try:
        params = read_params(Path(cfg.root) / cfg.params)
    except (FileNotFoundError, ValueError) as e:
        return [Check("params", "fail", str(e))]
    out_dir = Path(cfg.root) / params.get("extract", {}).get("out_dir", "artifacts")
    where = next(p for p in [out_dir, *out_dir.parents] if p.exists())
    free_gb = shutil.disk_usage(where).free / 1e9
    ok = free_gb >= cfg.min_free_gb
    checks = [
        Check(
            "disk",
            "ok" if ok else "fail",
            f"{free_gb:,.1f} GB free at {where} for the shards in {out_dir.name}/ "
            f"({'at least' if ok else 'below'} SAEV_MIN_FREE_GB={cfg.min_free_gb:g})",
        )
    ]
    db = params.get("warehouse", {}).get("db")
    if db:
        state = "exists" if (Path(cfg.root) / db).exists() else "not built yet (`saev warehouse`)"
        checks.append(Check("warehouse", "info", f"{db}: {state}"))
    return checks


def run_checks(cfg: settings.Settings | None = None) -> list[Check]:
    """Every check, in the order of the report."""
    cfg = cfg or settings.load()
    return [
        *check_prefect(cfg),
        *check_mlflow(cfg),
        *check_dvc(cfg),
        *check_object_store(),
        *check_gpu(),
        *check_disk(cfg),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="saev doctor",
        description="Report the configuration (environment variables, see flows/settings.py) "
        "and whether the services it names answer. Exit status 1 if something fails.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)
    cfg = settings.load()
    checks = run_checks(cfg)
    if args.json:
        print(json.dumps({"settings": cfg.as_dict(), "checks": [asdict(c) for c in checks]}))
    else:
        print("configuration (environment, defaults in flows/settings.py):")
        for key, value in cfg.as_dict().items():
            print(f"  {key:<20} {value if value is not None else '(not set)'}")
        print()
        for c in checks:
            print(f"  {c.status.upper():<5} {c.name:<18} {c.detail}")
        failed = [c.name for c in checks if c.status == "fail"]
        print()
        print(f"not working: {', '.join(failed)}" if failed else "everything configured answers")
    return 1 if any(c.status == "fail" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
