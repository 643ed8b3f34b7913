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
    from saev_core.hypotheses import InterveneConfig
    from saev_core.probes import ProbeConfig
    from saev_core.stats import StatsConfig
    from saev_core.stats.stage import StatsStage
    from saev_core.training import TrainConfig
    from saev_core.training.stage import TrainStage
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
    # the backbone comparison's section and stages are checked in tests/test_compare.py
    demo_stages = {s for s in dvc_stages if not s.startswith("compare-")}
    assert set(params) - {"compare"} == set(configs) == demo_stages
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


# -- `-S KEY=VALUE`: one override path for every stage (issue 13, point 7) -----------------------

STAGES = ("backbone", "extract", "validate", "train", "stats", "probe", "intervene", "warehouse")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_help_lists_set(stage, capsys):
    from saev_core import cli

    with pytest.raises(SystemExit) as done:
        cli.main([stage, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "-S KEY=VALUE, --set KEY=VALUE" in out
    assert "sae.k=32" in out  # the help shows a nested key


class Loaded(Exception):
    """Raised in place of running a stage, carrying the config its flow loaded."""


def run_until_loaded(monkeypatch, stage: str, argv: list[str]):
    """`saev <stage> argv` through the real CLI and flow body, stopped right after the flow
    loads its section: the flow's plain function is called (no Prefect run) and
    the registry's `load_section` hands its result back by raising `Loaded`."""
    import importlib

    from saev_core import cli, config, registry

    module = importlib.import_module(f"flows.{stage}")
    flow = getattr(module, f"{stage}_flow")
    monkeypatch.setattr(module, f"{stage}_flow", getattr(flow, "fn", flow))

    def load_and_stop(*args, **kwargs):
        raise Loaded(config.load_section(*args, **kwargs))

    monkeypatch.setattr(registry, "load_section", load_and_stop)
    with pytest.raises(Loaded) as loaded:
        cli.main([stage, *argv])
    return loaded.value.args[0]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_set_reaches_its_config(stage, monkeypatch, tmp_path):
    configs, _, _ = stage_configs()
    str_keys = [
        f.name
        for f in __import__("dataclasses").fields(configs[stage])
        if isinstance(
            getattr(load_section(REPO / "params.yaml", stage, configs[stage]), f.name), str
        )
    ]
    key = "out_dir" if "out_dir" in str_keys else str_keys[0]
    cfg = run_until_loaded(
        monkeypatch,
        stage,
        ["--params", str(REPO / "params.yaml"), "-S", f"{key}={tmp_path}/elsewhere"],
    )
    assert isinstance(cfg, configs[stage])
    assert getattr(cfg, key) == f"{tmp_path}/elsewhere"


def test_train_set_nested_keys_reach_the_train_config(monkeypatch, tmp_path):
    file = read_params(REPO / "params.yaml")["train"]
    io = run_until_loaded(
        monkeypatch,
        "train",
        [
            "--params",
            str(REPO / "params.yaml"),
            "-S",
            "sae.k=32",
            "-S",
            f"out_dir={tmp_path}/k32",
            "-S",
            "train.sae.lr=1e-3",  # the section's name may lead, as in `dvc exp run -S train.sae.lr`
            "-S",
            "sweep.k8.aux_k=64",
            "-S",
            "sweep.k4={k: 4}",
            "-S",
            "layer=1",
        ],
    )
    assert io.out_dir == f"{tmp_path}/k32" and io.layer == 1
    # k and lr changed; every other key of the file's `sae` kept (YAML: 32 an int, 1e-3 a float)
    assert io.sae == {**file["sae"], "k": 32, "lr": 1e-3}
    assert type(io.sae["k"]) is int and type(io.sae["lr"]) is float
    assert io.sweep == {**file["sweep"], "k8": {"k": 8, "aux_k": 64}, "k4": {"k": 4}}
    # the whole sweep replaced by a YAML value
    io = run_until_loaded(
        monkeypatch, "train", ["--params", str(REPO / "params.yaml"), "-S", "sweep={}"]
    )
    assert io.sweep == {} and io.sae == file["sae"]


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("layr=3", ["'layr'", "valid keys of `train`", "'layer'", "'out_dir'", "'sae'"]),
        ("sae.kk=3", ["train.sae", "'kk'", "'k'", "'lr'", "'aux_k'"]),
        ("sweep.k8.kk=3", ["sweep member 'k8'", "'kk'", "'aux_k'"]),
        ("layer.x=3", ["'layer.x'", "layer is 2, not a mapping"]),
    ],
)
def test_an_unknown_set_key_is_a_clear_error(setting, named, capsys, monkeypatch):
    import flows.train
    from saev_core import cli

    monkeypatch.setattr(flows.train, "train_flow", flows.train.train_flow.fn)  # no Prefect run
    rc = cli.main(["train", "--params", str(REPO / "params.yaml"), "-S", setting])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("saev train: error:")
    for text in named:
        assert text in err, (text, err)


def test_set_value_that_is_not_yaml_is_refused(capsys):
    from saev_core import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["backbone", "-S", "epochs=[1,"])
    assert done.value.code == 2
    assert "-S epochs=[1,: the value is not valid YAML" in capsys.readouterr().err


def test_set_null_sets_null_and_an_unset_option_keeps_the_file(tmp_path):
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Toy:
        seed: int | None = 0
        opts: dict = dataclasses.field(default_factory=lambda: {"a": 1, "b": 2})

    p = tmp_path / "params.yaml"
    p.write_text("toy:\n  seed: 5\n")
    assert load_section(p, "toy", Toy, {"seed": None}).seed is None  # -S seed=null
    assert load_section(p, "toy", Toy, seed=None).seed == 5  # an option left unset
    # a nested key starts from the field's default mapping when the file has none
    assert load_section(p, "toy", Toy, {"opts.b": 3}).opts == {"a": 1, "b": 3}


def test_set_values_keep_yaml_types_and_quotes():
    from flows.common import parse_args

    sets = [
        "lr=1e-3",  # YAML 1.1 reads an exponent without a dot as a string: the number meant
        "big=2E+4",
        "name='1e-3'",  # quoted: the string
        'tag="007"',
        "ver=007",  # YAML 1.1: an (octal-looking) int
        "layers=[-2, -1]",
        "opts={a: 1, b: [x, 2]}",
        "none=null",
        "empty=",
        "flag=true",
        "text=1e-3x",
        "eq=a=b",  # the first `=` splits
    ]
    got = parse_args("train", [a for s in sets for a in ("-S", s)], overrides=True).overrides
    assert got == {
        "lr": 1e-3,
        "big": 2e4,
        "name": "1e-3",
        "tag": "007",
        "ver": 7,
        "layers": [-2, -1],
        "opts": {"a": 1, "b": ["x", 2]},
        "none": None,
        "empty": None,
        "flag": True,
        "text": "1e-3x",
        "eq": "a=b",
    }
    assert type(got["lr"]) is float and type(got["name"]) is str
