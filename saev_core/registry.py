"""The pipeline's stages, in order: the one place a stage is declared.

A stage's name is its params section, its dvc.yaml stage (`cmd: python -m flows.<name>`), its
`saev <name>` sub-command and its flow module `flows/<name>.py`. Everything that wires a stage
reads it from `STAGES`:

- `saev_core.cli` lists the stages as sub-commands, with `help`;
- each stage flow loads its section with `load(name, params, sets)`, and its `main` is
  `flows.common.stage_main(name, argv)`;
- `flows.pipeline` runs the flows in this order, asks for a GPU pool where `gpu`, and versions
  the params key `output` after a run;
- tests/test_registry.py checks that params.yaml, dvc.yaml and flows/ agree with it.

So a new stage is one `Stage(...)` line here, its config dataclass, its flow module and its
dvc.yaml stage; a new field is one field of its config dataclass. Classes and flows are named
as strings and imported on use: `saev --help` stays fast, and saev_core never imports flows/.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saev_core.config import load_section


def import_ref(ref: str) -> Any:
    """`"package.module:Name"` -> the object."""
    module, sep, name = ref.partition(":")
    if not sep:
        raise ValueError(f"{ref!r}: expected 'module:Name'")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage (the names agree: params section, dvc.yaml stage, `saev <name>`,
    flows/<name>.py)."""

    name: str
    config: str
    """Its params section's dataclass, `"module:Class"`."""
    flow: str
    """Its Prefect flow, `"flows.<name>:<name>_flow"`."""
    help: str
    """The one line `saev --help` shows."""
    gpu: bool = False
    """Runs best on a GPU: a deployment that includes it asks for the GPU work pool."""
    output: str | None = "out_dir"
    """The params key of what it writes, versioned after a pipeline run; None when it versions
    its own output (extract) or writes only a small uncached report (validate)."""

    def config_class(self) -> type:
        return import_ref(self.config)

    def flow_function(self) -> Any:
        return import_ref(self.flow)

    def load(self, params: str | Path = "params.yaml", sets: dict[str, Any] | None = None):
        """This stage's params section as its config dataclass; `sets` are `-S KEY=VALUE`."""
        return load_section(params, self.name, self.config_class(), sets)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "backbone",
            "saev_core.demo_vit:BackboneConfig",
            "flows.backbone:backbone_flow",
            "train the demo ViT on shapes",
            gpu=True,
        ),
        Stage(
            "extract",
            "saev_core.extract:ExtractConfig",
            "flows.extract:extract_flow",
            "record activations as Parquet shards",
            gpu=True,
            output=None,
        ),
        Stage(
            "validate",
            "saev_core.validate:ValidateConfig",
            "flows.validate:validate_flow",
            "Great Expectations checks on the shards",
            output=None,
        ),
        Stage(
            "train",
            "saev_core.training:TrainStage",
            "flows.train:train_flow",
            "train the SAE",
            gpu=True,
        ),
        Stage(
            "stats",
            "saev_core.stats.stage:StatsStage",
            "flows.stats:stats_flow",
            "per-feature statistics",
        ),
        Stage(
            "probe",
            "saev_core.probes:ProbeConfig",
            "flows.probe:probe_flow",
            "linear probes on the backbone's output",
            gpu=True,
        ),
        Stage(
            "intervene",
            "saev_core.hypotheses:InterveneConfig",
            "flows.intervene:intervene_flow",
            "feature hypotheses: edits vs controls, to MLflow",
            gpu=True,
        ),
        Stage(
            "warehouse",
            "saev_core.warehouse:WarehouseConfig",
            "flows.warehouse:warehouse_flow",
            "rebuild warehouse/saev.duckdb",
            output="db",
        ),
    )
}
"""Every stage, in the order the pipeline runs them."""


def stage(name: str) -> Stage:
    """The stage called `name`, or a clear error listing the stages."""
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"no stage {name!r}; the stages: {', '.join(STAGES)}") from None


def load(name: str, params: str | Path = "params.yaml", sets: dict[str, Any] | None = None):
    """Stage `name`'s params section as its config dataclass (`Stage.load`)."""
    return stage(name).load(params, sets)
