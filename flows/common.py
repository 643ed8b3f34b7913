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
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path.cwd()


def params_path() -> Path:
    return Path(os.environ.get("SAEV_PARAMS", "params.yaml"))


def parse_args(
    stage: str,
    argv: list[str] | None = None,
    overrides: bool = False,
    extra: Callable[[argparse.ArgumentParser], Any] | None = None,
) -> argparse.Namespace:
    """The command line every stage flow accepts; `overrides` adds `-S KEY=VALUE` (every stage
    flow passes it; `args.overrides` is then `{key: YAML value}` for `load_section`), `extra`
    adds a stage's own options."""
    p = argparse.ArgumentParser(
        prog=f"saev {stage}",
        description=f"Run the `{stage}` stage as a Prefect flow, with the `{stage}` section of "
        "the params file (the same code `dvc repro` runs).",
    )
    p.add_argument(
        "--params", default=str(params_path()), help="params file (default: %(default)s)"
    )
    if overrides:
        p.add_argument(
            "-S",
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"override one key of the `{stage}` section of the params file for this run "
            "(VALUE is YAML; a dotted KEY reaches into a mapping and keeps its other keys, e.g. "
            "-S sae.k=32 -S 'layers=[-2, -1]' -S out_dir=artifacts/x, while -S 'sweep={}' "
            "replaces the whole mapping); repeatable; an unknown key is an error that lists the "
            "valid ones",
        )
    if extra:
        extra(p)
    args = p.parse_args(argv)
    if overrides:
        args.overrides = _parse_sets(p, args.set)
    return args


def _parse_sets(parser: argparse.ArgumentParser, sets: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"-S expects KEY=VALUE, got {item!r}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            parser.error(f"-S {item}: the value is not valid YAML ({e})")
        # YAML 1.1 (PyYAML) reads 1e-3 as a string; on the command line it means the number
        # (a quoted '1e-3' stays a string: the raw text, quotes included, is what is matched).
        if isinstance(parsed, str) and _EXPONENT.fullmatch(value.strip()):
            parsed = float(parsed)
        out[key.strip()] = parsed
    return out


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def stage_main(
    stage: str,
    argv: list[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], Any] | None = None,
    check: Callable[[argparse.Namespace], Any] | None = None,
    **flow_options: Callable[[argparse.Namespace], Any],
) -> int:
    """`saev <stage>` (and `python -m flows.<stage>`, what dvc.yaml runs): parse the command
    line, then run the stage's flow from the registry (saev_core/registry.py) with the params
    file and the `-S` settings. `extra` adds the stage's own options, `check` runs before the
    flow (to fail in a second, before a temporary Prefect server starts), and each of
    `flow_options` maps a flow keyword to a function of the parsed arguments."""
    from saev_core.registry import stage as registered

    args = parse_args(stage, argv, overrides=True, extra=extra)
    if check is not None:
        check(args)
    options = {key: value(args) for key, value in flow_options.items()}
    registered(stage).flow_function()(params=args.params, overrides=args.overrides, **options)
    return 0


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


# The experiment tag MLflow 3's UI reads for an experiment's kind (its "Machine learning" /
# "GenAI apps & agents" selector writes it); every experiment here is a model-training one.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def ensure_experiment(name: str) -> str:
    """The id of MLflow experiment `name`, created as a model-training experiment; one created
    before without a kind (an older version of this code) gets it."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        return mlflow.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    if EXPERIMENT_KIND_TAG not in exp.tags:
        mlflow.MlflowClient().set_experiment_tag(
            exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING
        )
    return exp.experiment_id


# A saved view of the runs table is this experiment tag + its key; the UI opens it from the
# `viewStateShareKey` parameter of the address (MLflow 3.17's "Views" menu writes the same)
RUNS_VIEW_TAG = "mlflow.sharedViewState."


def save_runs_view(
    experiment_id: str,
    key: str,
    name: str,
    metrics: Sequence[str] = (),
    params: Sequence[str] = (),
    tags: Sequence[str] = (),
) -> None:
    """Store a saved view `name` of the experiment's runs table that shows these metrics,
    params and tags as columns (the UI's default shows none of them). `runs_table_url(...,
    view=key)` opens it."""
    import mlflow

    columns = [f"{kind}.`{k}`" for kind, keys in (("metrics", metrics), ("params", params),
                                                  ("tags", tags)) for k in keys]  # fmt: skip
    now = int(time.time() * 1000)
    state = json.dumps({"selectedColumns": columns})
    value = json.dumps({"name": name, "createdAt": now, "updatedAt": now, "state": state})
    if len(value) > 5000:  # MLflow's limit on an experiment tag's value
        print(f"MLflow: {len(columns)} columns do not fit in saved view {name!r}; not saved")
        return
    mlflow.MlflowClient().set_experiment_tag(experiment_id, RUNS_VIEW_TAG + key, value)


def runs_table_url(experiment_id: str, base: str | None = None, view: str | None = None) -> str:
    """The address of an experiment's runs table in the MLflow UI at `base` (an http tracking
    URI, else the `make mlflow-ui` address), in saved view `view` when given. MLflow 3.17's UI
    opens an experiment on whatever its sidebar's workflow switch says (GenAI by default: the
    overview of traces), whatever the experiment's kind tag: `workflowType=machine_learning` in
    the address sets it."""
    uri = base or tracking_uri()
    root = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    url = f"{root}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return url + (f"&viewStateShareKey={view}" if view else "")


@contextlib.contextmanager
def mlflow_run(
    experiment: str, run_name: str, tags: dict[str, str] | None = None, nested: bool = False
) -> Iterator[Any]:
    """Open an MLflow run tagged with the git commit and the data version, in experiment
    `experiment` (created as a model-training one: `ensure_experiment`)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    exp_id = ensure_experiment(experiment)
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


def write_metrics(path: str | Path, metrics: dict[str, Any], overrides: Any = None) -> None:
    """A DVC metrics file (JSON), written atomically. The metrics files belong to the run that
    `params.yaml` defines: a run with `-S` overrides leaves them as they are (its figures go to
    its own outputs and MLflow), so a variant tried by hand cannot pass for the pipeline's."""
    path = Path(path)
    if overrides:
        print(f"{path} left as it is: this run has -S overrides ({', '.join(overrides)})")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the `dvc` CLI of this environment; raise with its own message when it fails."""
    exe = Path(sys.executable).with_name("dvc")
    out = subprocess.run(
        [str(exe) if exe.exists() else "dvc", *args], cwd=cwd, capture_output=True, text=True
    )
    if check and out.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed:\n{out.stderr.strip() or out.stdout}")
    return out


def dvc_version(path: str | Path, push: bool = True) -> dict[str, Any]:
    """Hand `path` (a stage's output) to DVC and push it when a default remote is configured.

    - Under `dvc repro` (DVC sets `DVC_STAGE`) DVC records the output itself: nothing to do.
    - If a `dvc.yaml` stage lists `path` as an output: `dvc commit -f <stage>` (dvc.lock updated).
    - Otherwise: `dvc add <path>` (writes `<path>.dvc` for git).
    Outside a DVC repository nothing happens and the result says so.
    """
    path = Path(path).resolve()
    root = next((p for p in [path, *path.parents] if (p / ".dvc").is_dir()), None)
    if os.environ.get("DVC_STAGE"):
        return {"action": "none", "reason": f"inside `dvc repro` stage {os.environ['DVC_STAGE']}"}
    if root is None:
        return {"action": "none", "reason": f"{path} is not inside a DVC repository"}
    rel = str(path.relative_to(root))
    stage = _stage_with_output(root, rel)
    if stage:
        _dvc("commit", "-f", "-q", stage, cwd=root)
        result: dict[str, Any] = {"action": "commit", "target": stage}
    else:
        _dvc("add", "-q", rel, cwd=root)
        result = {"action": "add", "target": f"{rel}.dvc"}
    remote = push_remote(root) if push else None
    if remote:
        _dvc("push", "-q", "-r", remote, result["target"], cwd=root)
        result["pushed_to"] = remote
    return result


def push_remote(root: str | Path) -> str | None:
    """The DVC remote outputs are pushed to: `$SAEV_DVC_REMOTE`, else the default, else None."""
    if os.environ.get("SAEV_DVC_REMOTE"):
        return os.environ["SAEV_DVC_REMOTE"]
    # `dvc remote default` prints the name, or fails when none is set.
    default = _dvc("remote", "default", cwd=Path(root), check=False)
    return default.stdout.strip() or None if default.returncode == 0 else None


def _stage_with_output(root: Path, rel: str) -> str | None:
    """The name of the `dvc.yaml` stage that lists `rel` among its outputs, if any."""
    from dvc.exceptions import OutputNotFoundError
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        try:
            outs = repo.find_outs_by_path(str(root / rel))
        except OutputNotFoundError:
            return None
        stages = [o.stage for o in outs if getattr(o.stage, "name", None)]
        return stages[0].name if stages else None


# ---------------------------------------------------------------------------------------------
# Running as a service: provenance tags, versioning of what a run wrote, where a run runs


def provenance() -> dict[str, str]:
    """The git commit of the code and the DVC hash of the input corpus."""
    return {"git_commit": git_commit(), "data_version": data_version()}


def tag_flow_run(tags: dict[str, str]) -> list[str]:
    """Add `key:value` tags to the running Prefect flow run (none outside a flow run)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return []
    new = [f"{k}:{v}" for k, v in tags.items()]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        client.update_flow_run(run.id, tags=sorted(set(run.tags) | set(new)))
    return new


def version_outputs(paths: list[str | Path]) -> list[dict[str, Any]]:
    """`dvc_version` for several outputs at once (those that exist), with one `dvc commit`, one
    `dvc add` and one `dvc push`: each `dvc` call costs a second or two of start-up."""
    paths = [Path(p).resolve() for p in paths if Path(p).exists()]
    if not paths:
        return []
    if os.environ.get("DVC_STAGE"):
        return [{"action": "none", "reason": f"inside `dvc repro` stage {os.environ['DVC_STAGE']}"}]
    root = next((p for p in [paths[0], *paths[0].parents] if (p / ".dvc").is_dir()), None)
    if root is None:
        return [{"action": "none", "reason": f"{paths[0]} is not inside a DVC repository"}]
    results: list[dict[str, Any]] = []
    for path in paths:
        rel = str(path.relative_to(root))
        stage = _stage_with_output(root, rel)
        results.append(
            {"action": "commit", "target": stage}
            if stage
            else {"action": "add", "target": f"{rel}.dvc", "path": rel}
        )
    commits = list(dict.fromkeys(r["target"] for r in results if r["action"] == "commit"))
    adds = [r.pop("path") for r in results if r["action"] == "add"]
    if commits:
        _dvc("commit", "-f", "-q", *commits, cwd=root)
    if adds:
        _dvc("add", "-q", *adds, cwd=root)
    remote = push_remote(root)
    if remote:
        _dvc("push", "-q", "-r", remote, *commits, *[f"{a}.dvc" for a in adds], cwd=root)
        for r in results:
            r["pushed_to"] = remote
    return results


def version_outputs_task(paths: list[str | Path]) -> list[dict[str, Any]]:
    """`version_outputs` as a Prefect task, retried: pushing to a remote is I/O."""
    from prefect import task

    return task(version_outputs, name="version_outputs", retries=2, retry_delay_seconds=10)(paths)


def placement(needs_gpu: bool) -> str:
    """One line saying where this flow run runs and whether that is what it needs."""
    import torch

    from flows import settings

    cfg = settings.load()
    pool = _work_pool_of_this_run()
    cuda = torch.cuda.is_available()
    device = f"CUDA ({torch.cuda.get_device_name(0)})" if cuda else "CPU only"
    if pool is None:
        return f"running in this process, not from a work pool; device: {device}"
    if not needs_gpu:
        return f"running on work pool {pool!r}; device: {device}"
    if pool == cfg.gpu_pool:
        warn = "" if cuda else " - but this worker sees no CUDA device: check its drivers"
        return f"running on GPU work pool {pool!r}; device: {device}{warn}"
    exists = _work_pool_exists(cfg.gpu_pool)
    why = (
        f"no GPU work pool {cfg.gpu_pool!r} exists"
        if not exists
        else f"GPU work pool {cfg.gpu_pool!r} appeared after this deployment was made "
        "(run `saev deploy` again to move it there)"
    )
    return f"this flow wants a GPU, but {why}: running on local process pool {pool!r}; device: {device}"


def _work_pool_of_this_run() -> str | None:
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return None
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).work_pool_name


def _work_pool_exists(name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return True
        except ObjectNotFound:
            return False
