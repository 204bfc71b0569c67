"""Static checks over the project's source (AST, no imports): unsafe deserialisation, SQL built from strings,
settings that may hold secrets printed or logged as they are. Used by ``test_security.py``."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("app", "workers", "ingestion", "ui", "migrations")

_UNSAFE_LOADERS = {"load", "loads", "Unpickler"}


def unsafe_loads(tree: ast.AST) -> list[tuple[int, str]]:
    """torch.load without weights_only=True, pickle/dill/joblib/cloudpickle loads, np.load(allow_pickle=True),
    yaml.load without a safe loader."""
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        name = node.func.attr
        keywords = {k.arg: k.value for k in node.keywords}
        constant = {k: v.value for k, v in keywords.items() if isinstance(v, ast.Constant)}
        if owner == "torch" and name == "load" and constant.get("weights_only") is not True:
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif owner in {"pickle", "dill", "joblib", "cloudpickle", "marshal"} and name in _UNSAFE_LOADERS:
            found.append((node.lineno, f"{owner}.{name}"))
        elif owner == "np" and name == "load" and constant.get("allow_pickle") is True:
            found.append((node.lineno, "np.load(allow_pickle=True)"))
        elif owner == "yaml" and name == "load" and "Safe" not in ast.unparse(keywords.get("Loader", ast.Constant(""))):
            found.append((node.lineno, "yaml.load without SafeLoader"))
    return found


_SQL_CALLS = {"execute", "exec_driver_sql", "executemany", "executescript", "text"}


def _formatted(node: ast.AST) -> bool:
    """A string built at run time: an f-string with values, ``%``, ``+`` of strings, or ``.format``."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        return any(isinstance(side, ast.Constant | ast.JoinedStr) and not isinstance(getattr(side, "value", ""), int)
                   for side in (node.left, node.right))
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"


def sql_from_strings(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in _SQL_CALLS and _formatted(node.args[0]):
                found.append((node.lineno, f"{name}() of a formatted string"))
    return found


_SECRET_FIELDS = {"database_url", "resolved_database_url", "broker_url", "result_backend", "qdrant_api_key"}
_OUTPUT_CALLS = {"debug", "info", "warning", "error", "exception", "critical", "log", "print", "echo", "secho",
                 "write", "markdown", "caption", "text", "code", "json", "success"}


def _raw_secret(node: ast.AST) -> bool:
    """A settings field that may hold a secret, or the whole settings object, used as is (not through a
    redacting call) in a value that is printed or logged."""
    if isinstance(node, ast.Attribute):
        return node.attr in _SECRET_FIELDS
    if isinstance(node, ast.Name):
        return node.id == "settings"
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) and _raw_secret(v.value) for v in node.values)
    if isinstance(node, ast.BinOp):
        return _raw_secret(node.left) or _raw_secret(node.right)
    return False


def secrets_output(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in _OUTPUT_CALLS and any(_raw_secret(a) for a in [*node.args, *(k.value for k in node.keywords)]):
                found.append((node.lineno, f"{name}() prints a setting that may hold a secret"))
    return found


def scan(check: Callable[[ast.AST], list[tuple[int, str]]]) -> list[str]:
    problems = []
    """Every finding of ``check`` in the project's Python sources, as 'path:line: what'."""
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            problems += [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in check(tree)]
    return problems
