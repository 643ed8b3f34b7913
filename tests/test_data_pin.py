"""The generator rebuilds exactly the bytes `data.dvc` pins, so a fresh clone needs no DVC remote."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_generator_rebuilds_pinned_data(tmp_path):
    from saev_core.shapes import ShapesConfig, generate

    pinned = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    generate(tmp_path / "data" / "shapes", ShapesConfig(), progress=False)
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    r = subprocess.run(
        [dvc, "add", "--no-commit", "-q", "data"], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    rebuilt = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]
    assert (rebuilt["nfiles"], rebuilt["size"]) == (pinned["nfiles"], pinned["size"])
    assert rebuilt["md5"] == pinned["md5"]
