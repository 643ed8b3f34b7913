"""Flow `compare`: the backbone comparison of issue 15, one step per DVC `foreach` stage.

    python -m flows.compare world                  the forms world (one stage for every backbone)
    python -m flows.compare STEP --name NAME       backbone|extract|train|stats|baselines|
                                                   stability|probe for backbone NAME
    python -m flows.compare intervene              the best PCA direction's edit beside the SAE
                                                   feature's, on compare.intervene.backbone
    python -m flows.compare warehouse              warehouse/compare.duckdb over all of them
    python -m flows.compare figures                one figure per question, from that warehouse

Every backbone gets the demo's recipe: each step's config is the demo's own params section
(`backbone`, `extract`, `train`, `stats`, `probe`) with the paths moved under
`<compare.out_dir>/<name>/`, the layer set to `compare.layer` for all, the world set to the forms
world, then `compare.<section>` (overrides shared by every backbone, e.g. a shorter training in a
tiny run) and, for the backbone, the entry `compare.backbones.<name>` (its `objective`, ...).
The SAE is the demo's `train.sae`; its sweep is replaced by one member per `compare.seeds`
(`seed<N>`: the same recipe with another seed, trained on the same pass), which the stability
step compares with the main SAE (seed `train.sae.seed`).

DVC metrics: `metrics/compare/<name>/<step>.json`, always written (these files belong to the
compare stages, not to the demo's `write_metrics` rule about `-S` runs: the demo's metrics files
are never touched here).
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

from prefect import flow

from flows.common import parse_args, write_metrics
from saev_core.config import from_dict, read_params

STEPS = ("world", "backbone", "extract", "train", "stats", "baselines", "stability", "probe")
SECTIONS = ("world", "backbone", "extract", "sae", "stats", "baselines", "stability", "probe",
            "intervene", "figures", "warehouse")  # fmt: skip
# steps over all backbones at once (no --name)
GLOBAL_STEPS = ("world", "intervene", "warehouse", "figures")


def compare_section(params: dict[str, Any]) -> dict[str, Any]:
    """`params['compare']`, checked: a mapping of backbones, each a mapping of BackboneConfig
    fields (`objective`, ...)."""
    cmp = params.get("compare")
    if not isinstance(cmp, dict):
        raise ValueError("params: no `compare` section (a mapping with `backbones`)")
    backbones = cmp.get("backbones")
    if not isinstance(backbones, dict) or not backbones:
        raise ValueError("params: compare.backbones must be a non-empty mapping {name: {...}}")
    for name, entry in backbones.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ValueError(f"params: compare.backbones: bad backbone name {name!r}")
        if not isinstance(entry, dict):
            raise ValueError(f"params: compare.backbones.{name}: expected a mapping, got {entry!r}")
    for key in SECTIONS:
        if not isinstance(cmp.get(key) or {}, dict):
            raise ValueError(f"params: compare.{key} must be a mapping, got {cmp[key]!r}")
    seeds = cmp.get("seeds", [])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"params: compare.seeds must be a list of integers, got {seeds!r}")
    return cmp


def _merged(*parts: dict[str, Any] | None) -> dict[str, Any]:
    """Later mappings win; nested mappings are merged key by key."""
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in (part or {}).items():
            out[k] = (
                _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
            )
    return copy.deepcopy(out)


def world_dir(cmp: dict[str, Any]) -> str:
    return str((cmp.get("world") or {}).get("out_dir", "artifacts/compare/forms"))


def paths(cmp: dict[str, Any], name: str) -> dict[str, str]:
    """Where backbone `name`'s outputs go."""
    if name not in cmp["backbones"]:
        raise ValueError(
            f"params: compare.backbones has no {name!r} (it has {', '.join(cmp['backbones'])})"
        )
    base = f"{str(cmp.get('out_dir', 'artifacts/compare')).rstrip('/')}/{name}"
    return {
        "base": base,
        "backbone": f"{base}/backbone",
        "shards": f"{base}/activations",
        "sae": f"{base}/sae",
        "stats": f"{base}/stats",
        "baselines": f"{base}/baselines.parquet",
        "stability": f"{base}/stability",
        "probes": f"{base}/probes",
        "probe_labels": f"{base}/probes/labels.parquet",
        "metrics": f"metrics/compare/{name}",
    }


def step_config(params: dict[str, Any], step: str, name: str | None = None) -> Any:
    """The config dataclass of `step` for backbone `name`, built as the module docstring says."""
    cmp = compare_section(params)
    if step == "world":
        from saev_core.shapes import FormsConfig

        world = {k: v for k, v in (cmp.get("world") or {}).items() if k != "out_dir"}
        return from_dict(FormsConfig, world, where="params: compare.world")
    if name is None:
        raise ValueError(
            f"compare step {step!r} needs --name (one of {', '.join(cmp['backbones'])})"
        )
    p, layer = paths(cmp, name), int(cmp.get("layer", 2))
    where = f"params: compare ({step}@{name})"
    if step == "backbone":
        from saev_core.demo_vit import BackboneConfig

        values = _merged(
            params.get("backbone"),
            cmp.get("backbone"),
            cmp["backbones"][name],
            {"data_dir": world_dir(cmp), "out_dir": p["backbone"]},
        )
        return from_dict(BackboneConfig, values, where=where)
    if step == "extract":
        from saev_core.extract import ExtractConfig

        values = _merged(
            params.get("extract"),
            cmp.get("extract"),
            {"model": p["backbone"], "data": world_dir(cmp), "out_dir": p["shards"]},
        )
        values["layers"] = [layer]
        return from_dict(ExtractConfig, values, where=where)
    if step == "train":
        from saev_core.training.stage import TrainStage

        train = params.get("train") or {}
        sae = _merged(train.get("sae"), cmp.get("sae"))
        values = {
            **{k: v for k, v in train.items() if k in ("tokens", "train_split", "eval_split")},
            "shard_dir": p["shards"],
            "layer": layer,
            "out_dir": p["sae"],
            "sae": sae,
            "sweep": {f"seed{s}": {"seed": s} for s in cmp.get("seeds", [])},
        }
        return from_dict(TrainStage, values, where=where)
    if step == "stats":
        from saev_core.stats.stage import StatsStage

        values = _merged(
            {k: v for k, v in (params.get("stats") or {}).items() if k in ("options", "browser")},
            cmp.get("stats"),
            {"sae_dir": p["sae"], "shard_dir": p["shards"], "out_dir": p["stats"], "run": name},
        )
        return from_dict(StatsStage, values, where=where)
    if step == "baselines":
        from saev_core.baselines import BaselinesConfig

        return from_dict(BaselinesConfig, dict(cmp.get("baselines") or {}), where=where)
    if step == "stability":
        cfg = _merged({"n_tokens": 20_000, "split": "val", "n_random": 2, "seed": 0},
                      cmp.get("stability"))  # fmt: skip
        return cfg
    if step == "probe":
        from saev_core.probes import ProbeConfig

        values = _merged(
            params.get("probe"),
            {"seg_classes": []},
            cmp.get("probe"),
            {"model": p["backbone"], "data": world_dir(cmp), "out_dir": p["probes"]},
        )
        return from_dict(ProbeConfig, values, where=where)
    raise ValueError(f"unknown compare step {step!r}; steps: {', '.join(STEPS + GLOBAL_STEPS[1:])}")


def sae_dirs(params: dict[str, Any], name: str) -> list[str]:
    """The main SAE and one per seed of `compare.seeds` (the train step's sweep members)."""
    cmp = compare_section(params)
    sae = paths(cmp, name)["sae"]
    return [sae, *(f"{sae}/sweep/seed{s}" for s in cmp.get("seeds", []))]


def run_step(params_file: str, step: str, name: str | None = None) -> dict[str, Any]:
    """Run one step and write its metrics file; returns what it wrote."""
    params = read_params(params_file)
    cfg = step_config(params, step, name)
    cmp = compare_section(params)
    if step == "world":
        from saev_core.shapes import generate

        counts = generate(world_dir(cmp), cfg, overwrite=True, progress=False)
        split_counts = {k: counts[k] for k in ("train", "val", "test") if k in counts}
        print(f"forms world in {world_dir(cmp)}: {split_counts} images")
        return counts
    p = paths(cmp, name)
    metrics: Any
    if step == "backbone":
        from flows.backbone import summary, train_backbone_task
        from saev_core.demo_vit import tracked_metrics

        metrics = summary(tracked_metrics(train_backbone_task(cfg)))
    elif step == "extract":
        from flows.extract import extract_task

        m = extract_task(cfg)
        metrics = {"n_images": m["n_images"], "n_tokens": m["tokens"]["n_tokens_written"]}
    elif step == "train":
        from flows.train import train_task

        metrics, rows = train_task(cfg)
        write_metrics(f"{p['metrics']}/train_seeds.json", rows)
    elif step == "stats":
        from flows.stats import log_task, stats_task

        s = stats_task(cfg)
        log_task(cfg, s)
        metrics = {k: s[k] for k in ("n_tokens", "n_images", "dead_frac", "dense_frac")}
    elif step == "baselines":
        import dataclasses

        from saev_core.baselines import headline, sae_vs_baselines, write_baselines

        table, _ = sae_vs_baselines(p["shards"], p["sae"], cfg, progress=True)
        meta = {"backbone": name, "shards": p["shards"], "sae": p["sae"]}
        write_baselines(table, p["baselines"], {**meta, "cfg": dataclasses.asdict(cfg)})
        head = headline(table)
        metrics = {r["method"]: {k: float(v) for k, v in r.items() if k != "method"}
                   for r in head.to_dict("records")}  # fmt: skip
    elif step == "stability":
        from saev_core.stability import stability_of

        summary_df, _ = stability_of(p["shards"], sae_dirs(params, name), p["stability"], **cfg)
        metrics = {
            kind: {k: float(g[k].mean()) for k in ("mean_cos", "mean_corr") if k in g}
            for kind, g in summary_df.groupby("kind")
        }
    elif step == "probe":
        from flows.probe import probe_task
        from saev_core.compare_probes import probe_labels

        results = probe_task(cfg)
        metrics = {
            t: {k: round(v, 4) for k, v in m.items() if k in ("mean_accuracy", "miou", "patch_accuracy")}
            for t, m in results.items()
        }  # fmt: skip
        # per concept x form, on the test split, with bootstrap CIs over images
        metrics["by_form"] = probe_labels(cfg, backbone=name, out_path=p["probe_labels"])
    else:
        raise ValueError(f"unknown compare step {step!r}")
    write_metrics(f"{p['metrics']}/{step}.json", metrics)
    return metrics


def intervene_dir(cmp: dict[str, Any]) -> str:
    return f"{str(cmp.get('out_dir', 'artifacts/compare')).rstrip('/')}/intervene"


def run_intervene(params_file: str) -> dict[str, Any]:
    """The best PCA direction's edit beside the best SAE feature's, per concept, on the backbone
    `compare.intervene.backbone` (one with a classifier head: its logits are what changes)."""
    from saev_core.compare_intervene import pca_vs_sae

    cmp = compare_section(read_params(params_file))
    cfg = dict(cmp.get("intervene") or {})
    name = str(cfg.pop("backbone", "supervised"))
    p = paths(cmp, name)
    metrics = pca_vs_sae(
        backbone_dir=p["backbone"],
        shard_dir=p["shards"],
        sae_dir=p["sae"],
        stats_dir=p["stats"],
        baselines_path=p["baselines"],
        data_dir=world_dir(cmp),
        out_dir=intervene_dir(cmp),
        backbone=name,
        **cfg,
    )
    write_metrics("metrics/compare/intervene.json", metrics)
    return metrics


def figures_dirs(cmp: dict[str, Any]) -> tuple[str, str]:
    """(where the figures' PNGs go: DVC-cached, where their data goes: `dvc plots` JSON in git)"""
    fig = cmp.get("figures") or {}
    return str(fig.get("out_dir", "artifacts/figures/compare")), "metrics/compare/plots"


def mlflow_tracker(experiment: str = "compare", run_name: str = "figures"):
    """The figures' tracker (`saev_core.compare_figures`): one MLflow run (`flows.common.mlflow_run`:
    the flows' tracking URI and provenance tags) with the PNGs under `figures/`, their data
    under `data/`, the headline numbers as metrics and the options as params."""

    def log(pngs: list, data: list, metrics: dict[str, float], params: dict) -> None:
        import mlflow

        from flows.common import mlflow_run

        with mlflow_run(experiment, run_name, tags={"stage": "compare-figures"}):
            mlflow.log_params({k: str(v) for k, v in params.items()})
            if metrics:
                mlflow.log_metrics(metrics)
            for p in pngs:
                mlflow.log_artifact(str(p), artifact_path="figures")
            for p in data:
                mlflow.log_artifact(str(p), artifact_path="data")

    return log


def run_figures(params_file: str) -> dict[str, Any]:
    """One figure per question of the comparison, from warehouse/compare.duckdb's named queries;
    PNGs under compare.figures.out_dir, their data under metrics/compare/plots/ (`dvc plots`), both
    logged to MLflow (experiment `compare`)."""
    from saev_core.compare_figures import FiguresConfig, make_figures

    cmp = compare_section(read_params(params_file))
    out_dir, plots_dir = figures_dirs(cmp)
    db = str((cmp.get("warehouse") or {}).get("db", "warehouse/compare.duckdb"))
    opts = {k: v for k, v in (cmp.get("figures") or {}).items() if k != "out_dir"}
    defaults = FiguresConfig()
    tracker = mlflow_tracker(
        opts.get("experiment", defaults.experiment), opts.get("run_name", defaults.run_name)
    )
    report = make_figures(db, out_dir=out_dir, plots_dir=plots_dir, tracker=tracker, **opts)
    print(f"compare figures in {out_dir}: {', '.join(report.get('figures', []))}")
    return report


def run_warehouse(params_file: str) -> dict[str, Any]:
    from saev_core.warehouse import build_compare_warehouse

    cmp = compare_section(read_params(params_file))
    wh = cmp.get("warehouse") or {}
    report = build_compare_warehouse(
        wh.get("db", "warehouse/compare.duckdb"),
        backbones={n: dict(e) for n, e in cmp["backbones"].items()},
        compare_dir=str(cmp.get("out_dir", "artifacts/compare")),
        sql_dir=wh.get("sql_dir", "sql"),
    )
    print(f"compare warehouse {report['db_path']}: {report['views']}")
    return report


@flow(name="compare", log_prints=True)
def compare_flow(params: str = "params.yaml", step: str = "world", name: str | None = None) -> Any:
    """One step of the comparison (a DVC stage), for backbone `name`."""
    if step == "warehouse":
        return run_warehouse(params)
    if step == "intervene":
        return run_intervene(params)
    if step == "figures":
        return run_figures(params)
    return run_step(params, step, name)


def main(argv: list[str] | None = None) -> int:
    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("step", choices=[*STEPS, *GLOBAL_STEPS[1:]], help="which step")
        p.add_argument("--name", default=None, help="backbone: a key of compare.backbones")

    args = parse_args("compare", argv, extra=extra)
    if args.step not in GLOBAL_STEPS and not args.name:
        print(f"saev compare {args.step}: --name is required", file=sys.stderr)
        return 2
    compare_flow(params=args.params, step=args.step, name=args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
