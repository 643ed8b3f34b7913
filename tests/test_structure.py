"""The shape of the code, checked from its source: saev_core has no import cycle (lazy imports
inside functions and `TYPE_CHECKING` imports included), no module over ~400 lines without a
docstring that says why, and no import of the orchestration engines (Prefect, MLflow, DVC),
which belong to flows/.

The import graph is read with `ast`, so nothing is imported to build it. A package's
`__init__` is a node of its own: a submodule that imports its own package's `__init__` makes a
cycle (the `__init__` re-exports from the submodule), the partial-initialisation trap the split
into packages is meant to keep out. Code inside saev_core imports from the defining submodule.

The same graph, over flows/ too, checks that each dvc.yaml stage lists the code it may load
(`test_each_dvc_stage_depends_on_the_code_it_may_load`); bench/stage_deps.py checks what a traced
`dvc repro` actually loaded.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "saev_core"
MAX_LINES = 400
REASON = "Over 400 lines because"
ENGINES = ("prefect", "mlflow", "dvc")


def modules(packages: tuple[str, ...] = (PACKAGE,)) -> dict[str, Path]:
    """Dotted name -> file, for every module and package `__init__` of `packages`."""
    found = {}
    for path in sorted(p for package in packages for p in (ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, node: ast.Import | ast.ImportFrom, known: set[str]):
    """The modules of `known` that one import statement of module `name` loads."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: counted from the package the module is in
            parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = set()
    for target in targets:
        while target and target not in known:  # `import a.b.c` loads the deepest module known
            target = target.rpartition(".")[0]
        if target:
            out.add(target)
    return out


def module_level(tree: ast.Module):
    """The import statements that run when the module is imported: at module level, inside
    `try`/`if` blocks too, but not `if TYPE_CHECKING:` and not inside functions or classes."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):  # `if TYPE_CHECKING:` never runs; its `else:` does
            checking = ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
            todo += node.orelse if checking else node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody
            todo += [n for h in node.handlers for n in h.body]


def import_graph(
    packages: tuple[str, ...] = (PACKAGE,), lazy: bool = True
) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between the modules of `packages`, every top-level package each module imports).
    `lazy`: imports inside functions and under `TYPE_CHECKING` count too; else only those that
    run at import time."""
    known = modules(packages)
    edges, external = defaultdict(set), defaultdict(set)
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree) if lazy else module_level(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            edges[name] |= imported(name, path, node, set(known)) - {name}
            if isinstance(node, ast.Import):
                external[name] |= {a.name.split(".")[0] for a in node.names}
            elif not node.level and node.module:
                external[name].add(node.module.split(".")[0])
    return edges, external


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, stack, on, found = {}, {}, [], set(), []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start), on.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child), on.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_reader_finds_a_cycle_and_a_lazy_import():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    known = {"saev_core", "saev_core.x", "saev_core.x.y"}
    lazy = ast.parse("def f():\n    from saev_core.x.y import z\n").body[0].body[0]
    assert imported("saev_core.w", Path("w.py"), lazy, known) == {"saev_core.x.y"}
    rel = ast.parse("from .y import z").body[0]
    assert imported("saev_core.x", Path("__init__.py"), rel, known) == {"saev_core.x.y"}


def test_saev_core_has_no_import_cycle():
    edges, _ = import_graph()
    assert modules(), "no saev_core modules found"
    found = cycles(edges)
    detail = "\n".join(
        " -> ".join(c) + "\n    " + "; ".join(f"{m} imports {sorted(edges[m] & set(c))}" for m in c)
        for c in found
    )
    assert not found, f"import cycles in saev_core (import from the defining module):\n{detail}"


def test_no_module_over_400_lines_without_a_reason():
    long = {}
    for name, path in modules().items():
        text = path.read_text()
        n = len(text.splitlines())
        if n > MAX_LINES and REASON not in (ast.get_docstring(ast.parse(text)) or ""):
            long[name] = n
    assert not long, f"split these, or say in the docstring '{REASON} ...': {long}"


def test_saev_core_leaves_the_engines_to_flows():
    _, external = import_graph()
    bad = {m: sorted(set(e) & set(ENGINES)) for m, e in external.items() if set(e) & set(ENGINES)}
    assert not bad, f"saev_core imports an orchestration engine (belongs in flows/): {bad}"


WIRING = {"saev_core/__init__.py", "flows/__init__.py"}
"""Loaded by every stage but define no behaviour (the lazy name table; an empty package)."""


def loaded_at_import(edges: dict[str, set[str]], start: str) -> set[str]:
    """`start` and every module that importing it loads: its module-level imports, followed, and
    the packages above each one (Python runs a package's `__init__` before its submodules)."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += edges.get(name, ())
    return seen


def uncovered(files: set[str], deps: list[str]) -> list[str]:
    """The files no dep names, itself or as a folder above it."""
    return sorted(
        f for f in files if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)
    )


def test_the_coverage_check_sees_a_missing_file_and_a_folder_dep():
    assert uncovered({"a/b.py", "a/c/d.py", "e.py"}, ["a/c", "e.py"]) == ["a/b.py"]
    assert uncovered({"a/cd.py"}, ["a/c"]) == ["a/cd.py"]
    edges = {"p.m": {"q"}, "q": {"r.s"}}
    assert loaded_at_import(edges, "p.m") == {"p", "p.m", "q", "r", "r.s"}
    source = "if TYPE_CHECKING:\n import a\nelse:\n import b\ntry:\n import c\nexcept E:\n pass\n"
    source += "def f():\n import d\nclass K:\n import e\n"
    assert {n.names[0].name for n in module_level(ast.parse(source))} == {"b", "c"}


def stage_graph() -> dict[str, set[str]]:
    """What loading a module may load: every import of a saev_core module, those inside its
    functions too (a stage's library code imports its heavy parts lazily, on use), and the
    module-level imports of a flows/ module. Functions in flows/ are not followed: each would
    pull in every stage (`flows.compare` imports each step's flow and code lazily), so a stage
    lists the flows and saev_core entry points of its lazy imports by hand."""
    top, _ = import_graph((PACKAGE, "flows"), lazy=False)
    every, _ = import_graph((PACKAGE, "flows"), lazy=True)
    return {m: every[m] if m.split(".")[0] == PACKAGE else top[m] for m in top | every}


def test_each_dvc_stage_depends_on_the_code_it_may_load():
    """`dvc repro` re-runs a stage when one of its deps changes, so a stage must list every file
    of ours that it may load: from its command's module and from each module under the code
    folders and files it lists, along `stage_graph`. A miss means an edit there leaves the
    stage's output stale without `dvc status` saying so."""
    import yaml

    known = modules((PACKAGE, "flows"))
    files = {name: str(path.relative_to(ROOT)) for name, path in known.items()}
    edges = stage_graph()
    missing = {}
    for stage, spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        spec = spec.get("do", spec)  # a foreach stage's template
        deps = [str(d) for d in spec.get("deps", []) if not str(d).startswith("${")]
        command = spec["cmd"].split()
        assert command[:2] == ["python", "-m"] and command[2] in known, spec["cmd"]
        starts = [command[2]] + [m for m, f in files.items() if not uncovered({f}, deps)]
        loaded = {files[m] for s in starts for m in loaded_at_import(edges, s)}
        if gaps := uncovered(loaded - WIRING, deps):
            missing[stage] = gaps
    assert not missing, f"dvc.yaml deps miss code the stage may load: {missing}"
