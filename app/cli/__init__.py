"""``reco`` command line (Typer).

Command groups live in this package, one module each, every module exposing
``register(cli: typer.Typer)``; they are discovered here. Layers above the core (ingestion, workers,
ui) add their commands through the ``reco.cli`` entry-point group, so ``app`` never imports them.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from importlib.metadata import entry_points

import typer

cli = typer.Typer(
    name="reco",
    help="RECO memory service: retrieval-enhanced CLIP over an image-text memory.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _register_all() -> None:
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(cli)
    for ep in entry_points(group="reco.cli"):
        ep.load()(cli)


_register_all()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cli()
    except Exception as exc:
        # A memory held by another process (or left in a retired format) is an operating condition any
        # command may meet (the message says what to do), not a bug: one line on stderr, exit 2, no traceback.
        from app.memory.base import MemoryStoreError

        if not isinstance(exc, MemoryStoreError):
            raise
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise SystemExit(2) from None
