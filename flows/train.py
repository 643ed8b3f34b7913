"""Flow `train`: train the SAE (and its sweep, on one pass of the data), log to MLflow, write DVC metrics.

MLflow: the main SAE is the run; each sweep member is a nested run under it, each with its
training curves, final L0/FVU/dead/dense, feature-density histogram, checkpoint artifact and the
git-commit and shard-manifest tags. DVC: `metrics/train.json` (the main SAE) and
`metrics/train_sweep.json`, one row per SAE, which `dvc plots show` draws as L0 against FVU.

The sweep runs inside this one flow (members share the data pass), so `saev deploy`
(flows/deploy.py) sends it whole to the `gpu` work pool when that pool exists, else to the local
one; run here, it trains in this process. With `train.sweep.distribute: true` each member is
instead its own flow run on the GPU pool (flows/distributed.py), trained while this flow trains
the main SAE; the members then land in `<out_dir>/sweep/<name>/` as the one-pass sweep's do, and
their MLflow runs carry the tags `sweep_id` (this flow run) and `member`. That needs a tracking
server every worker reaches (`MLFLOW_TRACKING_URI=http://...`): with the local sqlite default the
stage refuses to start. Should the main SAE's training fail, the members still running are
cancelled.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import Any

from prefect import flow, task

from flows.common import file_sha256, mlflow_logger, mlflow_run, stage_main, write_metrics
from saev_core import registry
from saev_core.training.stage import TrainStage, scalars, train_stage

METRICS = "metrics/train.json"
SWEEP_METRICS = "metrics/train_sweep.json"


def _log_final(client: Any, run_id: str, metrics: dict, sae_dir: str) -> None:
    """Final metrics, density histogram and the checkpoint, into run `run_id`."""
    import matplotlib.pyplot as plt
    from mlflow.entities import Metric

    from saev_core.plots import density_histogram

    now = int(time.time() * 1000)
    final = [Metric(k, v, now, 0) for k, v in scalars(metrics).items()]
    final += [Metric(f"timing/{k}", float(v), now, 0) for k, v in metrics["timing"].items()]
    client.log_batch(run_id, metrics=final)
    fig = density_histogram(metrics["freq"])
    client.log_figure(run_id, fig, "feature_density.png")
    plt.close(fig)
    client.log_artifacts(run_id, sae_dir, artifact_path="sae")


@task  # no cache and no retries: training is the expensive, non-idempotent part
def train_task(io: TrainStage, tags: dict[str, str] | None = None) -> tuple[dict, list[dict]]:
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    manifest = f"{io.shard_dir}/manifest.json"
    tags = {"shard_manifest_sha256": file_sha256(manifest), "stage": "train", **(tags or {})}
    out = io.out_dir.rstrip("/")
    with mlflow_run("train", run_name=out.split("/")[-1], tags=tags) as parent:
        client = MlflowClient()
        mlflow.log_params({"layer": io.layer, "tokens": io.tokens, **io.sae})
        # a distributed sweep's main run names the members training elsewhere (in `tags`)
        mlflow.set_tag("sweep_members", ",".join(io.sweep) or tags.get("sweep_members", "none"))
        children = {}
        for name, overrides in io.sweep.items():
            child = client.create_run(
                parent.info.experiment_id,
                run_name=name,
                tags={
                    **{k: v for k, v in parent.data.tags.items() if not k.startswith("mlflow.")},
                    "mlflow.parentRunId": parent.info.run_id,
                    "member": name,
                },
            )
            for key, value in {**io.sae, **overrides}.items():
                client.log_param(child.info.run_id, key, value)
            children[name] = child.info.run_id

        def member_log(name: str):
            def log(metrics: dict[str, float], step: int) -> None:
                now = int(time.time() * 1000)
                batch = [Metric(f"train/{k}", float(v), now, step) for k, v in metrics.items()]
                client.log_batch(children[name], metrics=batch)

            return log

        metrics = train_stage(io, log=mlflow_logger("train/"), member_log=member_log)
        sweep = metrics.pop("sweep")
        _log_final(client, parent.info.run_id, metrics, out)
        for name, m in sweep.items():
            _log_final(client, children[name], m, f"{out}/sweep/{name}")
            client.set_terminated(children[name])

    run_ids = {"main": parent.info.run_id, **children}
    rows = [sweep_row("main", io.sae, metrics)]
    rows += [sweep_row(n, {**io.sae, **io.sweep[n]}, sweep[n]) for n in io.sweep]
    rows = sorted(rows, key=lambda r: r["l0"])
    if io.register_as:
        register_best(io, rows, run_ids)
    return scalars(metrics), rows


def sweep_row(name: str, sae: dict, metrics: dict) -> dict:
    """One row of `metrics/train_sweep.json`: the SAE's knobs and its held-out figures."""
    from saev_core.config import from_dict
    from saev_core.training import TrainConfig

    c = from_dict(TrainConfig, sae)
    return {
        "name": name,
        "arch": c.arch,
        "k": c.k,
        "l1_coeff": c.l1_coeff,
        "lr": c.lr,
        **{
            k: v
            for k, v in scalars(metrics).items()
            if k in ("l0", "fvu", "dead_frac", "dense_frac")
        },
    }


def distributed_sweep(io: TrainStage) -> tuple[dict, list[dict]]:
    """The main SAE in this flow while each sweep member trains in its own flow run on the
    pool's workers (flows/distributed.py); the same outputs as `train_task` gives a sweep."""
    import uuid

    from prefect.runtime import flow_run

    from flows.distributed import run_members

    sweep_id = str(flow_run.get_id() or uuid.uuid4())
    members = run_members(io, sweep_id)  # submitted: they train while the main SAE does
    main = replace(io, sweep={}, distribute_sweep=False, register_as="")
    with members:  # the main SAE's training raising, or the wait failing, cancels the members
        metrics, rows = train_task(
            main, tags={"sweep_members": ",".join(io.sweep), "sweep_id": sweep_id}
        )
        cfgs = members.wait()
    for name, cfg in cfgs.items():
        rows.append(sweep_row(name, cfg["extra"]["train"], cfg["extra"]["metrics"]))
    rows = sorted(rows, key=lambda r: r["l0"])
    if io.register_as:
        register_best(io, rows, sweep_run_ids(sweep_id))
    return metrics, rows


def sweep_run_ids(sweep_id: str) -> dict[str, str]:
    """`{member or "main": MLflow run id}` of a distributed sweep's runs in experiment `train`:
    finished runs only (a member whose machine died left its run RUNNING, with the same tags),
    and the newest of a member that ran more than once (its resubmitted flow run)."""
    import mlflow

    found = mlflow.search_runs(
        experiment_names=["train"],
        filter_string=f"tags.sweep_id = '{sweep_id}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    run_ids: dict[str, str] = {}
    for run in found:  # newest first: the first of each member is the one to keep
        run_ids.setdefault(run.data.tags.get("member", "main"), run.info.run_id)
    return run_ids


def best_sae(rows: list[dict], max_l0: float) -> dict | None:
    """The row of the lowest FVU among SAEs with L0 <= `max_l0` and under 10% dead features."""
    ok = [r for r in rows if r["l0"] <= max_l0 and r["dead_frac"] < 0.1]
    return min(ok, key=lambda r: r["fvu"]) if ok else None


def register_best(io: TrainStage, rows: list[dict], run_ids: dict[str, str]) -> None:
    """A new version of registered model `io.register_as`: the best SAE's checkpoint artifact."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    best = best_sae(rows, io.register_max_l0)
    if best is None:
        print(f"no SAE with L0 <= {io.register_max_l0} and < 10% dead: nothing registered")
        return
    if best["name"] not in run_ids:
        raise RuntimeError(
            f"best SAE {best['name']!r} has no finished MLflow run (runs found: "
            f"{sorted(run_ids)}): nothing registered as {io.register_as}"
        )
    client = MlflowClient()
    try:
        client.create_registered_model(io.register_as)
    except MlflowException:
        pass  # it exists: add a version
    run_id = run_ids[best["name"]]
    version = client.create_model_version(
        io.register_as,
        source=f"{client.get_run(run_id).info.artifact_uri}/sae",
        run_id=run_id,
        tags={"member": best["name"], "l0": str(best["l0"]), "fvu": str(best["fvu"])},
    )
    print(
        f"registered {best['name']} (L0 {best['l0']:.1f}, FVU {best['fvu']:.3f}) as "
        f"{io.register_as} version {version.version}"
    )


@flow(name="train", log_prints=True)
def train_flow(params: str = "params.yaml", overrides: dict | None = None) -> dict:
    io = registry.load("train", params, overrides)
    if io.distribute_sweep and io.sweep:
        metrics, rows = distributed_sweep(io)
    else:
        metrics, rows = train_task(io)
    write_metrics(METRICS, metrics, overrides)
    write_metrics(SWEEP_METRICS, rows, overrides)
    print(
        f"SAE in {io.out_dir}: L0 {metrics['l0']:.1f}, FVU {metrics['fvu']:.3f}, "
        f"dead {metrics['dead_frac']:.1%}, dense {metrics['dense_frac']:.1%}"
    )
    for r in rows:
        print(f"  {r['name']:>8}: L0 {r['l0']:7.1f}  FVU {r['fvu']:.3f}  dead {r['dead_frac']:.1%}")
    return metrics


def require_services(args) -> None:
    """A distributed sweep needs a Prefect server and a shared MLflow server: checked before a
    temporary server starts, so a missing one fails in a second."""
    io = registry.load("train", args.params, args.overrides)
    if io.distribute_sweep and io.sweep:
        from flows.distributed import require_server, require_shared_tracking

        require_server("train.sweep.distribute")
        require_shared_tracking("train.sweep.distribute")


def main(argv: list[str] | None = None) -> int:
    return stage_main("train", argv, check=require_services)


if __name__ == "__main__":
    sys.exit(main())
