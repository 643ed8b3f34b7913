"""params.yaml parses into every stage's config; bad values fail with the key named; the CLI starts."""

import subprocess
import sys
from pathlib import Path

import pytest

from saev_core.config import from_dict, load_section, read_params

REPO = Path(__file__).resolve().parents[1]


def stage_configs():
    from saev_core.demo_vit import BackboneConfig
    from saev_core.extract import ExtractConfig
    from saev_core.intervene import InterveneConfig
    from saev_core.probes import ProbeConfig
    from saev_core.stages import StatsStage, TrainStage
    from saev_core.stats import StatsConfig
    from saev_core.training import TrainConfig
    from saev_core.validate import ValidateConfig
    from saev_core.warehouse import WarehouseConfig

    return (
        {
            "backbone": BackboneConfig,
            "extract": ExtractConfig,
            "validate": ValidateConfig,
            "train": TrainStage,
            "stats": StatsStage,
            "probe": ProbeConfig,
            "intervene": InterveneConfig,
            "warehouse": WarehouseConfig,
        },
        TrainConfig,
        StatsConfig,
    )


def test_repo_params_parse_into_every_stage():
    configs, TrainConfig, StatsConfig = stage_configs()
    params = read_params(REPO / "params.yaml")
    dvc_stages = __import__("yaml").safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(params) == set(configs) == set(dvc_stages)
    for section, cls in configs.items():
        load_section(REPO / "params.yaml", section, cls)
    train = load_section(REPO / "params.yaml", "train", configs["train"])
    from_dict(TrainConfig, train.sae)
    stats = load_section(REPO / "params.yaml", "stats", configs["stats"])
    from_dict(StatsConfig, stats.options)


def test_unknown_key_and_bad_value_are_named(tmp_path):
    from saev_core.extract import ExtractConfig
    from saev_core.training import TrainConfig

    p = tmp_path / "params.yaml"
    p.write_text("extract:\n  layer: 3\n")
    with pytest.raises(ValueError, match="unknown key.*layer"):
        load_section(p, "extract", ExtractConfig)
    p.write_text("extract:\n  batch_size: 0\n")
    with pytest.raises(ValueError, match="batch_size"):
        load_section(p, "extract", ExtractConfig)
    with pytest.raises(ValueError, match="k=64"):
        from_dict(TrainConfig, {"d_sae": 32, "k": 64})
    with pytest.raises(FileNotFoundError):
        read_params(tmp_path / "missing.yaml")


def test_cli_help_and_unknown_command():
    saev = Path(sys.executable).parent / "saev"
    r = subprocess.run([saev, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for cmd in ("extract", "train", "sql", "intervene", "serve"):
        assert cmd in r.stdout
    r = subprocess.run([saev, "trian"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown command" in r.stderr
    r = subprocess.run(
        [saev, "sql", "--list"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert r.returncode == 0 and "top_features_for_label" in r.stdout
