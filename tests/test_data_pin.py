"""The generator rebuilds exactly the bytes `data.dvc` pins, so a fresh clone needs no DVC remote."""

import shutil
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


def _run(*cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)


def test_make_data_checks_the_bytes_on_a_fresh_clone(tmp_path):
    """`make data` with an empty DVC cache: the pinned bytes pass, other bytes fail, and the
    failed check leaves data.dvc as it was (the real Makefile, git, dvc and make)."""
    bin_dir = str(Path(sys.executable).parent)
    origin = tmp_path / "origin"
    (origin / "data" / "shapes").mkdir(parents=True)
    (origin / "data" / "shapes" / "world.json").write_text('{"seed": 0}\n')
    (origin / "Makefile").write_text((REPO / "Makefile").read_text())
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (
        ["git", "init", "-q"],
        [f"{bin_dir}/dvc", "init", "-q"],
        [f"{bin_dir}/dvc", "config", "core.analytics", "false"],
        [f"{bin_dir}/dvc", "add", "-q", "data"],
        ["git", "add", "-A"],
        [*git, "commit", "-q", "-m", "pin"],
    ):
        assert _run(*cmd, cwd=origin).returncode == 0, cmd
    clone = tmp_path / "clone"
    assert _run("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path).returncode == 0
    (clone / "data" / "shapes").mkdir(parents=True)  # data/ is ignored by git: bring the bytes
    world = clone / "data" / "shapes" / "world.json"
    world.write_text('{"seed": 0}\n')
    make = ["make", "-o", "setup", "data", f"BIN={bin_dir}"]  # -o: skip the venv set-up

    ok = _run(*make, cwd=clone)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    world.write_text('{"seed": 1}\n')
    shutil.rmtree(clone / ".dvc" / "cache", ignore_errors=True)  # fresh again
    bad = _run(*make, cwd=clone)
    assert bad.returncode != 0 and "differs from the bytes data.dvc pins" in bad.stdout
    assert _run("git", "diff", "--quiet", "--", "data.dvc", cwd=clone).returncode == 0
