"""The stage registry (saev_core/registry.py) is the one declaration of a stage: params.yaml,
dvc.yaml, the `saev` sub-commands, the flows and the pipeline all agree with it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from saev_core import registry
from saev_core.registry import STAGES

REPO = Path(__file__).resolve().parents[1]


def test_every_stage_loads_its_params_section_as_its_config():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, stage in STAGES.items():
        assert name in params, f"params.yaml has no `{name}` section"
        cfg = registry.load(name, REPO / "params.yaml")
        assert isinstance(cfg, stage.config_class()), name
        if stage.output:  # the key the pipeline versions after a run is a field of the config
            assert isinstance(getattr(cfg, stage.output), str) and getattr(cfg, stage.output)


def test_dvc_yaml_runs_each_stage_through_its_flow_module():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in STAGES.items():
        assert dvc[name]["cmd"] == f"python -m flows.{name}", name
        module, _, flow = stage.flow.partition(":")
        assert module == f"flows.{name}" and flow == f"{name}_flow", stage.flow
        assert "params.yaml" in str(dvc[name].get("params", [])) or name in str(
            dvc[name].get("params", [])
        ), f"dvc.yaml stage {name} lists no params of its section"


def test_each_flow_is_the_stage_and_its_main_goes_through_the_registry(monkeypatch):
    """The Prefect flow carries the stage's name, and `saev <name>` reaches the flow that the
    registry names (a patched stand-in for it is what runs)."""
    import dataclasses

    from saev_core import cli

    called = {}
    for name, stage in STAGES.items():
        key = dataclasses.fields(stage.config_class())[0].name  # -S of a real key, its value
        value = getattr(registry.load(name, REPO / "params.yaml"), key)
        flow = stage.flow_function()
        assert flow.name == name, (name, flow.name)
        module = importlib.import_module(f"flows.{name}")
        monkeypatch.setattr(
            module, f"{name}_flow", lambda name=name, **kw: called.setdefault(name, kw)
        )
        setting = f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"
        setting = setting.removesuffix("\n...").removesuffix(" ...")
        assert cli.main([name, "--params", str(REPO / "params.yaml"), "-S", setting]) == 0
        assert called[name]["params"] == str(REPO / "params.yaml")
        assert list(called[name]["overrides"]) == [key], called[name]


def test_the_cli_and_the_pipeline_list_the_stages_in_registry_order():
    from flows.pipeline import GPU_STAGES, OUTPUTS
    from flows.pipeline import STAGES as PIPELINE
    from saev_core.cli import COMMANDS

    assert list(PIPELINE) == list(STAGES)
    assert [c for c in COMMANDS if c in STAGES] == list(STAGES)
    assert all(COMMANDS[n][2] == s.help for n, s in STAGES.items())
    assert set(GPU_STAGES) == {"backbone", "extract", "train", "probe", "intervene"}
    assert OUTPUTS == {
        "backbone": "out_dir",
        "train": "out_dir",
        "stats": "out_dir",
        "probe": "out_dir",
        "intervene": "out_dir",
        "warehouse": "db",
    }


def test_an_unknown_stage_is_a_clear_error():
    with pytest.raises(ValueError, match="no stage 'trian'; the stages: backbone, extract"):
        registry.load("trian")
    with pytest.raises(ValueError, match="expected 'module:Name'"):
        registry.Stage("x", "no_colon", "flows.x:x_flow", "help").config_class()
