"""Flows hand what they wrote to DVC: a stage output is committed, anything else added, and
both are pushed when a default remote is configured. Real `dvc` in a temporary repository."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.common import dvc_version

DVC = str(Path(sys.executable).with_name("dvc"))


def dvc(*args, cwd):
    subprocess.run([DVC, *args], cwd=cwd, check=True, capture_output=True, text=True)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_STAGE", raising=False)
    root = tmp_path / "repo"
    root.mkdir()
    dvc("init", "--no-scm", "-q", cwd=root)
    dvc("config", "core.analytics", "false", cwd=root)
    return root


def write_set(path: Path, text: str) -> None:
    (path / "layer=0").mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(text)
    (path / "layer=0" / "train-00000.parquet").write_bytes(b"x" * 100)


def pushed(remote: Path) -> int:
    return sum(1 for p in remote.rglob("*") if p.is_file())


def test_add_then_push_to_the_default_remote(repo, tmp_path):
    remote = tmp_path / "remote"
    out = repo / "artifacts" / "acts"
    write_set(out, '{"v": 1}')
    # No remote yet: versioned locally, nothing pushed.
    first = dvc_version(out)
    assert first == {"action": "add", "target": "artifacts/acts.dvc"}
    md5_first = yaml.safe_load((repo / "artifacts/acts.dvc").read_text())["outs"][0]["md5"]

    dvc("remote", "add", "-d", "shared", str(remote), cwd=repo)
    write_set(out, '{"v": 2}')
    second = dvc_version(out)
    assert second["pushed_to"] == "shared" and pushed(remote) >= 3  # 2 files + the .dir listing
    md5_second = yaml.safe_load((repo / "artifacts/acts.dvc").read_text())["outs"][0]["md5"]
    assert md5_second != md5_first


def test_a_stage_output_is_committed_to_the_lock(repo, tmp_path):
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"extract": {"cmd": "true", "outs": ["artifacts/acts"]}}})
    )
    out = repo / "artifacts" / "acts"
    write_set(out, '{"v": 1}')
    result = dvc_version(out)
    assert result == {"action": "commit", "target": "extract"}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["extract"]["outs"][0]["path"] == "artifacts/acts"
    assert not (repo / "artifacts/acts.dvc").exists()


def test_nothing_to_do_under_dvc_repro_or_outside_a_repo(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert dvc_version(tmp_path)["action"] == "none"
    monkeypatch.setenv("DVC_STAGE", "extract")
    assert "dvc repro" in dvc_version(tmp_path)["reason"]
