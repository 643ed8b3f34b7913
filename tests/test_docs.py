"""Every command the README and docs/*.md show is checked against the code it names.

A fence must carry a language tag (`bash`, `console`, `yaml`, `python`, `text`, ...), so no
untested command slips in untagged. A `bash` or `console` fence may be preceded by a marker
comment that says how it is tested; without one it is `parse`:

- `<!-- test: parse -->`: each command is parsed by its own program without running it.
  `saev STAGE ...` goes through the real CLI and flow body and stops right after the flow has
  loaded its params section (so renamed options and unknown `-S` keys fail, as in
  test_config's `run_until_loaded`); any other `saev` sub-command stops right after its argparse
  parser has read the argv. `saev sql NAME` also needs `sql/queries/NAME.sql`. `dvc exp run -S`
  goes through `config.apply_overrides`, other `dvc` commands through DVC's own parser, and
  `make TARGET` through `make -n`.
- `<!-- test: make-dry -->`: `make -n TARGET` exits 0 for each `make` line.
- `<!-- test: covered-by FILE ... -->`: slow, or needs servers. Each command's program and
  sub-command words (`.venv/bin/`, environment assignments and comments dropped) appear in a
  row in one of the named test files, and so does each of its long options.
- `<!-- test: skip REASON -->`: not checked (network, a server); the reason is printed, and at
  most `MAX_SKIPS` blocks may say so.

Backquoted spans in prose that start with `saev `, `dvc `, `make ` or `.venv/bin/` are parsed
the same way, unless they hold a placeholder (`<stage>`, `KEY=VALUE`, `...`, `[--gpu]`, `N`).
`yaml` fences whose top-level keys are stage names are merged into a copy of params.yaml and
loaded by each stage's flow, and `python` fences are compiled and their `from saev_core import`
names resolved. Relative links (and their `#anchors`) resolve, and so do the code paths
(`saev_core/stats/`) and dotted names (`saev_core.intervene.splice`) the prose cites.

The `run` check: every `$ saev sql` transcript is run against a built warehouse, and the first
line it prints (a header, or an error's text) is compared with the one shown
(`check_transcripts`; here on the project's own warehouse when `make demo` has built it).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from saev_core import registry

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = ("bash", "console", "sh", "shell")
MARKER = re.compile(r"<!--\s*test:\s*(?P<kind>[\w-]+)\s*(?P<arg>.*?)\s*-->")
KINDS = ("parse", "run", "make-dry", "covered-by", "skip")
MAX_SKIPS = 5
INLINE = re.compile(r"`([^`]+)`")
INLINE_START = ("saev ", "dvc ", "make ", ".venv/bin/")
PLACEHOLDER = re.compile(r"<[^>]*>|KEY=VALUE|\.\.\.|[\[\]|{}]|\bN\b|\bNAME\b|\bQUERY\b|\bX\b")


@dataclass
class Fence:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    marker: str  # kind, "" when none
    marker_arg: str
    body: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def fences(page: Path) -> list[Fence]:
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang = lines[i][3:].strip()
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            prev = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
            m = MARKER.fullmatch(prev.strip())
            out.append(
                Fence(
                    page,
                    i + 1,
                    lang,
                    m["kind"] if m else "",
                    m["arg"] if m else "",
                    "\n".join(lines[i + 1 : j]),
                )
            )
            i = j + 1
        else:
            i += 1
    return out


def prose(page: Path) -> str:
    """The page without its fences (inline spans are collected from this)."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)


def all_fences() -> list[Fence]:
    return [f for page in PAGES for f in fences(page)]


def commands(fence: Fence) -> list[list[str]]:
    """argv of each command in a shell fence: `\\` continuations joined, comments dropped; in
    a console fence only the `$ ` lines count."""
    text = re.sub(r"\\\n", " ", fence.body)
    if fence.lang == "console":
        text = "\n".join(ln[2:] for ln in text.splitlines() if ln.startswith("$ "))
    out = []
    for line in text.splitlines():
        line = line.split(" | ")[0]  # `saev sql ... | head -3`: the first command is the one
        for part in line.split(" && "):
            argv = shlex.split(part.removesuffix(" &"), comments=True)
            if argv:
                out.append(argv)
    return out


def normalise(argv: list[str]) -> list[str]:
    """`.venv/bin/` dropped from the program and leading `VAR=value` assignments skipped."""
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
        argv = argv[1:]
    if argv:
        argv = [argv[0].removeprefix(".venv/bin/"), *argv[1:]]
    return argv


# --- parsing one command without running it -----------------------------------------------------


class Stopped(Exception):
    """Raised by the patched parser or `load_section`: the command got that far."""


def parse_saev(argv: list[str], monkeypatch) -> None:
    from saev_core import cli, config

    assert argv, "`saev` without a sub-command"
    name = argv[0]
    assert name in cli.COMMANDS, f"saev has no sub-command {name!r}"
    if name == "sql":
        opts_with_value = {"--param", "-p", "--format", "-f", "--db", "--root"}
        positional = [
            a
            for i, a in enumerate(argv[1:], 1)
            if not a.startswith("-") and argv[i - 1] not in opts_with_value
        ]
        if positional and re.fullmatch(r"\w+", positional[0]):
            assert (REPO / "sql" / "queries" / f"{positional[0]}.sql").exists(), (
                f"no named query {positional[0]!r} in sql/queries/"
            )
    with monkeypatch.context() as m:
        m.chdir(REPO)
        m.delenv("SAEV_PARAMS", raising=False)
        if name in registry.STAGES:
            module = importlib.import_module(f"flows.{name}")
            flow = getattr(module, f"{name}_flow")
            m.setattr(module, f"{name}_flow", getattr(flow, "fn", flow))

            def load_and_stop(*args, **kwargs):
                config.load_section(*args, **kwargs)
                raise Stopped

            for loader in (module, registry):
                if hasattr(loader, "load_section"):
                    m.setattr(loader, "load_section", load_and_stop)
            import flows.distributed

            m.setattr(flows.distributed, "require_server", lambda *a, **k: None)
        else:
            real = argparse.ArgumentParser.parse_args

            def parse_and_stop(self, args=None, namespace=None):
                real(self, args, namespace)
                raise Stopped

            m.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
        try:
            rc = cli.main(argv)
        except Stopped:
            return
        except SystemExit as e:
            pytest.fail(f"`saev {shlex.join(argv)}` does not parse (exit {e.code})")
        pytest.fail(f"`saev {shlex.join(argv)}` returned {rc} before its parser or params ran")


def parse_dvc(argv: list[str]) -> None:
    if argv[:2] == ["exp", "run"]:
        from saev_core import config

        sets = [argv[i + 1] for i, a in enumerate(argv) if a in ("-S", "--set-param")]
        assert sets, f"`dvc {shlex.join(argv)}`: nothing to check"
        params = config.read_params(REPO / "params.yaml")
        for item in sets:
            key, _, value = item.partition("=")
            section, _, rest = key.partition(".")
            assert section in registry.STAGES and rest, f"-S {item}: not a stage's key"
            cls = stage_class(section)
            config.apply_overrides(
                dict(params.get(section) or {}), {rest: yaml.safe_load(value)}, cls, section
            )
        return
    from dvc.cli import parse_args

    try:
        parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"`dvc {shlex.join(argv)}` does not parse (exit {e.code})")


def stage_class(stage: str) -> type:
    """The config dataclass of `stage`'s params section, from the registry."""
    return registry.stage(stage).config_class()


def make_dry(argv: list[str]) -> None:
    assert argv and argv[0] == "make", argv
    targets = [a for a in argv[1:] if not a.startswith("-") and "=" not in a]
    assert targets, f"`{shlex.join(argv)}`: no target"
    out = subprocess.run(
        ["make", "-n", *targets], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"make -n {' '.join(targets)}: {out.stderr[-500:]}"


def check_parse(argv: list[str], monkeypatch) -> None:
    argv = normalise(argv)
    if not argv or argv[0] in ("export", "cd"):
        return
    prog, rest = argv[0], argv[1:]
    if prog == "saev":
        parse_saev(rest, monkeypatch)
    elif prog == "dvc":
        parse_dvc(rest)
    elif prog == "make":
        make_dry(argv)
    elif prog in ("pytest", "python"):
        files = [a.split("::")[0] for a in rest if a.endswith(".py") or ".py::" in a]
        assert files, f"`{shlex.join(argv)}`: nothing to check"
        for f in files:
            assert (REPO / f).exists(), f"`{shlex.join(argv)}`: no file {f}"
    else:
        assert (REPO / ".venv" / "bin" / prog).exists() or shutil.which(prog), (
            f"`{shlex.join(argv)}`: no program {prog!r}; mark the block covered-by or skip"
        )


# --- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_fence_is_tagged(page):
    untagged = [f.where for f in fences(page) if not f.lang]
    assert not untagged, f"fences without a language tag: {untagged}"


def test_markers_are_known_and_skips_few():
    shell = [f for f in all_fences() if f.lang in SHELL]
    assert shell, "no shell fence found: the collector is broken"
    bad = [f"{f.where}: {f.marker}" for f in shell if f.marker and f.marker not in KINDS]
    assert not bad, f"unknown test markers: {bad}"
    skips = [f for f in shell if f.marker == "skip"]
    for f in skips:
        assert f.marker_arg, f"{f.where}: a skip must give its reason"
        print(f"skipped {f.where}: {f.marker_arg}")
    assert len(skips) <= MAX_SKIPS, [f.where for f in skips]
    no_commands = [f.where for f in shell if f.marker != "skip" and not commands(f)]
    assert not no_commands, f"shell fences without a command: {no_commands}"


PARSED = [f for f in all_fences() if f.lang in SHELL and f.marker in ("", "parse", "run")]


@pytest.mark.parametrize("fence", PARSED, ids=lambda f: f.where)
def test_shell_fence_parses(fence, monkeypatch):
    for argv in commands(fence):
        check_parse(argv, monkeypatch)


MAKE_DRY = [f for f in all_fences() if f.lang in SHELL and f.marker == "make-dry"]


@pytest.mark.parametrize("fence", MAKE_DRY, ids=lambda f: f.where)
def test_make_dry(fence):
    for argv in commands(fence):
        make_dry(normalise(argv))


COVERED = [f for f in all_fences() if f.lang in SHELL and f.marker == "covered-by"]


def _tokens(text: str) -> list[str]:
    return re.findall(r"[\w./:@=-]+", text.replace(".venv/bin/", ""))


@pytest.mark.parametrize("fence", COVERED, ids=lambda f: f.where)
def test_covered_by_names_the_same_commands(fence):
    check_covered(fence)


def check_covered(fence: Fence) -> None:
    files = fence.marker_arg.split()
    assert files, f"{fence.where}: covered-by names no test file"
    texts, raw = [], ""
    for name in files:
        assert (REPO / name).exists(), f"{fence.where}: no file {name}"
        raw += (REPO / name).read_text()
        texts.append(_tokens((REPO / name).read_text()))
    for argv in commands(fence):
        argv = normalise(argv)
        if not argv or argv[0] == "export":
            continue
        if argv[0] == "python" and "-c" in argv:
            # `python -c CODE`: each method CODE calls must be called in a named file
            code = ast.parse(argv[argv.index("-c") + 1])
            calls = [
                n.func.attr
                for n in ast.walk(code)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            ]
            missing = [c for c in calls if not re.search(rf"\.{c}\(", raw)]
            assert calls and not missing, f"{fence.where}: {missing or 'no call'} not in {files}"
            continue
        words = [Path(argv[0]).name]
        for a in argv[1:]:
            if a.startswith("-") or not re.fullmatch(r"[a-z][\w-]*", a):
                break
            words.append(a)
        options = [a.split("=")[0] for a in argv if a.startswith("--")]
        found = [
            t
            for t in texts
            if any(t[i : i + len(words)] == words for i in range(len(t)))
            and all(o in t for o in options)
        ]
        assert found, f"{fence.where}: `{' '.join(words)}` with {options} not in {files}"


def inline_spans() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for span in INLINE.findall(prose(page)):
            span = " ".join(span.split())
            if span.startswith(INLINE_START) and not PLACEHOLDER.search(span):
                out.append((f"{page.relative_to(REPO)}: {span}", span))
    return out


SPANS = inline_spans()


def test_inline_spans_are_collected():
    assert any(s.startswith("saev sql ") for _, s in SPANS), SPANS
    assert PLACEHOLDER.search("saev <stage> -S KEY=VALUE")
    assert not PLACEHOLDER.search("saev sql best_feature_per_concept --param run=demo")


def mentions(argv: list[str], capsys) -> None:
    """`saev deploy --workdir`, `dvc add`: prose naming a command and its options, not a
    command line. The sub-command must exist and its `--help` must list each option."""
    prog, sub, options = argv[0], argv[1], argv[2:]
    if prog == "saev":
        from saev_core import cli

        assert sub in cli.COMMANDS, f"saev has no sub-command {sub!r}"
        run = lambda: cli.main([sub, "--help"])  # noqa: E731
    else:
        from dvc.cli import parse_args

        run = lambda: parse_args([sub, "--help"])  # noqa: E731
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run()
    help_ = capsys.readouterr().out
    assert e.value.code == 0 and help_, f"`{prog} {sub} --help` failed"
    missing = [o for o in options if o not in help_]
    assert not missing, f"`{prog} {sub} --help` lists no {missing}"


@pytest.mark.parametrize("span", [s for _, s in SPANS], ids=[w for w, _ in SPANS])
def test_inline_command_parses(span, monkeypatch, capsys):
    argv = normalise(shlex.split(span))
    if argv[0] == "make":
        make_dry(argv)
    elif (
        argv[0] in ("saev", "dvc")
        and len(argv) >= 2
        and all(re.fullmatch(r"--[a-z][\w-]*", a) for a in argv[2:])
        and not (argv[0] == "saev" and argv[1] == "sql")
    ):
        mentions(argv, capsys)
    else:
        check_parse(argv, monkeypatch)


YAML = [f for f in all_fences() if f.lang == "yaml"]


@pytest.mark.parametrize("fence", YAML, ids=lambda f: f.where)
def test_yaml_params_load(fence, tmp_path, monkeypatch):
    from saev_core import config

    block = yaml.safe_load(fence.body)
    assert isinstance(block, dict), f"{fence.where}: not a mapping"
    stages = [k for k in block if k in registry.STAGES]
    if not stages:
        pytest.skip(f"{fence.where}: no stage section")
    params = config.read_params(REPO / "params.yaml")
    for stage in stages:
        params[stage] = {**(params.get(stage) or {}), **block[stage]}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in stages:
        parse_saev([stage, "--params", str(path)], monkeypatch)


PYTHON = [f for f in all_fences() if f.lang == "python"]


@pytest.mark.parametrize("fence", PYTHON, ids=lambda f: f.where)
def test_python_block_compiles_and_imports_resolve(fence):
    tree = ast.parse(compile(fence.body, fence.where, "exec", ast.PyCF_ONLY_AST))
    names = [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saev_core")
        for alias in node.names
    ]
    assert names, f"{fence.where}: imports nothing from saev_core"
    for module, name in names:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"


CODE_PATH = re.compile(r"^(saev_core|flows|tests|bench|sql)/[\w./-]*$")
CODE_NAME = re.compile(r"^saev_core(\.\w+)+$")
NOT_YET = {"flows/sweep.py"}  # docs/service.md: a module you may add, named as such


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_code_paths_and_names_exist(page):
    """`saev_core/stats/`, `tests/test_service.py`, `saev_core.intervene.splice`: the files
    and names the prose cites exist (a module split into a package moves its path)."""
    missing = []
    for span in INLINE.findall(prose(page)):
        span = " ".join(span.split())
        if CODE_PATH.match(span):
            if "<" not in span and span not in NOT_YET and not (REPO / span).exists():
                missing.append(span)
        elif CODE_NAME.match(span):
            parts = span.split(".")
            for i in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    continue
                for name in parts[i:]:
                    obj = getattr(obj, name, None)
                if obj is None:
                    missing.append(span)
                break
    assert not missing, f"cited but missing: {missing}"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#([\w-]+))?\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", prose(page), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target, anchor in LINK.findall(prose(page)):
        if "://" in target:
            continue
        path = (page.parent / target).resolve()
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}#{anchor}")
    assert not broken, f"broken links: {broken}"


def transcripts() -> list[tuple[Fence, list[str], str]]:
    """(fence, argv, first output line) of every `$ saev sql ...` in a console fence."""
    out = []
    for fence in all_fences():
        if fence.lang != "console":
            continue
        lines = re.sub(r"\\\n", " ", fence.body).splitlines()
        for i, line in enumerate(lines):
            if line.startswith("$ saev sql ") and i + 1 < len(lines):
                argv = shlex.split(line[2:].split(" | ")[0])
                out.append((fence, argv[2:], lines[i + 1]))
    return out


def check_transcripts(project: Path) -> list[str]:
    """Run each console fence's `saev sql` in `project` (a built warehouse at
    warehouse/saev.duckdb, run `demo`) and compare the first line of its output with the one
    the fence shows: a table's or CSV's header, or an error's text up to its first " (" (the
    runs listed there differ between projects). Queries that name run k32 are left out when
    the project has no such run. Returns the mismatches."""
    import contextlib
    import io

    from saev_core import cli

    problems, cwd = [], Path.cwd()
    os.chdir(project)
    try:
        for fence, argv, expected in transcripts():
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = cli.main(["sql", *argv])
            got = (out.getvalue() or err.getvalue()).splitlines()[:1] or [""]
            if any("k32" in a for a in argv) and "unknown run 'k32'" in err.getvalue():
                continue
            if expected.startswith("saev sql: error:"):
                ok = rc != 0 and got[0].startswith(expected.split(" (")[0])
            else:
                sep = "," if "," in expected else None
                ok = rc == 0 and got[0].split(sep) == expected.split(sep)
            if not ok:
                problems.append(f"{fence.where}: saev sql {shlex.join(argv)} -> {got[0]!r}")
    finally:
        os.chdir(cwd)
    return problems


def test_sql_transcripts_match_the_demo_warehouse():
    """The `run` check, on the project's own demo warehouse when `make demo` has built it."""
    assert len(transcripts()) >= 8, "the console fences lost their `$ saev sql` lines"
    if not (REPO / "warehouse" / "saev.duckdb").exists():
        pytest.skip("no warehouse/saev.duckdb: run `make demo` first")
    problems = check_transcripts(REPO)
    assert not problems, problems


def test_parse_check_catches_a_renamed_option(monkeypatch):
    """The checks above can fail: a mistyped option or -S key, and an unknown query."""
    with pytest.raises(pytest.fail.Exception):
        check_parse(["saev", "train", "-S", "sae.kk=32"], monkeypatch)
    with pytest.raises(pytest.fail.Exception):
        check_parse(["saev", "sql", "--lisst"], monkeypatch)
    with pytest.raises(AssertionError):
        check_parse(["saev", "sql", "no_such_query"], monkeypatch)
    with pytest.raises(AssertionError):
        make_dry(["make", "no-such-target"])


def test_the_collectors_can_fail(tmp_path):
    """An untagged fence is seen as untagged, its marker is read, and a covered-by block whose
    command the named test does not run fails."""
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- test: covered-by tests/conftest.py -->\n```\nsaev frobnicate --hard\n```\n"
    )
    (fence,) = fences(page)
    assert fence.lang == "" and fence.marker == "covered-by" and fence.line == 2
    assert commands(Fence(page, 2, "console", "", "", "$ saev sql x \\\n  --list\nout")) == [
        ["saev", "sql", "x", "--list"]
    ]
    fence.page = REPO / "README.md"  # `where` is relative to the repository
    with pytest.raises(AssertionError, match="saev frobnicate"):
        check_covered(fence)
