"""One flow run per partition on real parts: a Prefect server, two workers and a kill -9.

The project (params, images, backbone, shards) lies on "shared storage", a directory every
process reaches by the same path, as an NFS mount would be on several machines. Two workers run
as separate processes, each started in a working directory of its own with its own Prefect home
and weights cache: they share only the server and that storage. `saev extract --partitions 2
--distributed` submits one flow run per partition; once the first partition has finished a
chunk, its worker and the flow run under it are killed with SIGKILL (a machine that dies). No
heartbeat comes any more, Prefect's zombie automation marks the run Crashed, the extract flow
submits it again, the other worker finishes it (only the chunks not done yet), and the merged set
is byte-identical to a single-worker run. Every process is stopped by its PID at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from servers import BIN, Proc, base_env, start_mlflow_server, start_prefect_server, wait_http
from test_extract_safety import digest

from saev_core.extract import ExtractConfig, extract

# The automation's wait past the last heartbeat: heartbeats come every 30 s, so 75 s leaves a
# late beat 45 s of margin on a loaded machine (and is the Pending bound of the waiting flow).
ZOMBIE_AFTER_S = 75
WORKER_MARK = "SAEV_TEST_WORKER"
"""Environment variable naming the worker a process belongs to (its flow runs inherit it)."""
EXTRACT = dict(
    model="model",
    data="data",
    out_dir="acts",
    layers=[0, -1],
    batch_size=2,
    images_per_row_group=2,
    images_per_file=2,  # 100 chunks: the kill lands well inside a partition
    n_workers=1,
)


# ---------------------------------------------------------------------------------------------
# Processes: a worker's flow runs start in sessions of their own, so "the machine dies" means
# its whole tree, found through /proc.


def children_of(pid: int) -> list[int]:
    """Every descendant of `pid`, parents first."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent_of[int(stat.parent.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent_of.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def kill_tree(pid: int) -> None:
    """SIGKILL `pid`, every descendant and their process groups, all at once."""
    victims = [pid, *children_of(pid)]
    own_group = os.getpgid(0)
    for p in victims:
        try:
            group = os.getpgid(p)
            if group != own_group:  # never pytest's own group
                os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Worker:
    """`saev worker --limit 1` started in its own directory, with its own Prefect home; with
    `clone`, that directory is a copy of the project."""

    def __init__(self, name: str, root: Path, api: str, request, clone: Path | None = None):
        self.dir = root / name
        if clone is None:
            self.dir.mkdir()
        else:  # its own copy of the project (params, images, backbone), as a `dvc pull` leaves
            shutil.copytree(clone, self.dir)
        env = {
            **base_env(self.dir),
            "PREFECT_API_URL": api,
            "SAEV_CACHE_DIR": str(self.dir / "cache"),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "1",
            WORKER_MARK: str(self.dir),
        }
        self.name = name
        self.proc = Proc(
            [str(BIN / "saev"), "worker", "--limit", "1"], self.dir / "worker.log", env, self.dir
        )
        request.addfinalizer(self.stop)

    def processes(self) -> list[int]:
        """Every live process of this worker: itself and its flow runs, found by the mark in
        their environment, so also those a stopped worker left behind (no longer its children)."""
        me = os.getpid()
        pids = [int(p.name) for p in Path("/proc").glob("[0-9]*") if int(p.name) != me]
        return [p for p in pids if environ(p).get(WORKER_MARK) == str(self.dir)]

    def stop(self) -> None:
        """SIGTERM the worker (its grace period), then SIGKILL whatever of it is left, looking
        again after each round until nothing is: a flow run it started meanwhile included."""
        self.proc.stop()
        deadline = time.time() + 30
        while left := self.processes():
            assert time.time() < deadline, f"{self.name}: {left} outlive SIGKILL"
            for p in left:
                kill_tree(p)
            time.sleep(0.2)


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def project(root: Path, tiny_vit: Path) -> Path:
    """The shared project: params, 200 images of a 32 px shapes world, the tiny backbone."""
    from saev_core.shapes import ShapesConfig, generate

    root.mkdir(parents=True)
    world = ShapesConfig(
        seed=5, image_size=32, n_train=120, n_val=40, n_test=40, min_radius=5, max_radius=9
    )
    generate(root / "data", world, progress=False)
    shutil.copytree(tiny_vit, root / "model")
    (root / "params.yaml").write_text(yaml.safe_dump({"extract": EXTRACT}))
    return root


def single_worker(root: Path, out: str) -> Path:
    """The reference: the same config extracted by one process in the project directory."""
    cwd = Path.cwd()
    os.chdir(root)
    try:
        extract(ExtractConfig(**{**EXTRACT, "layers": (0, -1), "out_dir": out}), progress=False)
    finally:
        os.chdir(cwd)
    return root / out


def polling(client) -> list:
    """The online workers of the local pool (none while the pool does not exist yet)."""
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    try:
        found = client.read_workers_for_work_pool("local")
    except (ObjectNotFound, PrefectHTTPStatusError):
        return []
    return [w for w in found if w.status.value == "ONLINE"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, request) -> str:
    """One Prefect server for this module's tests (each starts workers of its own); its API."""
    home = tmp_path_factory.mktemp("server")
    api, proc = start_prefect_server(home, request)
    wait_http(api + "/health", proc)
    return api


def wait_for_workers(client, workers: list[Worker], n: int) -> None:
    deadline = time.time() + 90
    while len(polling(client)) < n:
        assert time.time() < deadline, [w.proc.tail() for w in workers]
        time.sleep(0.5)


@pytest.mark.slow
def test_a_killed_workers_partition_finishes_on_the_other(server, tiny_vit, tmp_path, request):
    """On a shared path: the workers run in the project directory itself."""
    killed_partition(server, tiny_vit, tmp_path, request)


@pytest.mark.slow
def test_workers_with_own_directories_share_only_the_server_and_the_bucket(
    server, tiny_vit, tmp_path, request, s3_server
):
    """`SAEV_STAGING_URL=s3://saev/staging`: each worker runs in its own copy of the project,
    the plan comes from the bucket and every finished chunk goes there; the killed partition's
    retry takes the chunks the bucket has and extracts the rest."""
    killed_partition(server, tiny_vit, tmp_path, request, s3=s3_server)


def killed_partition(server, tiny_vit, tmp_path, request, s3=None) -> None:
    """The kill -9 test; `s3`: the MotoServer the chunks go through, else a shared path."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    t0 = time.time()
    api = server
    shared = project(tmp_path / "shared" / "project", tiny_vit)
    clone = shared if s3 else None
    workers = [Worker(n, tmp_path, api, request, clone) for n in ("worker-a", "worker-b")]
    started = time.time()
    reference = single_worker(shared, "single")  # while the workers start
    timings = {"single_process_extract_s": time.time() - started}

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as c:
        wait_for_workers(c, workers, 2)  # both polling the pool before anything is submitted

        env = {
            **base_env(mkdir(tmp_path / "orchestrator")),
            "PREFECT_API_URL": api,
            "SAEV_ZOMBIE_AFTER_S": str(ZOMBIE_AFTER_S),
        }
        # With the bucket, through the flag (the environment variable is the other way in).
        staged = ["--staging-url", f"s3://{s3.bucket}/staging"] if s3 else []
        started = time.time()
        orchestrator = Proc(
            [str(BIN / "saev"), "extract", "--partitions", "2", "--distributed", "--no-version"]
            + staged,
            tmp_path / "orchestrator.log",
            env,
            shared,
        )
        request.addfinalizer(orchestrator.stop)
        partition_flow = FlowFilter(name=FlowFilterName(any_=["extract-partition"]))

        submitted_after = started - 1  # the server holds the runs of the earlier tests too

        def partitions() -> dict:
            """This test's partition runs by name (the server is shared by the module's tests,
            which give their runs the same names)."""
            runs = c.read_flow_runs(flow_filter=partition_flow)
            return {r.name: r for r in runs if r.created.timestamp() >= submitted_after}

        # The worker that takes partition 0 is the victim: found in its log the moment it
        # starts the run's process, seconds before the partition has even loaded its backbone
        # (a partition of this size is done some 10 s later, too soon to watch the API for).
        deadline = time.time() + 240  # the server, two workers and a flow start on 2 cores
        claimed = "Flow run 'partition-0' submitted to infrastructure"
        victim = None
        while victim is None:
            assert orchestrator.popen.poll() is None, orchestrator.tail()
            assert time.time() < deadline, f"{partitions()}\n{orchestrator.tail()}"
            victim = next((w for w in workers if claimed in w.proc.tail(200_000)), None)
            time.sleep(0.1)
        survivor = next(w for w in workers if w is not victim)
        run = partitions()["partition-0"]
        chunks = run.parameters["chunks"]
        # Where the victim writes: the shared staging directory, or its own clone's.
        staging = (victim.dir if s3 else shared) / ".acts.partial"

        def done_here() -> list[str]:
            """The partition's chunks with their record in the victim's staging directory."""
            return [n for n in chunks if (staging / "chunks" / f"{n}.json").exists()]

        def finished() -> list[str]:
            """The partition's chunks done: their record in the bucket, or in the shared path."""
            if s3:
                found = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="staging/acts/")
                there = {Path(o["Key"]).name for o in found.get("Contents", [])}
                return [n for n in chunks if f"{n}.json" in there]
            return done_here()

        def half_written(pids: set[int]) -> list[Path]:
            """The victim's shard files not renamed yet (`<name>.<host>-<random>.<pid>.tmp`)."""
            owners = {str(p) for p in pids}
            return [t for t in staging.glob("layer=*/*.tmp") if t.name.split(".")[-2] in owners]

        # The machine dies mid-partition, mid-file: once a chunk is done (with the bucket, once
        # one is uploaded: looked at while the victim is frozen, which slows it down enough on
        # a busy machine), the victim is frozen (SIGSTOP) at a moment it has a shard file
        # half-written, then killed with SIGKILL.
        deadline = time.time() + 240
        while True:
            assert time.time() < deadline, f"no kill point\n{orchestrator.tail()}"
            assert len(done_here()) < len(chunks), "partition 0 finished before the kill"
            pids = {victim.proc.pid, *children_of(victim.proc.pid)}
            for p in pids:  # the victim yields the CPU to this loop on a busy machine (CI)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.setpriority(os.PRIO_PROCESS, p, 19)
            if done_here() and half_written(pids):
                for p in pids:
                    os.kill(p, signal.SIGSTOP)
                if half_written(pids) and finished():
                    break
                for p in pids:  # it renamed the file meanwhile: let it go on, try again
                    os.kill(p, signal.SIGCONT)
            time.sleep(0.002)
        left_behind = half_written(pids)
        kill_tree(victim.proc.pid)
        killed_at = time.time()
        finished_at_kill = finished()
        done_at_kill = len(finished_at_kill)
        assert 0 < done_at_kill < len(chunks), "the partition finished before the kill"
        assert victim.proc.popen.wait(10) == -signal.SIGKILL
        assert all(t.exists() for t in left_behind)  # what a real crash leaves

        assert orchestrator.popen.wait(360) == 0, orchestrator.tail()
        timings["distributed_extract_s"] = time.time() - started
        runs = partitions()

        # The killed run was marked Crashed by the zombie automation, for want of heartbeats.
        crashed = runs["partition-0"]
        assert crashed.state.is_crashed(), crashed.state
        assert "no heartbeat" in crashed.state.message
        retry = runs["partition-0-try2"]
        assert retry.state.is_completed(), retry.state
        assert runs["partition-1"].state.is_completed()
        assert set(runs) == {"partition-0", "partition-1", "partition-0-try2"}
        # Only the survivor was left to run it, and it redid only what the victim had not done.
        assert survivor.proc.popen.poll() is None
        took = "Flow run 'partition-0-try2' submitted to infrastructure"
        assert took in survivor.proc.tail(200_000) and took not in victim.proc.tail(200_000)
        logs = [
            entry.message
            for entry in c.read_logs(LogFilter(flow_run_id={"any_": [retry.id]}), limit=200)
        ]
        ran = next(m for m in logs if "chunks extracted here" in m)
        n_ran = int(ran.split(": ", 1)[1].split(" of ")[0])
        assert n_ran == len(chunks) - done_at_kill, (ran, done_at_kill)
        timings["kill_to_crashed_s"] = crashed.state.timestamp.timestamp() - killed_at
        timings["kill_to_retry_done_s"] = retry.end_time.timestamp() - killed_at

    # One manifest over both partitions' chunks: the very bytes of the single-worker run.
    # The killed run's half-written files are gone, not published: no `.tmp` in the set.
    manifest = json.loads((shared / "acts" / "manifest.json").read_text())
    assert manifest["n_images"] == 200
    assert not [p for p in (shared / "acts").rglob("*") if p.name.endswith(".tmp")]
    assert digest(shared / "acts") == digest(reference)  # every file, by sha256
    assert not (shared / ".acts.partial").exists()
    log = orchestrator.tail(20000)
    assert "partition-0: flow run 'partition-0' crashed" in log
    if s3:
        # The half-written files stayed on the dead machine; nothing of them reached the bucket,
        # and each worker wrote in its own directory, never in the project here.
        assert all(t.exists() for t in left_behind)
        assert "temporary file(s) of killed partitions" not in log
        # all fetched from the bucket, from the plan's own folder
        assert re.search(rf"s3://{s3.bucket}/staging/acts/[0-9a-f]{{12}}: 100 chunks", log), log
        # and once the set is published, the plan's folder is emptied
        left = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="staging/acts/")
        assert not left.get("Contents"), [o["Key"] for o in left["Contents"]][:5]
        theirs = runs["partition-1"].parameters["chunks"]
        mine = {p.stem for p in (survivor.dir / ".acts.partial" / "chunks").glob("*.json")}
        assert mine == set(theirs) | (set(chunks) - set(finished_at_kill))
        for w in workers:
            assert not (w.dir / "acts").exists()  # the merge happened on the orchestrator only
    else:
        assert f"removed {len(left_behind)} temporary file(s) of killed partitions" in log
    timings["chunks_done_when_killed"] = f"{done_at_kill} of {len(chunks)}"
    timings["half_written_files_left_by_the_kill"] = len(left_behind)
    timings["total_s"] = time.time() - t0
    timings["mode"] = "bucket, own directories" if s3 else "shared path"
    print(f"timings: {json.dumps(timings)}")


@pytest.mark.slow
def test_chunks_through_the_bucket_merge_to_a_single_process_run(
    s3_server, tiny_vit, tmp_path, monkeypatch
):
    """`BucketStaging` without Prefect: the head plans and uploads the plan; two clones of the
    project (same relative paths, their own disks) each extract a partition into the bucket;
    the head fetches the chunks, merges them, then empties the plan's folder in the bucket. A
    chunk already in the bucket is never extracted again, one finished on a clone but not
    uploaded is uploaded, not redone."""
    from flows.distributed import BucketStaging, finish_bucket, staging_url
    from saev_core.extract import merge_partitions, plan_partitions

    head = project(tmp_path / "head", tiny_vit)
    clones = [shutil.copytree(head, tmp_path / n) for n in ("clone-a", "clone-b")]
    reference = single_worker(head, "single")
    cfg = ExtractConfig(**{**EXTRACT, "layers": (0, -1)})
    url = staging_url(f"s3://{s3_server.bucket}/runs/")
    assert url == "s3://saev/runs"
    monkeypatch.chdir(head)
    parts = plan_partitions(cfg, 2)["partitions"]
    published = BucketStaging(cfg, url)
    published.publish_plan()
    plan = published.key  # what each piece gets as its `plan_key`
    staged = (head / ".acts.partial" / "plan.json").read_bytes()
    assert plan == hashlib.sha256(staged).hexdigest()[:12]

    monkeypatch.chdir(clones[0])
    assert BucketStaging(cfg, url, key=plan).extract(parts[0]) == parts[0]
    bucket = s3_server.client()
    key = f"runs/acts/{plan}/chunks/{parts[0][0]}.json"
    bucket.delete_object(Bucket="saev", Key=key)  # as if the upload died before the record
    assert BucketStaging(cfg, url, key=plan).extract(parts[0]) == []  # uploaded, not redone
    assert bucket.head_object(Bucket="saev", Key=key)["ContentLength"] > 0
    monkeypatch.chdir(clones[1])
    assert BucketStaging(cfg, url, key=plan).extract(parts[1] + parts[0]) == parts[1]
    assert not (clones[1] / ".acts.partial" / "chunks" / f"{parts[0][0]}.json").exists()

    monkeypatch.chdir(head)
    staging = BucketStaging(cfg, url)
    assert staging.key == plan
    assert staging.done() == set(parts[0]) | set(parts[1])
    assert sorted(staging.fetch_chunks()) == sorted(parts[0] + parts[1])
    with pytest.raises(RuntimeError, match="not cleared, acts has no manifest.json yet"):
        finish_bucket(cfg, staging)  # before the merge: the bucket's chunks stay
    assert merge_partitions(cfg)["n_images"] == 200
    assert digest(head / "acts") == digest(reference)
    assert [p.name for p in tmp_path.glob("head/.*")] == []  # no staging or temporary left
    finish_bucket(cfg, staging)  # after it: the plan's folder is emptied
    assert bucket.list_objects_v2(Bucket="saev", Prefix="runs/").get("KeyCount", 0) == 0
    for clone in clones:
        assert not (clone / "acts").exists()
    with pytest.raises(ValueError, match="not an object-store URL"):
        staging_url("/shared/staging")


@pytest.mark.slow
def test_distributed_sweep_members_are_flow_runs(server, tiny_world, tiny_vit, tmp_path, request):
    """`train.sweep.distribute: true`: each member its own flow run, landing where the one-pass
    sweep puts it; the main SAE trains in the submitting flow meanwhile."""
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from saev_core.training.stage import TrainStage, train_stage

    api = server
    root = tmp_path / "shared" / "project"
    root.mkdir(parents=True)
    acts = root / "acts"
    cfg = ExtractConfig(model=str(tiny_vit), data=str(tiny_world), out_dir=str(acts), layers=(1,))
    extract(replace_cfg(cfg), progress=False)
    sae = {"arch": "topk", "expansion": 2, "k": 4, "batch_size": 32, "n_epochs": 1}
    members = {"k2": {"k": 2}, "k8": {"k": 8}}
    train = {"shard_dir": "acts", "layer": 1, "eval_split": "val", "out_dir": "saes/t", "sae": sae}
    params = {"train": {**train, "sweep": {"distribute": True, **members}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    workers = [Worker("worker", tmp_path, api, request)]
    # The one-pass sweep of the same section, for the layout it writes.
    one_pass = train_stage(
        TrainStage(
            **{**train, "shard_dir": str(acts), "out_dir": str(tmp_path / "one")}, sweep=members
        ),
        progress=False,
    )
    assert set(one_pass["sweep"]) == set(members)

    # A tracking server every worker reaches: a distributed sweep refuses a local store.
    tracking, mlflow_proc = start_mlflow_server(mkdir(tmp_path / "mlflow"), request)
    wait_http(f"{tracking}/health", mlflow_proc)
    env = {**base_env(mkdir(tmp_path / "orchestrator")), "PREFECT_API_URL": api}
    env["MLFLOW_TRACKING_URI"] = tracking
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as c:
        wait_for_workers(c, workers, 1)
        orchestrator = Proc([str(BIN / "saev"), "train"], tmp_path / "train.log", env, root)
        request.addfinalizer(orchestrator.stop)
        assert orchestrator.popen.wait(300) == 0, orchestrator.tail()
        member_flow = FlowFilter(name=FlowFilterName(any_=["train-member"]))
        runs = {r.name: r for r in c.read_flow_runs(flow_filter=member_flow)}
    assert set(runs) == set(members)
    assert all(r.state.is_completed() and "saev-fan-out" in r.tags for r in runs.values())

    out = root / "saes" / "t"
    layout = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    one = tmp_path / "one"
    assert layout == sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file())
    for name, overrides in members.items():
        saved = json.loads((out / "sweep" / name / "cfg.json").read_text())
        assert saved["sae"]["k"] == overrides["k"] and saved["extra"]["layer"] == 1
    assert json.loads((out / "cfg.json").read_text())["sae"]["k"] == 4
    assert not (root / "saes" / ".t.sweep").exists()
    rows = json.loads((root / "metrics" / "train_sweep.json").read_text())
    assert sorted(r["name"] for r in rows) == ["k2", "k8", "main"]
    assert [r["l0"] for r in rows] == sorted(r["l0"] for r in rows)

    found = mlflow.MlflowClient(tracking).search_runs(
        [mlflow.MlflowClient(tracking).get_experiment_by_name("train").experiment_id]
    )
    sweep_ids = {r.data.tags.get("sweep_id") for r in found}
    assert len(found) == 3 and len(sweep_ids) == 1 and None not in sweep_ids
    assert sorted(r.data.tags.get("member", "main") for r in found) == ["k2", "k8", "main"]


def replace_cfg(cfg: ExtractConfig) -> ExtractConfig:
    """The tiny world's shards, small files (the service test's sizes)."""
    from dataclasses import replace

    return replace(cfg, batch_size=4, images_per_row_group=2, images_per_file=4, n_workers=1)


def test_sweep_distribute_is_a_flag_not_a_member():
    from saev_core.training.stage import TrainStage

    sae = {"arch": "topk", "expansion": 2, "k": 4}
    io = TrainStage(sae=sae, sweep={"distribute": True, "k2": {"k": 2}})
    assert io.distribute_sweep and io.sweep == {"k2": {"k": 2}}
    io = TrainStage(sae=sae, sweep={"distribute": False, "k2": {"k": 2}})
    assert not io.distribute_sweep and io.sweep == {"k2": {"k": 2}}
    with pytest.raises(ValueError, match="sweep.distribute must be true or false"):
        TrainStage(sae=sae, sweep={"distribute": {"k": 2}})


def test_distributed_without_a_server_says_what_is_missing(monkeypatch, capsys, tmp_path):
    from saev_core.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))  # no profile with an API url either
    assert main(["extract", "--partitions", "2", "--distributed"]) == 1
    err = capsys.readouterr().err
    assert "needs a Prefect server and workers" in err and "saev worker" in err


@pytest.mark.slow
def test_a_run_stuck_pending_is_crashed_and_unclaimed_pieces_are_cancelled(
    server, tmp_path, monkeypatch, capsys
):
    """A worker that dies after claiming a run, before starting it, leaves the run Pending with
    no heartbeat ever: the waiting flow marks it Crashed and submits it again. A piece that no
    worker takes gets a warning (Scheduled or Late, never Pending); the wait's overall timeout
    raises a clear error, and every piece not finished is then set Cancelling."""
    from dataclasses import replace

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Pending

    from flows.deploy import FANOUT, ensure_pool, to_deployment
    from flows.distributed import FanOut

    monkeypatch.setenv("PREFECT_API_URL", server)
    pieces = {f"idle-{i}": {"cfg": {}, "chunks": []} for i in range(2)}
    with temporary_settings(updates={PREFECT_API_URL: server}), get_client(sync_client=True) as c:
        ensure_pool("idle")  # a pool that no worker polls
        to_deployment(
            replace(FANOUT["extract"], name="no-worker"), "idle", "p.yaml", tmp_path
        ).apply()
        fan = FanOut(
            "extract-partition/no-worker",
            pieces,
            resubmit=1,
            poll_s=0.2,
            pending_after_s=3,
            unclaimed_s=1.5,
        )
        with pytest.raises(TimeoutError, match=r"not done after 12 s: idle-0 \((Scheduled|Late)\)"):
            with fan:
                fan.submit()
                first = fan.runs["idle-0"]
                c.set_flow_run_state(first.id, Pending())  # taken by a worker that then died
                fan.wait(timeout_s=12)
        crashed = c.read_flow_run(first.id)
        assert crashed.state.is_crashed(), crashed.state
        assert "Pending for" in crashed.state.message
        assert fan.runs["idle-0"].name == "idle-0-try2" and fan.tries["idle-0"] == 1
        # The retry and the piece never taken: both cancelled (Prefect turns Cancelling into
        # Cancelled at once for a Scheduled run, which has no process to stop).
        for label in pieces:
            state = c.read_flow_run(fan.runs[label].id).state
            assert state.type == StateType.CANCELLED, (label, state)
    said = capsys.readouterr()
    assert "idle-0: flow run 'idle-0' Pending for" in said.out and "marking it Crashed" in said.out
    assert "cancelled idle-0, idle-1" in said.out
    for label, name in (("idle-0", "idle-0-try2"), ("idle-1", "idle-1")):
        assert f"warning: {label}: flow run {name!r} has waited" in said.err
    assert "flow run 'idle-0' has waited" not in said.err  # Pending is not unclaimed
    assert "work pool 'idle'" in said.err and "--limit" in said.err


def test_a_distributed_sweep_refuses_a_local_tracking_store(monkeypatch, tmp_path, capsys):
    from flows.distributed import require_shared_tracking
    from saev_core.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="unset"):
        require_shared_tracking("train.sweep.distribute")
    for local in ("sqlite:////shared/mlruns/mlflow.db", "file:///shared/mlruns", "/shared/mlruns"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", local)
        with pytest.raises(ValueError, match="an MLflow tracking store every worker reaches"):
            require_shared_tracking("train.sweep.distribute")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.lab:5000")
    assert require_shared_tracking("x") == "http://mlflow.lab:5000"

    # `saev train` says so before anything starts (no temporary server, no training).
    sae = {"arch": "topk", "expansion": 2, "k": 4}
    sweep = {"distribute": True, "k2": {"k": 2}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"out_dir": "saes/t", "sae": sae, "sweep": sweep}}))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["train", "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "train.sweep.distribute needs an MLflow tracking store" in err
    assert "MLFLOW_TRACKING_URI=http://HOST:5000" in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "saes").exists()


def test_register_uses_the_newest_finished_run_of_each_member(monkeypatch, tmp_path):
    """A member whose machine died left an MLflow run RUNNING with the sweep's tags; its
    resubmitted flow run finished another. Only finished runs count, the newest of each."""
    from mlflow.tracking import MlflowClient

    from flows.train import sweep_run_ids

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.create_experiment("train")

    def run(member: str | None, start_ms: int, status: str | None, sweep: str = "s1") -> str:
        tags = {"sweep_id": sweep, **({"member": member} if member else {})}
        made = client.create_run(experiment, start_time=start_ms, tags=tags)
        if status:
            client.set_terminated(made.info.run_id, status=status)
        return made.info.run_id

    main = run(None, 1_000, "FINISHED")
    run("k2", 2_000, "FINISHED")  # an older finished run of k2 (a rerun of the sweep's member)
    k2 = run("k2", 3_000, "FINISHED")
    run("k2", 4_000, None)  # the crashed try: newest, but still RUNNING
    run("k8", 5_000, None)  # k8 crashed and never finished
    k8 = run("k8", 1_500, "FINISHED")
    run("k2", 9_000, "FINISHED", sweep="s2")  # another sweep
    assert sweep_run_ids("s1") == {"main": main, "k2": k2, "k8": k8}


def test_temporaries_of_a_killed_partition_are_dropped_before_the_merge(tmp_path):
    from flows.distributed import drop_temporaries

    staging = tmp_path / ".acts.partial"
    kept = [staging / "layer=0" / "train-00000.parquet", staging / "plan.json"]
    dropped = [
        staging / "layer=0" / "train-00001.parquet.4242.tmp",
        staging / "layer=11" / "val-00000.parquet.77.tmp",
    ]
    for path in kept + dropped:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    cfg = ExtractConfig(model="m", data="d", out_dir=str(tmp_path / "acts"))
    assert sorted(drop_temporaries(cfg)) == sorted(dropped)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in dropped)
    assert drop_temporaries(cfg) == []


# ---------------------------------------------------------------------------------------------
# The bucket's folders, without an extraction: plans staged by hand (a plan's chunk names are all
# these steps read), moto's server for the bucket.


def stage_plan(project_dir: Path, names: list[str], seed: int) -> Path:
    """A staged plan of chunks `names` in `<project_dir>/.acts.partial/` (`seed` tells plans of
    other inputs apart); the project directory."""
    partial = mkdir(project_dir / ".acts.partial" / "chunks")
    plan = {"identity": {"seed": seed}, "chunks": [{"name": n, "keys": []} for n in names]}
    (partial.parent / "plan.json").write_text(json.dumps(plan))
    return project_dir


def objects(s3, prefix: str) -> set[str]:
    found = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    return {o["Key"] for o in found.get("Contents", [])}


def test_bucket_folders_are_keyed_by_the_plan_and_workers_check_the_key(
    s3_server, tmp_path, monkeypatch
):
    """Two extractions whose out_dirs share a name, with other plans, use other folders: the
    records of one never count for the other, even with its plan file deleted (an interrupted
    clean-up). A rerun of the same plan resumes from its folder. A worker finds the folder by
    the key in its flow parameters and refuses a plan there whose hash is not the key."""
    from flows.distributed import (
        BucketStaging,
        extract_partition_flow,
        partition_pieces,
        staging_url,
    )
    from saev_core.config import to_dict

    url = staging_url(f"s3://{s3_server.bucket}/runs")
    cfg = ExtractConfig(model="model", data="data", out_dir="acts")
    a = stage_plan(tmp_path / "a", ["c0", "c1"], seed=1)
    b = stage_plan(tmp_path / "b", ["c0", "c1"], seed=2)

    monkeypatch.chdir(a)
    head_a = BucketStaging(cfg, url)
    head_a.publish_plan()
    raw_a = (a / ".acts.partial" / "plan.json").read_bytes()
    assert head_a.key == hashlib.sha256(raw_a).hexdigest()[:12]
    assert head_a.url == f"s3://saev/runs/acts/{head_a.key}"
    record = f"runs/acts/{head_a.key}/chunks/c0.json"
    s3_server.client().put_object(Bucket="saev", Key=record, Body=b"{}")  # c0 done under a
    assert head_a.done() == {"c0"}

    monkeypatch.chdir(b)
    head_b = BucketStaging(cfg, url)
    assert head_b.key != head_a.key
    head_b.publish_plan()
    assert head_b.done() == set()  # a's record is not b's
    assert objects(s3_server, f"runs/acts/{head_a.key}/") == {
        f"runs/acts/{head_a.key}/plan.json",
        record,
    }  # and b's run left a's folder alone
    # a's plan file gone, its record left (a deletion cut short): still nothing of it for b
    s3_server.client().delete_object(Bucket="saev", Key=f"runs/acts/{head_a.key}/plan.json")
    assert BucketStaging(cfg, url).done() == set()

    monkeypatch.chdir(a)  # the same plan again: the same folder, its chunk still done
    rerun = BucketStaging(cfg, url)
    rerun.publish_plan()
    assert rerun.key == head_a.key and rerun.done() == {"c0"}

    # Each piece gets the prefix and the key; the worker, in a directory of its own, uses them.
    pieces = partition_pieces(cfg, [["c0"], ["c1"]], rerun)
    assert [p["chunks"] for p in pieces.values()] == [["c0"], ["c1"]]
    assert {(p["staging_url"], p["plan_key"]) for p in pieces.values()} == {(url, head_a.key)}
    assert "plan_key" not in partition_pieces(cfg, [["c0"]])["partition-0"]
    monkeypatch.chdir(mkdir(tmp_path / "worker"))
    assert extract_partition_flow.fn(**pieces["partition-0"]) == []  # c0 is in the bucket
    assert (tmp_path / "worker" / ".acts.partial" / "plan.json").read_bytes() == raw_a
    with pytest.raises(ValueError, match="needs the plan_key"):
        extract_partition_flow.fn(to_dict(cfg), ["c0"], staging_url=url)
    # Another plan's bytes under a's key: the worker refuses it, and so does a head.
    plan_b = (b / ".acts.partial" / "plan.json").read_bytes()
    s3_server.client().put_object(
        Bucket="saev", Key=f"runs/acts/{head_a.key}/plan.json", Body=plan_b
    )
    with pytest.raises(ValueError, match="not the plan this folder is keyed by"):
        BucketStaging(cfg, url, key=head_a.key).fetch_plan()
    monkeypatch.chdir(a)
    with pytest.raises(ValueError, match="not the plan this folder is keyed by"):
        BucketStaging(cfg, url).publish_plan()
    with pytest.raises(FileNotFoundError, match="pass the key"):
        monkeypatch.chdir(tmp_path)  # no staged plan here, no key given
        BucketStaging(cfg, url)


def test_the_bucket_folder_is_cleared_once_the_set_is_published(
    s3_server, tmp_path, monkeypatch, capsys
):
    """`finish_bucket` refuses until the set published in out_dir ends with this plan's chunks
    (before the merge the bucket holds the only copy); then the plan's folder goes, records
    first, and another plan's folder under the same out_dir name stays. A deletion that fails
    (s3fs passes botocore's errors on, no OSError) is a warning: the set is published. An
    extraction with nothing to do stages no plan and needs no bucket folder."""
    from flows.distributed import BucketStaging, finish_bucket, run_partitions

    url = f"s3://{s3_server.bucket}/runs"
    cfg = ExtractConfig(model="model", data="data", out_dir="acts")
    other = stage_plan(tmp_path / "other", ["c0"], seed=2)
    monkeypatch.chdir(other)
    kept = BucketStaging(cfg, url)
    kept.publish_plan()

    here = stage_plan(tmp_path / "here", ["c0", "c1"], seed=1)
    monkeypatch.chdir(here)
    staging = BucketStaging(cfg, url)
    staging.publish_plan()
    for n in ("c0", "c1"):  # a chunk's table and its record, as a worker uploads them
        for f in (f"chunks/{n}.images.parquet", f"chunks/{n}.json"):
            s3_server.client().put_object(Bucket="saev", Key=f"runs/acts/{staging.key}/{f}")
    assert len(objects(s3_server, f"runs/acts/{staging.key}/")) == 5

    with pytest.raises(RuntimeError, match="has no manifest.json yet"):
        finish_bucket(cfg, staging)
    assert len(objects(s3_server, f"runs/acts/{staging.key}/")) == 5
    # What the merge's publication does: the staging directory becomes out_dir, a manifest in it
    # whose history ends with the plan's chunks.
    os.replace(here / ".acts.partial", here / "acts")
    manifest = here / "acts" / "manifest.json"
    manifest.write_text(json.dumps({"history": [{"chunks": ["c0", "c1"]}, {"chunks": ["c0"]}]}))
    with pytest.raises(RuntimeError, match="is not this plan's"):
        finish_bucket(cfg, staging)  # an earlier extraction's set, this plan's not merged yet
    manifest.write_text(json.dumps({"history": [{"chunks": ["c0", "c1"]}]}))

    class EndpointConnectionError(Exception):  # botocore's kind: no OSError
        pass

    def unreachable():
        raise EndpointConnectionError("Could not connect to the endpoint URL")

    monkeypatch.setattr(staging, "clear", unreachable)
    finish_bucket(cfg, staging)  # a warning only
    assert "could not delete the staged chunks" in capsys.readouterr().err
    assert len(objects(s3_server, f"runs/acts/{staging.key}/")) == 5
    monkeypatch.undo()
    monkeypatch.chdir(here)
    finish_bucket(cfg, staging)
    assert objects(s3_server, f"runs/acts/{staging.key}/") == set()
    assert objects(s3_server, "runs/acts/") == {f"runs/acts/{kept.key}/plan.json"}
    staging.clear()  # again, on an empty folder: nothing to do, no error
    finish_bucket(cfg, None)  # no bucket: nothing to do
    # Up to date: no partition, no plan staged; no server, no bucket folder needed.
    monkeypatch.chdir(mkdir(tmp_path / "up-to-date"))
    assert run_partitions(cfg, [], staging=url) is None


def test_a_workers_dead_temporaries_go_before_its_partition_runs(s3_server, tmp_path, monkeypatch):
    """In bucket mode a worker's half-written files never leave its disk: its partition drops
    those of dead writers of this host before it starts, and spares a live writer's (another
    partition running on the same machine) and another host's."""
    import socket
    import subprocess

    from flows.distributed import BucketStaging, drop_temporaries

    url = f"s3://{s3_server.bucket}/runs"
    cfg = ExtractConfig(model="model", data="data", out_dir="acts")
    monkeypatch.chdir(stage_plan(tmp_path / "head", ["c0"], seed=1))
    head = BucketStaging(cfg, url)
    head.publish_plan()
    record = f"runs/acts/{head.key}/chunks/c0.json"
    s3_server.client().put_object(Bucket="saev", Key=record, Body=b"{}")

    monkeypatch.chdir(mkdir(tmp_path / "worker"))
    worker = BucketStaging(cfg, url, key=head.key)
    worker.fetch_plan()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a PID no process has any more
    host, layer = socket.gethostname(), worker.local / "layer=0"
    dead = [
        layer / f"train-00000.parquet.{host}-0123abcd.{gone.pid}.tmp",
        worker.local / "layer=11" / f"val-00000.parquet.{host}-ffff0000.{gone.pid}.tmp",
        layer / f"train-00001.parquet.{gone.pid}.tmp",  # the older name, no host in it
    ]
    live = [
        layer / f"train-00002.parquet.{host}-89abcdef.{os.getpid()}.tmp",
        layer / f"train-00003.parquet.not-{host}-00112233.{gone.pid}.tmp",
        layer / f"train-00005.parquet.other.{host}-00112233.{gone.pid}.tmp",  # host `other.<us>`
    ]
    finished = layer / "train-00004.parquet"
    for path in dead + live + [finished]:
        mkdir(path.parent)
        path.write_bytes(b"x")

    assert worker.extract(["c0"]) == []  # c0 is in the bucket: nothing to extract
    assert not any(p.exists() for p in dead)
    assert all(p.exists() for p in live) and finished.exists()
    assert sorted(drop_temporaries(cfg)) == sorted(live)  # the head's way: every one
    assert finished.exists()


def test_pipeline_and_refresh_take_a_staging_url(monkeypatch, capsys, tmp_path):
    """`saev pipeline` and `saev refresh` take `--staging-url` like `saev extract`: only with
    --distributed, checked (the command and the flow) before anything starts."""
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline_flow
    from flows.refresh import refresh_flow
    from saev_core.cli import main

    for flow in (pipeline_flow, refresh_flow):  # a deployment run may set it
        schema = parameter_schema(flow.fn).model_dump()
        assert schema["properties"]["staging_url"]["default"] is None
    for command in ("pipeline", "refresh"):
        with pytest.raises(SystemExit, match=f"saev {command}: --staging-url needs --distributed"):
            main([command, "--staging-url", "s3://saev/staging"])
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    for command in ("pipeline", "refresh"):
        argv = [command, "--distributed", "--staging-url", "/shared/staging"]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"saev {command}: error:" in err and "not an object-store URL" in err
    # The flows check it too (a deployment run passes it as a parameter), and the default is
    # $SAEV_STAGING_URL.
    params = str(tmp_path / "params.yaml")
    with pytest.raises(ValueError, match="not an object-store URL"):
        pipeline_flow.fn(params=params, distributed=True, staging_url="/shared/staging")
    monkeypatch.setenv("SAEV_STAGING_URL", "/shared/staging")
    with pytest.raises(ValueError, match="not an object-store URL"):
        refresh_flow.fn(params=params, distributed=True)
    assert not (tmp_path / "params.yaml").exists()
