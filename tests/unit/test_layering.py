"""The house rules (DESIGN.md, issue 20), read from the source itself.

Layers, lowest first: ``app`` (the core: method, memory, metadata, encoder, services, the ``reco`` shell) →
``ingestion`` → ``workers`` → ``api`` → ``ui`` → ``programs`` (bench, reproduce, pretrain). A package imports
only its own layer and those below it — at module level or inside a function, and never by naming an upper
module in a string (``importlib``, ``-m``) or through an entry point that the lower layer loads. The one
inversion is the ``reco.cli`` entry-point group, through which upper layers add their commands to ``reco``.
SQLAlchemy is imported only in ``app/db``; no module is longer than 400 lines.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("app", "ingestion", "workers", "api", "ui", "programs")
FRAMEWORKS_ABOVE_APP = {"celery", "streamlit", "fastapi", "uvicorn"}
MAX_MODULE_LINES = 400


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Top-level names of every import in the file, at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _module_strings(path: Path) -> set[str]:
    """Packages named in string literals that look like module paths (``"workers.tasks"``, ``"ui.app:main"``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = re.fullmatch(r"([a-z_]+)(\.[a-z_]+)+(:[a-z_]+)?", node.value)
            if match:
                found.add(match.group(1))
    return found


def _upward(package: str, names: set[str]) -> set[str]:
    allowed = set(LAYERS[: LAYERS.index(package) + 1])
    return (names & set(LAYERS)) - allowed


def test_no_upward_import() -> None:
    breaches = {
        str(p.relative_to(ROOT)): sorted(_upward(pkg, _imports(p)))
        for pkg in LAYERS for p in _sources(pkg)
    }
    assert {k: v for k, v in breaches.items() if v} == {}


def test_no_upward_module_named_in_a_string() -> None:
    """``importlib.import_module("ingestion.pipeline")`` or ``python -m workers.x`` would hide an upward arrow."""
    breaches = {
        str(p.relative_to(ROOT)): sorted(_upward(pkg, _module_strings(p)))
        for pkg in LAYERS for p in _sources(pkg)
    }
    assert {k: v for k, v in breaches.items() if v} == {}


def test_entry_points_only_add_commands() -> None:
    """The project declares one entry-point group, ``reco.cli``, loaded by app/cli alone; each target is above app."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = project.get("entry-points", {})
    assert set(groups) == {"reco.cli"}, groups
    for target in groups["reco.cli"].values():
        assert target.split(".")[0] in LAYERS[1:], target
    loaders = [p.relative_to(ROOT) for pkg in LAYERS for p in _sources(pkg) if "entry_points(" in p.read_text()]
    assert loaders == [Path("app/cli/__init__.py")], loaders


def test_app_imports_no_framework() -> None:
    breaches = {str(p.relative_to(ROOT)): sorted(_imports(p) & FRAMEWORKS_ABOVE_APP) for p in _sources("app")}
    assert {k: v for k, v in breaches.items() if v} == {}


def test_typer_only_in_command_modules() -> None:
    """In the core, typer is the ``reco`` shell's (app/cli); the layers above keep it in their cli modules."""
    users = [p.relative_to(ROOT) for p in _sources("app") if "typer" in _imports(p)]
    assert all(p.parts[:2] == ("app", "cli") for p in users), users


def test_sqlalchemy_only_in_app_db() -> None:
    users = [str(p.relative_to(ROOT)) for pkg in LAYERS for p in _sources(pkg)
             if "sqlalchemy" in _imports(p) and p.parts[len(ROOT.parts):][:2] != ("app", "db")]
    assert users == []


def test_api_is_a_thin_front_end() -> None:
    """api/ (reco serve) calls app services (and ingestion's pipeline for jobs); never the UI or the workers."""
    for p in _sources("api"):
        assert not _imports(p) & {"ui", "streamlit", "workers", "celery"}, p


def test_no_module_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for pkg in LAYERS for p in _sources(pkg)
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def _is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_graph() -> dict[str, set[str]]:
    """Project module → project modules it imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    modules: dict[str, Path] = {}
    for pkg in LAYERS:
        for p in _sources(pkg):
            parts = p.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block)
                       for n in ast.walk(block)}  # annotations only: never imported at run time
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_circle_finder_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles() -> None:
    """Function-level imports count too (a circle hidden in a function is still a circle); imports under
    ``if TYPE_CHECKING:`` do not, since they never run."""
    assert _circles(_module_graph()) == []
