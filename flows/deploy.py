"""Deployments and work pools: saev-flow as a service on a Prefect server.

Three deployments; each stores only the path of the params file, so every run reads its stage
parameters from `params.yaml` as it is then (nothing is copied into the deployment):

| deployment | flow | schedule | needs |
| --- | --- | --- | --- |
| `saev-pipeline` | `pipeline` (version=True) | cron `$SAEV_CRON`, default 03:00 daily | GPU |
| `saev-refresh` | `refresh`: new images in `extract.data` -> shards -> stats -> warehouse | every `$SAEV_WATCH_EVERY` s (600) | GPU |
| `saev-sweep` | `sweep` from `flows/sweep.py` when it exists, else `train` | none: run by hand | GPU |

    saev deploy                 register them (GPU pool if it exists, else the local process pool)
    saev worker                 a process worker for the local pool (`$SAEV_CPU_POOL`, `local`)
    saev worker --gpu           on a GPU machine: create the `gpu` pool and start its worker
    saev serve                  no server needed: serve the pipeline's schedule from this process

A deployment that wants a GPU goes to the GPU pool (`$SAEV_GPU_POOL`, `gpu`) when that pool
exists on the server, else to the local process pool; the run then says so in its first log line.
Runs execute in the project directory (`--workdir`, default the current one) and carry the
tracking settings that were set when deploying (`MLFLOW_TRACKING_URI`, `SAEV_DVC_REMOTE`, ...).

Two more deployments take the pieces of a fanned-out stage, one flow run each
(flows/distributed.py): `extract-partition/saev-extract-partition` (`saev extract --partitions N
--distributed`) and `train-member/saev-train-member` (`train.sweep.distribute: true`). The stage
registers them itself before submitting (`ensure_fanout`), on the GPU pool when it exists. Their
runs, tagged `saev-fan-out`, send a heartbeat every 30 s (Prefect's minimum; other runs keep
Prefect's 180 s), and the automation `ZOMBIE_AUTOMATION` marks such a run Crashed once none came
for `$SAEV_ZOMBIE_AFTER_S` s (90): Prefect's zombie-run detection, which lets the fanned-out stage
submit again a piece whose machine died. (A run still Pending after as long, which never sent a
heartbeat, is crashed by the waiting stage itself: flows/distributed.py.)

The automation is one object on the server, global to it: it watches every `saev-fan-out` run,
whoever submitted it, and every caller of `saev deploy` or of a fanned-out stage rewrites it with
its own `$SAEV_ZOMBIE_AFTER_S` (the last writer wins, for all runs in flight). Set the variable to
one value for the whole team (in the environment of every machine that submits) rather than per
run; a value close to the 30 s between heartbeats crashes live runs whose beat comes late (a
loaded machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows import settings

DEFAULT_CRON = "0 3 * * *"
DEFAULT_WATCH_EVERY_S = 600
# Settings a flow run needs to see as the deploying shell saw them (flows/settings.py).
FORWARDED_ENV = (
    "SAEV_PARAMS",
    "MLFLOW_TRACKING_URI",
    "SAEV_DVC_REMOTE",
    "SAEV_GPU_POOL",
    "SAEV_CPU_POOL",
    "SAEV_STAGING_URL",
    "HF_HUB_OFFLINE",
    "HF_HOME",
)
HEARTBEAT_S = 30
"""Seconds between a fan-out piece's heartbeats (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY`, whose
minimum this is)."""
DEFAULT_ZOMBIE_AFTER_S = 90
"""A running flow run without a heartbeat for this long is marked Crashed (three heartbeats, as
in Prefect's zombie-flow guide); `$SAEV_ZOMBIE_AFTER_S` overrides it."""
ZOMBIE_AUTOMATION = "saev: crash zombie flow runs"
FANOUT_TAG = "saev-fan-out"
"""Tag of every fan-out piece's flow run: the zombie automation watches only these."""


@dataclass(frozen=True)
class Spec:
    """One deployment: which flow, when, with which parameters, and whether it wants a GPU."""

    name: str
    """Deployment name (`prefect deployment run <flow>/<name>`)."""
    flow: str
    """`module:attribute` of the flow."""
    needs_gpu: bool
    """Sent to the GPU work pool when it exists."""
    description: str
    """Shown in the Prefect UI."""
    cron: str | None = None
    """Cron schedule, or None."""
    interval_s: int | None = None
    """Interval schedule in seconds, or None."""
    parameters: dict[str, Any] = field(default_factory=dict)
    """Flow parameters besides `params`."""
    takes_params: bool = True
    """The flow has a `params` parameter (the params file); fan-out pieces get their config."""


def sweep_flow_ref() -> str:
    """The training sweep: `flows.sweep:sweep_flow` once it exists, else the single train flow.

    Hook for the sweep: a module `flows/sweep.py` with a flow `sweep_flow(params: str)` is picked
    up here without any change to this file.
    """
    import importlib.util

    return (
        "flows.sweep:sweep_flow"
        if importlib.util.find_spec("flows.sweep")
        else "flows.train:train_flow"
    )


def specs(cron: str | None = None, watch_every_s: int | None = None) -> list[Spec]:
    """The deployments of saev-flow, with schedules from the arguments or the environment."""
    cron = cron or os.environ.get("SAEV_CRON", DEFAULT_CRON)
    every = watch_every_s or int(os.environ.get("SAEV_WATCH_EVERY", DEFAULT_WATCH_EVERY_S))
    return [
        Spec(
            "saev-pipeline",
            "flows.pipeline:pipeline_flow",
            needs_gpu=True,
            description="every stage, then tag, DVC commit and push of the outputs",
            cron=cron,
            parameters={"version": True},
        ),
        Spec(
            "saev-refresh",
            "flows.refresh:refresh_flow",
            needs_gpu=True,
            description="new images in extract.data -> extend shards -> stats -> warehouse",
            interval_s=every,
            parameters={"version": True},
        ),
        Spec(
            "saev-sweep",
            sweep_flow_ref(),
            needs_gpu=True,
            description="the SAE training sweep (run by hand: prefect deployment run)",
        ),
    ]


FANOUT = {
    "extract": Spec(
        "saev-extract-partition",
        "flows.distributed:extract_partition_flow",
        needs_gpu=True,
        description="one partition of a distributed extraction (`saev extract --distributed`)",
        takes_params=False,
    ),
    "train": Spec(
        "saev-train-member",
        "flows.distributed:train_member_flow",
        needs_gpu=True,
        description="one member of a distributed sweep (`train.sweep.distribute: true`)",
        takes_params=False,
    ),
}
"""The deployments that take one piece of a fanned-out stage (flows/distributed.py)."""


def load_flow(ref: str):
    """The flow object named by `module:attribute`."""
    from saev_core.registry import import_ref

    return import_ref(ref)


def pool_for(spec: Spec, cfg: settings.Settings, existing_pools: set[str]) -> str:
    """The work pool a spec goes to: the GPU pool if it wants one and it exists, else local."""
    return cfg.gpu_pool if spec.needs_gpu and cfg.gpu_pool in existing_pools else cfg.cpu_pool


def to_deployment(
    spec: Spec,
    pool: str,
    params: str,
    workdir: str | Path,
    heartbeat_s: int | None = None,
    tags: tuple[str, ...] = (),
):
    """A Prefect `RunnerDeployment` for a work pool (not yet registered); `heartbeat_s` sets the
    runs' `PREFECT_FLOWS_HEARTBEAT_FREQUENCY`, `tags` are added to the deployment's."""
    from prefect.deployments.runner import EntrypointType

    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if heartbeat_s:
        env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(heartbeat_s)
    return load_flow(spec.flow).to_deployment(
        name=spec.name,
        cron=spec.cron,
        interval=spec.interval_s,
        parameters={**({"params": params} if spec.takes_params else {}), **spec.parameters},
        description=spec.description,
        tags=["saev", "gpu" if spec.needs_gpu else "cpu", *tags],
        work_pool_name=pool,
        # Imported from the installed package on the worker, not uploaded from this machine.
        entrypoint_type=EntrypointType.MODULE_PATH,
        job_variables={"working_dir": str(Path(workdir).resolve()), "env": env},
    )


def ensure_pool(name: str) -> bool:
    """Create process work pool `name` if the server lacks it; True if it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True
        except ObjectAlreadyExists:
            return False


def existing_pools() -> set[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {p.name for p in client.read_work_pools()}


def zombie_after_s() -> int:
    return int(os.environ.get("SAEV_ZOMBIE_AFTER_S", DEFAULT_ZOMBIE_AFTER_S))


def ensure_zombie_automation(after_s: int | None = None) -> str:
    """Create (or update) the automation that marks a running flow run Crashed once it has sent
    no heartbeat for `after_s` seconds (Prefect's "detect zombie flows" guide); what it did."""
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    after_s = after_s or zombie_after_s()
    if after_s <= HEARTBEAT_S:
        raise ValueError(
            f"SAEV_ZOMBIE_AFTER_S={after_s}: must exceed the {HEARTBEAT_S} s between heartbeats"
        )
    automation = AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="fan-out flow runs that stop sending heartbeats (machine died) -> Crashed",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            # Only fan-out pieces: other runs beat every 180 s (Prefect's default), too seldom.
            match_related=ResourceSpecification(
                {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{FANOUT_TAG}"}
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=after_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {after_s} s: its worker or machine is gone",
            )
        ],
    )
    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        if not found:
            client.create_automation(automation)
            return f"created (after {after_s} s)"
        client.update_automation(found[0].id, automation)  # the same name: one automation
        return f"updated (after {after_s} s)"


def ensure_fanout(kind: str, workdir: str | Path = ".") -> str:
    """Register (or update) the fan-out deployment of `kind` (`FANOUT`) and the zombie automation;
    returns the deployment's `flow/deployment` name for `run_deployment`."""
    cfg = settings.load()
    spec = FANOUT[kind]
    pools = existing_pools()
    if cfg.cpu_pool not in pools:
        ensure_pool(cfg.cpu_pool)
    pool = pool_for(spec, cfg, pools)
    to_deployment(spec, pool, cfg.params, workdir, HEARTBEAT_S, (FANOUT_TAG,)).apply()
    ensure_zombie_automation()
    return f"{load_flow(spec.flow).name}/{spec.name}"


def deploy(
    params: str | None = None,
    workdir: str | Path = ".",
    only: list[str] | None = None,
    dry_run: bool = False,
) -> list[dict[str, Any]]:
    """Register the deployments with the Prefect API; returns what went where."""
    cfg = settings.load()
    params = params or cfg.params
    pools = set() if dry_run else existing_pools()
    if not dry_run and cfg.cpu_pool not in pools:
        ensure_pool(cfg.cpu_pool)
    if not dry_run:
        ensure_zombie_automation()
    out = []
    for spec in specs():
        if only and spec.name not in only:
            continue
        pool = pool_for(spec, cfg, pools)
        row = {
            "name": spec.name,
            "flow": spec.flow,
            "pool": pool,
            "schedule": spec.cron or (f"every {spec.interval_s} s" if spec.interval_s else None),
            "parameters": {"params": params, **spec.parameters},
        }
        if spec.needs_gpu and pool != cfg.gpu_pool:
            row["note"] = f"wants a GPU; no work pool {cfg.gpu_pool!r}: local process pool"
        if not dry_run:
            row["id"] = str(to_deployment(spec, pool, params, workdir).apply())
        out.append(row)
    return out


def build_deployment(
    name: str = "saev-pipeline", cron: str = DEFAULT_CRON, params: str = "params.yaml"
):
    """The pipeline as a deployment with a cron schedule, for `serve` (no work pool)."""
    from flows.pipeline import pipeline_flow

    return pipeline_flow.to_deployment(
        name=name,
        cron=cron,
        parameters={"params": params},
        description="backbone -> extract -> validate -> train -> stats -> intervene -> warehouse",
        tags=["saev"],
    )


# ---------------------------------------------------------------------------------------------
# Command lines: `saev deploy`, `saev worker`, `saev serve`


def deploy_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="saev deploy",
        description="Register saev-pipeline (cron), saev-refresh (watched folder) and saev-sweep "
        "with the Prefect server at PREFECT_API_URL, on the GPU work pool when it exists, else "
        "on the local process pool (created if missing). Start a worker with `saev worker`.",
    )
    p.add_argument("--params", default=None, help="params file the runs read ($SAEV_PARAMS)")
    p.add_argument("--workdir", default=".", help="project directory on the worker machine")
    p.add_argument("--only", nargs="*", help="deploy only these deployments")
    p.add_argument("--dry-run", action="store_true", help="print the plan, register nothing")
    args = p.parse_args(argv)
    if not args.dry_run and not settings.load().prefect_api_url:
        print(
            "saev deploy: PREFECT_API_URL is not set. Start a server (`prefect server start`) "
            "and export PREFECT_API_URL=http://127.0.0.1:4200/api, then deploy again.",
            file=sys.stderr,
        )
        return 1
    for row in deploy(args.params, args.workdir, args.only, args.dry_run):
        note = f"  ({row['note']})" if "note" in row else ""
        print(
            f"{row['name']:<14} {row['flow']:<32} pool={row['pool']:<8} "
            f"schedule={row['schedule']}{note}"
        )
    return 0


def worker_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="saev worker",
        description="Create a process work pool if missing and start a Prefect worker for it "
        "(replaces this process; stop it with Ctrl-C or by its PID).",
    )
    p.add_argument("--gpu", action="store_true", help="the GPU pool ($SAEV_GPU_POOL, 'gpu')")
    p.add_argument(
        "--pool", help="pool name (default $SAEV_CPU_POOL, or $SAEV_GPU_POOL with --gpu)"
    )
    p.add_argument(
        "--limit", type=int, help="flow runs at once (default: the number of GPUs with --gpu)"
    )
    p.add_argument("--force", action="store_true", help="start a --gpu worker without CUDA")
    args = p.parse_args(argv)
    cfg = settings.load()
    if not cfg.prefect_api_url:
        print("saev worker: PREFECT_API_URL is not set (see `saev doctor`)", file=sys.stderr)
        return 1
    pool = args.pool or (cfg.gpu_pool if args.gpu else cfg.cpu_pool)
    limit = args.limit
    if args.gpu:
        import torch

        n_gpus = torch.cuda.device_count()
        if not n_gpus and not args.force:
            print(
                f"saev worker --gpu: this machine has no CUDA device, so work pool {pool!r} "
                "would run GPU work on the CPU; start it on a GPU machine (or --force)",
                file=sys.stderr,
            )
            return 1
        limit = limit or max(n_gpus, 1)
    created = ensure_pool(pool)
    print(f"work pool {pool!r} {'created' if created else 'exists'}; starting its worker")
    if args.gpu and created:
        print("run `saev deploy` again so that GPU deployments move to this pool")
    cmd = [_prefect_exe(), "worker", "start", "--pool", pool, "--type", "process"]
    if limit:
        cmd += ["--limit", str(limit)]
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # the worker takes this PID: stopping it by PID stops the worker


def _prefect_exe() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.exists() else (shutil.which("prefect") or "prefect")


def main(argv: list[str] | None = None) -> int:
    """`saev serve`: serve the pipeline on a cron schedule from this process (no work pool)."""
    p = argparse.ArgumentParser(
        prog="saev serve",
        description="Serve the pipeline flow on a cron schedule; runs until interrupted.",
    )
    p.add_argument("--name", default="saev-pipeline", help="deployment name (default: %(default)s)")
    p.add_argument(
        "--cron",
        default=os.environ.get("SAEV_CRON", DEFAULT_CRON),
        help="cron schedule, default $SAEV_CRON or %(default)s",
    )
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args(argv)
    from prefect import serve

    serve(build_deployment(args.name, args.cron, args.params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
