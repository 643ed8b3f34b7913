"""Fan-out over a work pool: one flow run per extraction partition, one per sweep member.

`saev extract --partitions N --distributed` (or the `extract` flow's `distributed` parameter)
and `train.sweep.distribute: true` send their pieces to deployments on the Prefect server at
`PREFECT_API_URL`: `extract-partition/saev-extract-partition` and
`train-member/saev-train-member` (flows/deploy.py registers them before submitting, on the GPU
pool when it exists). Any worker of the pool (`saev worker [--gpu]`, on any machine) takes a
piece; the stage's own flow run waits for them all, then finishes the stage itself: the merge of
the partitions into one manifest, or the move of the members into `<out_dir>/sweep/<name>/`.

**Shared storage.** A piece runs in the working directory of the flow that submitted it (the
`working_dir` job variable), so that the params' relative paths, and the spellings the shard
manifest records, are the same as in a one-machine run. That directory (or at least every path
the section names) must be the same shared path on every worker machine: an NFS or similar mount.
A partition writes its finished chunks straight into the staging directory next to `out_dir`
there; a chunk counts as done once its record is written (saev_core/extract.py).

**A machine that dies.** Each piece's flow run sends a heartbeat every 30 s; Prefect's zombie
automation (flows/deploy.py, `ZOMBIE_AUTOMATION`) marks a run without one for
`$SAEV_ZOMBIE_AFTER_S` s (90) Crashed, and `fan_out` then submits that piece again for any live
worker to take. A partition's retry keeps the chunks the dead run finished and redoes the rest
with the same plan, so the merged set is byte-identical to a single-worker run. A piece that
fails (an exception, after its own retries) fails the stage; nothing is published.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow

from flows.common import placement
from flows.deploy import FANOUT_TAG, ensure_fanout
from saev_core.config import from_dict, to_dict
from saev_core.extract import ExtractConfig, extract_partition
from saev_core.stages import TrainStage

POLL_S = 1.0
"""Seconds between looks at the pieces' states."""
RESUBMIT = 2
"""Times a crashed piece is submitted again before the stage gives up."""
UNCLAIMED_S = 60.0
"""A piece no worker has taken after this long gets a hint in the log."""


def require_server(what: str) -> None:
    """Refuse to fan out without a Prefect server: a temporary one has no workers."""
    from flows import settings

    if not settings.load().prefect_api_url:
        raise ValueError(
            f"{what} needs a Prefect server and workers: start `prefect server start`, export "
            "PREFECT_API_URL=http://HOST:4200/api, start `saev worker` (or `saev worker --gpu`) "
            "on each machine, then run it again"
        )


class FanOut:
    """One flow run of `deployment` per piece (`{label: parameters}`): `submit()` creates them
    (they run side by side on the pool's workers), `wait()` blocks until all are completed and
    submits a crashed one again, up to `resubmit` times; a piece that fails otherwise raises."""

    def __init__(
        self,
        deployment: str,
        pieces: dict[str, dict[str, Any]],
        workdir: str | Path = ".",
        resubmit: int = RESUBMIT,
        poll_s: float = POLL_S,
    ):
        self.deployment, self.pieces = deployment, pieces
        self.workdir = str(Path(workdir).resolve())
        self.resubmit, self.poll_s = resubmit, poll_s
        self.tries = dict.fromkeys(pieces, 0)
        self.runs: dict[str, Any] = {}
        self.submitted: dict[str, float] = {}

    def _submit(self, label: str) -> None:
        from prefect.deployments import run_deployment

        tries = self.tries[label]
        self.runs[label] = run_deployment(
            self.deployment,
            parameters=self.pieces[label],
            timeout=0,  # return at once; `wait` watches the states
            flow_run_name=label if not tries else f"{label}-try{tries + 1}",
            job_variables={"working_dir": self.workdir},
            tags=["saev", FANOUT_TAG],
        )
        self.submitted[label] = time.time()

    def submit(self) -> FanOut:
        for label in self.pieces:
            self._submit(label)
        print(
            f"{self.deployment}: {len(self.pieces)} flow runs submitted ({', '.join(self.pieces)})"
        )
        return self

    def wait(self, timeout_s: float | None = None) -> dict[str, Any]:
        """`{label: completed flow run}` once every piece is done."""
        from prefect.client.orchestration import get_client

        done: dict[str, Any] = {}
        hinted: set[str] = set()
        start = time.time()
        with get_client(sync_client=True) as client:
            while True:
                for label in [p for p in self.pieces if p not in done]:
                    run = client.read_flow_run(self.runs[label].id)
                    if run.state is not None and run.state.is_final():
                        self._final(label, run, done)
                    elif label not in hinted and self._unclaimed(label, run):
                        print(
                            f"{label}: no worker has taken flow run {run.name!r} in "
                            f"{UNCLAIMED_S:.0f} s; is a `saev worker` running on work pool "
                            f"{run.work_pool_name!r}?"
                        )
                        hinted.add(label)
                if len(done) == len(self.pieces):
                    return done
                if timeout_s is not None and time.time() - start > timeout_s:
                    raise TimeoutError(
                        f"{self.deployment}: flow runs of {sorted(set(self.pieces) - set(done))} "
                        f"not done after {timeout_s} s"
                    )
                time.sleep(self.poll_s)

    def _unclaimed(self, label: str, run: Any) -> bool:
        waiting = run.state is None or run.state.is_scheduled() or run.state.is_pending()
        return waiting and time.time() - self.submitted[label] > UNCLAIMED_S

    def _final(self, label: str, run: Any, done: dict[str, Any]) -> None:
        state = run.state
        if state.is_completed():
            done[label] = run
            print(f"{label}: flow run {run.name!r} completed")
        elif state.is_crashed() and self.tries[label] < self.resubmit:
            self.tries[label] += 1
            print(
                f"{label}: flow run {run.name!r} crashed ({state.message}); submitting it again "
                f"(try {self.tries[label] + 1} of {self.resubmit + 1})"
            )
            self._submit(label)
        else:
            raise RuntimeError(
                f"{label}: flow run {run.name!r} of {self.deployment} ended {state.name}: "
                f"{state.message}"
            )


# ---------------------------------------------------------------------------------------------
# Extraction: the partitions of one staged plan


@flow(name="extract-partition", log_prints=True, retries=2, retry_delay_seconds=2)
def extract_partition_flow(cfg: dict, chunks: list[str]) -> list[str]:
    """Extract the named chunks of the plan staged next to `cfg["out_dir"]` (finished ones are
    skipped, so a retry, here or on another worker, redoes only the rest)."""
    print(placement(needs_gpu=True))
    ran = extract_partition(from_dict(ExtractConfig, cfg, where="extract"), chunks)
    print(f"{cfg['out_dir']}: {len(ran)} of {len(chunks)} chunks extracted here ({os.uname()[1]})")
    return ran


def run_partitions(cfg: ExtractConfig, partitions: list[list[str]]) -> dict[str, Any]:
    """Each partition its own flow run of `saev-extract-partition`; returns when all are done."""
    require_server("saev extract --distributed")
    deployment = ensure_fanout("extract", ".")
    pieces = {
        f"partition-{i}": {"cfg": to_dict(cfg), "chunks": chunks}
        for i, chunks in enumerate(partitions)
    }
    return FanOut(deployment, pieces).submit().wait() if pieces else {}


# ---------------------------------------------------------------------------------------------
# Sweeps: each member its own flow run


def member_staging(io: TrainStage) -> Path:
    """Where the members of a distributed sweep are trained before they move into
    `<out_dir>/sweep/`: next to `out_dir`, so that training the main SAE (which replaces
    `out_dir`) cannot remove a member that finished first."""
    out = Path(io.out_dir)
    return out.parent / f".{out.name}.sweep"


def member_stage(io: TrainStage, name: str) -> TrainStage:
    """The TrainStage of sweep member `name`: its overrides on `sae`, no sweep of its own."""
    return replace(
        io,
        sae={**io.sae, **io.sweep[name]},
        sweep={},
        distribute_sweep=False,
        out_dir=str(member_staging(io) / name),
        checkpoint_dir="",
        register_as="",
    )


@flow(name="train-member", log_prints=True)
def train_member_flow(section: dict, member: str, sweep_id: str = "") -> dict:
    """Train sweep member `member` of the `train` section into its staging directory; its
    MLflow run is tagged with `member` and `sweep_id` (the submitting flow run)."""
    from flows.train import train_task

    print(placement(needs_gpu=True))
    io = member_stage(from_dict(TrainStage, section, where="train"), member)
    metrics, _ = train_task(io, tags={"member": member, "sweep_id": sweep_id})
    print(f"{member}: L0 {metrics['l0']:.1f}, FVU {metrics['fvu']:.3f} -> {io.out_dir}")
    return metrics


def run_members(io: TrainStage, sweep_id: str) -> _Members:
    """Submit every sweep member as its own flow run (into `member_staging`); `.wait()` on the
    result blocks until all are done and moves them into `<out_dir>/sweep/<name>/`, where the
    one-pass sweep puts them."""
    require_server("train.sweep.distribute")
    deployment = ensure_fanout("train", ".")
    section = to_dict(replace(io, distribute_sweep=False))
    pieces = {name: {"section": section, "member": name, "sweep_id": sweep_id} for name in io.sweep}
    staging = member_staging(io)
    shutil.rmtree(staging, ignore_errors=True)
    return _Members(FanOut(deployment, pieces).submit(), io, staging)


class _Members:
    """The members of a distributed sweep in flight."""

    def __init__(self, fan: FanOut, io: TrainStage, staging: Path):
        self.fan, self.io, self.staging = fan, io, staging

    def wait(self) -> dict[str, dict]:
        """Block until every member is done; move them into place; `{name: cfg.json}`."""
        import json

        self.fan.wait()
        sweep_dir = Path(self.io.out_dir) / "sweep"
        sweep_dir.mkdir(parents=True, exist_ok=True)
        cfgs = {}
        for name in self.io.sweep:
            src, dst = self.staging / name, sweep_dir / name
            if not (src / "cfg.json").exists():
                raise FileNotFoundError(f"sweep member {name}: its flow run left no {src}/cfg.json")
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(src, dst)
            cfgs[name] = json.loads((dst / "cfg.json").read_text())
        shutil.rmtree(self.staging, ignore_errors=True)
        return cfgs
