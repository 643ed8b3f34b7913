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
there; a chunk counts as done once its record is written (saev_core/extract/).

**Or only a bucket.** With `$SAEV_STAGING_URL=s3://bucket/prefix` (`run_partitions`' `staging`)
the workers share nothing but the Prefect server and the object store. Each partition runs in
the directory its worker was started in: that machine's own clone of the project, with the
images and the backbone at the same relative paths (`dvc pull`). The submitting flow plans here
and uploads the plan to `<prefix>/<out_dir name>/<plan key>/`, the key being the first 12 hex
digits of the plan file's sha256, which each piece gets as a parameter: a folder holds one
plan's chunks only. A partition downloads the plan (refusing one whose hash is not the key),
skips the chunks whose record is in the bucket, extracts the rest and uploads each chunk as it
finishes, its files first and its record last (`BucketStaging`). Once every piece is done, the
submitting flow downloads all chunks into its staging directory and merges them as before;
once the merge has published the set, `finish_bucket` empties the plan's folder.

**A machine that dies.** Each piece's flow run sends a heartbeat every 30 s; Prefect's zombie
automation (flows/deploy.py, `ZOMBIE_AUTOMATION`) marks a run without one for `$SAEV_ZOMBIE_AFTER_S`
s (90) Crashed, and `FanOut.wait` then submits that piece again for any live worker to take. A
partition's retry keeps the chunks the dead run finished (in the staging directory or the bucket)
and redoes the rest with the same plan, so the merged set is byte-identical to a single-worker run
(the dead run's half-written `*.tmp` files are deleted before the merge). A worker that dies after
claiming a run but before starting it leaves the run Pending with no heartbeat at all: after the
same `$SAEV_ZOMBIE_AFTER_S` Pending, `FanOut.wait` marks it Crashed itself and submits it again. A
piece that fails (an exception, after its own retries) fails the stage; nothing is published.

**Never a silent hang.** A piece that no worker takes (Scheduled or Late) for a minute gets a
warning in the log naming its work pool; one reason is a flow that submits pieces while itself
running on a `--limit 1` worker of the same pool, which then holds the only slot. The wait as a
whole gives up after `$SAEV_FANOUT_TIMEOUT_S` (a day). Whenever the stage stops early (a failed
piece, the timeout, an interrupt, the main SAE's training raising), every piece not finished
is set Cancelling, so that no worker keeps training or extracting for nobody.

**Tracking.** A distributed sweep's members log MLflow runs on the machines that train them, and
the submitting flow looks them up afterwards: `MLFLOW_TRACKING_URI` must name a store they all
reach (a tracking server), not the local sqlite default; the stage refuses to start otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow

from flows.common import placement
from flows.deploy import FANOUT_TAG, ensure_fanout, zombie_after_s
from saev_core.config import from_dict, to_dict
from saev_core.extract import CHUNKS, PLAN, ExtractConfig, extract_partition
from saev_core.object_store import split_url
from saev_core.training.stage import TrainStage

POLL_S = 1.0
"""Seconds between looks at the pieces' states."""
RESUBMIT = 2
"""Times a crashed piece is submitted again before the stage gives up."""
UNCLAIMED_S = 60.0
"""A piece still Scheduled (or Late) after this long, which no worker has taken, gets a warning."""
TIMEOUT_ENV = "SAEV_FANOUT_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 24 * 3600
"""`wait` gives up (and cancels what is left) when the pieces are not all done in this long:
a day, far above a partition's or a member's run on a GPU, so only a stage that is stuck (no
worker, a piece that never ends) meets it; `$SAEV_FANOUT_TIMEOUT_S` overrides it."""
STAGING_ENV = "SAEV_STAGING_URL"
"""`s3://bucket/prefix`: distributed partitions exchange their chunks there (`BucketStaging`),
and each runs in its own worker's directory; unset, they share the staging directory."""
LOCAL_TRACKING = ("", "file", "sqlite")
"""MLflow URI schemes that name a store on this machine's disk."""


def require_server(what: str) -> None:
    """Refuse to fan out without a Prefect server: a temporary one has no workers."""
    from flows import settings

    if not settings.load().prefect_api_url:
        raise ValueError(
            f"{what} needs a Prefect server and workers: start `prefect server start`, export "
            "PREFECT_API_URL=http://HOST:4200/api, start `saev worker` (or `saev worker --gpu`) "
            "on each machine, then run it again"
        )


def require_shared_tracking(what: str) -> str:
    """Refuse to fan out MLflow runs to other machines while the tracking store is a local one
    (unset: `mlruns/mlflow.db`; a sqlite or file URI): each worker would log its runs to its own
    disk, and the submitting flow would find none of them. Returns the URI."""
    from urllib.parse import urlparse

    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    scheme = urlparse(uri).scheme.lower()
    if scheme in LOCAL_TRACKING or len(scheme) == 1:  # one letter: a Windows drive, a path
        raise ValueError(
            f"{what} needs an MLflow tracking store every worker reaches, but "
            f"MLFLOW_TRACKING_URI is {repr(uri) if uri else 'unset (mlruns/mlflow.db here)'}: "
            "start a tracking server (`mlflow server --backend-store-uri postgresql://... "
            "--artifacts-destination s3://bucket/mlflow`), export "
            "MLFLOW_TRACKING_URI=http://HOST:5000, then run it again"
        )
    return uri


def fanout_timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def _warn(message: str) -> None:
    """A warning in the flow run's log (the UI marks it as one), or on stderr outside a run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().warning(message)
    except MissingContextError:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class FanOut:
    """One flow run of `deployment` per piece (`{label: parameters}`): `submit()` creates them
    (they run side by side on the pool's workers), `wait()` blocks until all are completed and
    submits a crashed one again, up to `resubmit` times; a piece that fails otherwise raises.
    Each piece runs in `workdir` on whichever worker takes it (a shared path); with `workdir`
    None, in the directory its worker was started in (its own clone of the project).

    A run that stays Pending for `pending_after_s` (default `$SAEV_ZOMBIE_AFTER_S`, 90) is marked
    Crashed and submitted again: the worker that claimed it died before the run started, so it
    never sent the heartbeat the zombie automation watches. Used as a context manager, every
    piece not finished yet is set Cancelling when the block raises (a failed piece, the
    timeout, an interrupt or anything else the stage does meanwhile)."""

    def __init__(
        self,
        deployment: str,
        pieces: dict[str, dict[str, Any]],
        workdir: str | Path | None = ".",
        resubmit: int = RESUBMIT,
        poll_s: float = POLL_S,
        pending_after_s: float | None = None,
        unclaimed_s: float = UNCLAIMED_S,
    ):
        self.deployment, self.pieces = deployment, pieces
        # None: "." unresolved, which the process worker resolves against its own directory
        self.workdir = "." if workdir is None else str(Path(workdir).resolve())
        self.resubmit, self.poll_s = resubmit, poll_s
        self.pending_after_s = pending_after_s or zombie_after_s()
        self.unclaimed_s = unclaimed_s
        self.tries = dict.fromkeys(pieces, 0)
        self.runs: dict[str, Any] = {}
        self.done: dict[str, Any] = {}
        # label -> (state type, when this process first saw the run in it)
        self._since: dict[str, tuple[Any, float]] = {}
        self._warned: set[str] = set()

    def __enter__(self) -> FanOut:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is not None:
            self.cancel(f"the stage that submitted it stopped: {kind.__name__}: {error}")
        return False

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
        self._since.pop(label, None)
        self._warned.discard(label)

    def submit(self) -> FanOut:
        for label in self.pieces:
            self._submit(label)
        print(
            f"{self.deployment}: {len(self.pieces)} flow runs submitted ({', '.join(self.pieces)})"
        )
        return self

    def wait(self, timeout_s: float | None = None) -> dict[str, Any]:
        """`{label: completed flow run}` once every piece is done; TimeoutError after
        `timeout_s` (default `$SAEV_FANOUT_TIMEOUT_S`, a day)."""
        from prefect.client.orchestration import get_client

        timeout_s = fanout_timeout_s() if timeout_s is None else timeout_s
        start = time.time()
        with get_client(sync_client=True) as client:
            while True:
                states = {}
                for label in [p for p in self.pieces if p not in self.done]:
                    run = client.read_flow_run(self.runs[label].id)
                    states[label] = run.state.name if run.state else "not started"
                    if run.state is not None and run.state.is_final():
                        self._final(label, run)
                    else:
                        self._watch(client, label, run)
                if len(self.done) == len(self.pieces):
                    return dict(self.done)
                if time.time() - start > timeout_s:
                    left = ", ".join(f"{k} ({v})" for k, v in states.items() if k not in self.done)
                    raise TimeoutError(
                        f"{self.deployment}: flow runs not done after {timeout_s:.0f} s: {left} "
                        f"(${TIMEOUT_ENV} sets the limit); cancelling them"
                    )
                time.sleep(self.poll_s)

    def _watch(self, client: Any, label: str, run: Any) -> None:
        """Crash a run stuck Pending; warn about one no worker takes."""
        from prefect.states import Crashed

        state = run.state
        kind = state.type if state is not None else None
        if label not in self._since or self._since[label][0] != kind:
            self._since[label] = (kind, time.time())
        waited = time.time() - self._since[label][1]
        if state is not None and state.is_pending() and waited > self.pending_after_s:
            message = (
                f"Pending for {waited:.0f} s without starting: the worker that took it is gone"
            )
            print(f"{label}: flow run {run.name!r} {message}; marking it Crashed")
            client.set_flow_run_state(run.id, Crashed(message=message))
            # the next look sees it Crashed and submits it again (or finds it started after all)
        elif (
            (state is None or state.is_scheduled())  # Late is a Scheduled state; Pending is not
            and waited > self.unclaimed_s
            and label not in self._warned
        ):
            self._warned.add(label)
            _warn(
                f"{label}: flow run {run.name!r} has waited {waited:.0f} s "
                f"{state.name if state else 'unscheduled'}: no worker of work pool "
                f"{run.work_pool_name!r} has taken it. Start a `saev worker` on that pool, or "
                f"raise a worker's --limit: {self._holder(client, run.work_pool_name)}"
            )

    def _holder(self, client: Any, pool: str | None) -> str:
        """Why a pool's slots may all be taken: this flow run itself may hold one."""
        from prefect.runtime import flow_run

        own = flow_run.get_id()
        mine = client.read_flow_run(own).work_pool_name if own else None
        if mine and mine == pool:
            return (
                f"this flow run runs on {pool!r} too and holds one of its workers' slots while "
                "it waits (a worker started with --limit 1 can then take no piece)"
            )
        return "a flow that submits pieces and runs on the same pool holds a slot while it waits"

    def _final(self, label: str, run: Any) -> None:
        state = run.state
        if state.is_completed():
            self.done[label] = run
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

    def cancel(self, reason: str) -> list[str]:
        """Set every submitted piece that is not done Cancelling (its worker stops it); the
        labels cancelled. Never raises: it runs while another error is on its way out."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelling

        cancelled = []
        try:
            with get_client(sync_client=True) as client:
                for label, submitted in self.runs.items():
                    if label in self.done:
                        continue
                    try:
                        run = client.read_flow_run(submitted.id)
                        if run.state is not None and run.state.is_final():
                            continue
                        client.set_flow_run_state(run.id, Cancelling(message=reason))
                        cancelled.append(label)
                    except Exception as e:  # the others still get their cancel
                        print(f"{label}: could not cancel flow run {submitted.name!r}: {e}")
        except Exception as e:
            print(f"{self.deployment}: could not reach the Prefect API to cancel: {e}")
        if cancelled:
            print(f"{self.deployment}: cancelled {', '.join(cancelled)} ({reason})")
        return cancelled


# ---------------------------------------------------------------------------------------------
# Extraction: the partitions of one staged plan


@flow(name="extract-partition", log_prints=True, retries=2, retry_delay_seconds=2)
def extract_partition_flow(
    cfg: dict, chunks: list[str], staging_url: str = "", plan_key: str = ""
) -> list[str]:
    """Extract the named chunks of the plan staged next to `cfg["out_dir"]` (finished ones are
    skipped, so a retry, here or on another worker, redoes only the rest). With `staging_url`
    (`s3://bucket/prefix`) the plan comes from the bucket folder `plan_key` names (the head's
    `BucketStaging.key`) and each finished chunk goes to it; the working directory is then this
    worker's own."""
    print(placement(needs_gpu=True))
    config = from_dict(ExtractConfig, cfg, where="extract")
    if staging_url:
        if not plan_key:
            raise ValueError(
                "extract-partition: a staging_url needs the plan_key of the head's staged plan"
            )
        ran = BucketStaging(config, staging_url, key=plan_key).extract(chunks)
    else:
        ran = extract_partition(config, chunks)
    print(f"{cfg['out_dir']}: {len(ran)} of {len(chunks)} chunks extracted here ({os.uname()[1]})")
    return ran


def staging_url(explicit: str | None = None) -> str:
    """The bucket prefix distributed partitions stage their chunks under: `explicit`, else
    `$SAEV_STAGING_URL`, else "" (the shared path next to `out_dir`)."""
    url = (explicit if explicit is not None else os.environ.get(STAGING_ENV, "")).strip()
    if url:
        split_url(url)  # a clear error for anything but s3://bucket[/prefix]
    return url.rstrip("/")


def partition_pieces(
    cfg: ExtractConfig, partitions: list[list[str]], bucket: BucketStaging | None = None
) -> dict[str, dict[str, Any]]:
    """The flow parameters of each partition's run of `extract_partition_flow`; with `bucket`,
    its prefix and the key of the plan's folder under it."""
    extra = {"staging_url": bucket.prefix_url, "plan_key": bucket.key} if bucket else {}
    return {
        f"partition-{i}": {"cfg": to_dict(cfg), "chunks": chunks, **extra}
        for i, chunks in enumerate(partitions)
    }


def run_partitions(
    cfg: ExtractConfig, partitions: list[list[str]], staging: str | None = None
) -> BucketStaging | None:
    """Each partition its own flow run of `saev-extract-partition`; returns when all are done,
    with the staging directory ready for `merge_partitions` (no temporary file left in it).
    Should the stage fail or be interrupted meanwhile, the partitions still running are
    cancelled.

    `staging` (default `$SAEV_STAGING_URL`): a bucket prefix, `s3://bucket/prefix`. The plan
    staged here is uploaded under it, every piece runs in its worker's own directory and sends
    its chunks there, and once all are done they are downloaded into the staging directory
    here. Without it the pieces run in this directory, which must be a shared path. Returns the
    bucket's `BucketStaging` (None without one): hand it to `finish_bucket` once the merge has
    published the set."""
    if not partitions:  # every chunk done already: no plan is staged, nothing runs
        return None
    require_server("saev extract --distributed")
    url = staging_url(staging)
    deployment = ensure_fanout("extract", ".")
    bucket = BucketStaging(cfg, url) if url else None
    pieces = partition_pieces(cfg, partitions, bucket)
    if bucket:
        bucket.publish_plan()
    with FanOut(deployment, pieces, workdir=None if url else ".") as fan:
        fan.submit().wait()
    if bucket:
        bucket.fetch_chunks()
    drop_temporaries(cfg)  # a worker may still have run here (started in this directory)
    return bucket


def finish_bucket(cfg: ExtractConfig, bucket: BucketStaging | None) -> None:
    """Empty the bucket folder of a distributed extraction (`run_partitions`' result) once the
    merge has published its set in `out_dir`; nothing without a bucket. Refuses unless the set
    published there ends with this plan's chunks (before the merge, the bucket holds the only
    copy a retry can resume from). A failure to delete is a warning, not an error: the set is
    published, and a folder left over only takes space."""
    from saev_core.shards import MANIFEST

    if bucket is None:
        return
    manifest = Path(cfg.out_dir) / MANIFEST
    if not manifest.exists():
        raise RuntimeError(f"{bucket.url}: not cleared, {cfg.out_dir} has no {MANIFEST} yet")
    history = json.loads(manifest.read_text()).get("history") or [{}]
    if history[-1].get("chunks") != bucket.chunk_names():
        raise RuntimeError(
            f"{bucket.url}: not cleared, the last extraction published in {cfg.out_dir} is not "
            "this plan's: merge the partitions first"
        )
    try:
        bucket.clear()
    except Exception as e:  # s3fs passes botocore's errors through, which are no OSError
        _warn(f"{bucket.url}: could not delete the staged chunks ({e!r}); delete them by hand")


def plan_key(plan_bytes: bytes) -> str:
    """The bucket folder of a staged plan: the first 12 hex digits of its file's sha256."""
    return hashlib.sha256(plan_bytes).hexdigest()[:12]


class BucketStaging:
    """The staging directory of one extraction mirrored under `<url>/<out_dir name>/<key>/`,
    `key` being `plan_key` of the plan file: the plan (`plan.json`) and, per finished chunk, its
    shard files (`layer=*/...`), its tables and its record (`chunks/<chunk>.*`), at the paths
    they have in the local staging directory.

    The key keeps every plan's chunks apart: two extractions whose `out_dir`s share a name, or a
    rerun with other inputs, use other folders, so no record of another plan (left, say, by a
    deletion interrupted half-way) ever counts as done; a rerun of the same plan finds its own
    folder and resumes. The head computes the key from the plan it staged (`key` None); a worker
    is given it (`extract_partition_flow`'s `plan_key`) and refuses a plan there of another hash.

    A chunk is in the bucket once its record is: the files go up first, the record last, so a
    worker killed mid-upload leaves at worst files without a record, which the retry writes
    again. Chunk files depend only on the plan, so whichever worker writes one, the bytes are the
    same. `fs`: an fsspec filesystem (default `saev_core.object_store.filesystem()`)."""

    def __init__(self, cfg: ExtractConfig, url: str, key: str | None = None, fs: Any = None):
        from saev_core.object_store import filesystem

        self.cfg = cfg
        out = Path(cfg.out_dir)
        self.local = out.parent / f".{out.name}.partial"
        if key is None:
            if not (self.local / PLAN).exists():
                raise FileNotFoundError(
                    f"no staged plan in {self.local}: plan first (plan_partitions), or pass the "
                    "key of the head's plan"
                )
            key = plan_key((self.local / PLAN).read_bytes())
        self.key = key
        bucket, prefix = split_url(url)
        self.prefix_url = "s3://" + "/".join(p for p in (bucket, prefix) if p)
        self.root = "/".join(p for p in (bucket, prefix, out.name, key) if p)
        self.url = f"s3://{self.root}"
        self.fs = fs if fs is not None else filesystem()

    def _remote(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _read_remote_plan(self) -> bytes | None:
        """The plan file in the bucket folder, checked against the key; None when absent."""
        try:
            raw = self.fs.cat_file(self._remote(PLAN))
        except FileNotFoundError:
            return None
        if plan_key(raw) != self.key:
            raise ValueError(
                f"{self.url}/{PLAN} is not the plan this folder is keyed by (its sha256 starts "
                f"{plan_key(raw)}, not {self.key}): the bucket was changed by hand or by another "
                "tool; delete that folder and run the extraction again"
            )
        return raw

    def publish_plan(self) -> None:
        """Upload the plan staged here into its folder. A rerun of the same plan finds the
        folder with the chunks it had and resumes; another plan has another folder."""
        raw = (self.local / PLAN).read_bytes()
        if plan_key(raw) != self.key:
            raise ValueError(f"{self.local / PLAN} changed since {self.url} was keyed by it")
        if self._read_remote_plan() is None:
            self.fs.pipe_file(self._remote(PLAN), raw)
        n_chunks = len(json.loads(raw)["chunks"])
        print(f"{self.url}: plan staged, {len(self.done())} of {n_chunks} chunks there")

    def fetch_plan(self) -> dict:
        """The bucket's plan, staged here (the very bytes); a local staging directory of another
        plan is reset. Raises when the bucket has no plan of this key."""
        from saev_core import shards

        raw = self._read_remote_plan()
        if raw is None:
            raise FileNotFoundError(f"no plan under {self.url}: the orchestrator stages it first")
        plan = json.loads(raw)
        here = self.local / PLAN
        if not here.exists() or json.loads(here.read_text()) != plan:
            shutil.rmtree(self.local, ignore_errors=True)
            (self.local / CHUNKS).mkdir(parents=True)
            shards.atomic_write_bytes(here, raw)
        return plan

    def chunk_names(self) -> list[str]:
        """The plan's chunks, in its order (the order a merge records them in)."""
        raw = self._read_remote_plan()
        if raw is None:
            raise FileNotFoundError(f"no plan under {self.url}")
        return [c["name"] for c in json.loads(raw)["chunks"]]

    def clear(self) -> None:
        """Delete this plan's folder from the bucket. The records go first, so a deletion cut
        short never leaves a record whose files are gone: what is left is redone, not trusted."""
        records = [self._remote(f"{CHUNKS}/{n}.json") for n in sorted(self.done())]
        if records:
            self.fs.rm(records)
        try:
            self.fs.rm(self.root, recursive=True)
        except FileNotFoundError:  # nothing was ever staged under it
            pass
        print(f"{self.url}: cleared ({len(records)} chunks)")

    def done(self) -> set[str]:
        """The chunks whose record is in the bucket."""
        try:
            found = self.fs.ls(self._remote(CHUNKS), detail=False)
        except FileNotFoundError:
            return set()
        names = (Path(p).name for p in found)
        return {n.removesuffix(".json") for n in names if n.count(".") == 1 and n.endswith(".json")}

    def _chunk_files(self, name: str) -> list[str]:
        """A finished chunk's files, relative to the staging directory, its record last."""
        record = json.loads((self.local / CHUNKS / f"{name}.json").read_text())
        tables = [f"{CHUNKS}/{name}.images.parquet", f"{CHUNKS}/{name}.labels.parquet"]
        return [f["path"] for f in record["files"]] + tables + [f"{CHUNKS}/{name}.json"]

    def upload(self, name: str) -> None:
        """Put the chunk finished here into the bucket: its files, then its record."""
        *files, record = self._chunk_files(name)
        self.fs.put([str(self.local / f) for f in files], [self._remote(f) for f in files])
        self.fs.put_file(str(self.local / record), self._remote(record))

    def extract(self, chunks: list[str]) -> list[str]:
        """A worker's partition: the plan from the bucket, the chunks not there yet extracted
        here, each uploaded as soon as it is finished; the chunks extracted here.

        `extract_partition` runs once per chunk (it returns only at the end): each call loads
        the backbone again, seconds on a large one, small beside a chunk of real size."""
        self.fetch_plan()
        # Half-written files of this machine's earlier tries (never uploaded: only the files a
        # record names are); those of a partition running here right now are spared.
        drop_temporaries(self.cfg, spare_live=True)
        there = self.done()
        todo = [n for n in chunks if n not in there]
        # Finished here but never uploaded (this machine's earlier try died in between).
        for name in [n for n in todo if (self.local / CHUNKS / f"{n}.json").exists()]:
            self.upload(name)
            todo.remove(name)
        print(f"{self.url}: {len(chunks) - len(todo)} of {len(chunks)} chunks there already")
        ran = []
        for name in todo:  # one at a time: each is in the bucket before the next one starts
            ran += extract_partition(self.cfg, [name])
            self.upload(name)
        return ran

    def fetch_chunks(self) -> list[str]:
        """Download every chunk of the plan that the staging directory here lacks; the names.
        A chunk's files come first and its record last, as they were written."""
        plan = json.loads((self.local / PLAN).read_text())
        missing = [
            c["name"]
            for c in plan["chunks"]
            if not (self.local / CHUNKS / f"{c['name']}.json").exists()
        ]
        absent = sorted(set(missing) - self.done())
        if absent:
            raise RuntimeError(
                f"{len(absent)} chunk(s) missing under {self.url} although every partition "
                f"finished: {absent[:5]}"
            )
        records = [f"{CHUNKS}/{n}.json" for n in missing]
        # Beside the staging directory (one file system, for the renames), never in it: the
        # merge publishes whatever it holds.
        temp = tempfile.TemporaryDirectory(dir=self.local.parent, prefix=f"{self.local.name}.")
        with temp as tmp:
            self.fs.get([self._remote(r) for r in records], [f"{tmp}/{r}" for r in records])
            files = []
            for name in missing:
                record = json.loads(Path(tmp, CHUNKS, f"{name}.json").read_text())
                files += [f["path"] for f in record["files"]]
                files += [f"{CHUNKS}/{name}.images.parquet", f"{CHUNKS}/{name}.labels.parquet"]
            for parent in {(self.local / f).parent for f in files}:
                parent.mkdir(parents=True, exist_ok=True)
            self.fs.get([self._remote(f) for f in files], [str(self.local / f) for f in files])
            for r in records:  # the markers last
                os.replace(Path(tmp, r), self.local / r)
        print(f"{self.url}: {len(missing)} chunks ({len(files) + len(records)} files) fetched")
        return missing


def drop_temporaries(cfg: ExtractConfig, spare_live: bool = False) -> list[Path]:
    """Delete the half-written shard files (`<name>.<host>-<random>.<pid>.tmp`,
    saev_core/shards.py) that a killed partition left in the staging directory; the paths
    removed.

    On the head, once every partition's run is final: then no writer is alive, and a file not
    renamed yet never will be (the retry wrote that chunk through a temporary file of its own).
    The merge publishes every file under `layer=*/`, so one left here would land in the shard
    set. With `spare_live` (a worker's own staging directory, while other partitions may run on
    the same machine), a file is deleted only when its writer is gone: named for this host (or
    for no host) and a PID no process has."""
    out = Path(cfg.out_dir)
    staging = out.parent / f".{out.name}.partial"
    found = [p for d in staging.glob("layer=*") for p in d.rglob("*.tmp") if p.is_file()]
    dropped = [p for p in found if not (spare_live and _writer_may_live(p.name))]
    for path in dropped:
        path.unlink()
    if dropped:
        print(f"{staging}: removed {len(dropped)} temporary file(s) of killed partitions")
    return dropped


def _writer_may_live(name: str) -> bool:
    """Whether the process writing temporary file `name` may still be running: one of another
    host (whose processes are not visible here), or a live PID of this one."""
    stem, _, pid = name.removesuffix(".tmp").rpartition(".")
    if not pid.isdigit():
        return True  # not a name saev_core/shards.py gives: not ours to judge
    # `<name>.<host>-<8 hex>`; older files name no host
    if re.fullmatch(r".*-[0-9a-f]{8}", stem):
        host = re.escape(socket.gethostname())
        if not re.fullmatch(rf".+\.parquet\.{host}-[0-9a-f]{{8}}", stem):
            return True  # another host's
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


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
    one-pass sweep puts them. Use the result as a context manager around whatever the stage
    does until then: should that raise, the members still running are cancelled."""
    require_server("train.sweep.distribute")
    require_shared_tracking("train.sweep.distribute")
    deployment = ensure_fanout("train", ".")
    section = to_dict(replace(io, distribute_sweep=False))
    pieces = {name: {"section": section, "member": name, "sweep_id": sweep_id} for name in io.sweep}
    staging = member_staging(io)
    shutil.rmtree(staging, ignore_errors=True)
    fan = FanOut(deployment, pieces)
    with fan:  # a submission failing half-way cancels the members already submitted
        fan.submit()
    return _Members(fan, io, staging)


class _Members:
    """The members of a distributed sweep in flight."""

    def __init__(self, fan: FanOut, io: TrainStage, staging: Path):
        self.fan, self.io, self.staging = fan, io, staging

    def __enter__(self) -> _Members:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        return self.fan.__exit__(kind, error, traceback)

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
