"""Does each dvc.yaml stage list every file of ours that its run loads? Checked at run time.

tests/test_structure.py reads the imports from the source: every import in saev_core, those
inside functions too, but only the module-level ones in flows/ (a stage lists the flows its
lazy imports run by hand). What a stage really loads is only seen by running it. So run the
pipeline with the tracer on, then read what each stage's process loaded:

    PYTHONPATH=bench/trace SAEV_TRACE_IMPORTS=/tmp/trace dvc repro --force
    .venv/bin/python bench/stage_deps.py /tmp/trace

Prints, per stage, the files it loaded that its deps do not cover (a missed file means an edit
there leaves the output stale without `dvc status` noticing), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_structure import WIRING, uncovered  # noqa: E402  (the same coverage rule)


def stage_of(argv: list[str]) -> str | None:
    """dvc.yaml's stage name for a `python -m flows.<name> ...` process, else None."""
    script = Path(argv[0])
    if script.parent.name != "flows":
        return None
    if script.stem != "compare":
        return script.stem
    step, rest = argv[1], argv[2:]
    name = rest[rest.index("--name") + 1] if "--name" in rest else None
    return f"compare-{step}" + (f"@{name}" if name else "")


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def deps_of(stage: str) -> list[str]:
    spec = dvc_stages()[stage.partition("@")[0]]
    return [str(d) for d in spec.get("do", spec).get("deps", []) if not str(d).startswith("${")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace_dir", type=Path, help="SAEV_TRACE_IMPORTS's folder")
    args = parser.parse_args(argv)
    report = {}
    for path in sorted(args.trace_dir.glob("*.json")):
        record = json.loads(path.read_text())
        stage = stage_of(record["argv"])
        if stage is None:
            continue
        root = Path(record["cwd"]).resolve()  # dvc runs each stage in the project's root
        loaded = {str(Path(f).resolve().relative_to(root)) for f in record["files"]}
        gaps = uncovered(loaded - WIRING, deps_of(stage))
        report.setdefault(stage, set()).update(gaps)
        print(f"{stage:32s} {len(loaded):3d} files loaded, not in deps: {' '.join(gaps) or '-'}")
    missing = {s: sorted(g) for s, g in report.items() if g}
    untraced = sorted(set(dvc_stages()) - {s.partition("@")[0] for s in report})
    if untraced:
        print(f"no trace of: {' '.join(untraced)} (run `dvc repro --force` with the tracer)")
    print(
        json.dumps(
            {"stages_traced": len(report), "untraced": untraced, "stages_missing_deps": missing}
        )
    )
    return 1 if missing or untraced else 0


if __name__ == "__main__":
    sys.exit(main())
