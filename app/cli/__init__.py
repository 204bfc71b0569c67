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


@cli.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error (also RECO_DEBUG=1)."),
) -> None:
    """RECO memory service: retrieval-enhanced CLIP over an image-text memory."""


def _debug_requested(argv: list[str]) -> bool:
    """``--debug`` anywhere before ``--`` (removed from argv), or RECO_DEBUG=1."""
    import os

    head = argv[: argv.index("--")] if "--" in argv else argv
    found = "--debug" in head
    if found:
        argv.remove("--debug")
    return found or os.environ.get("RECO_DEBUG", "").strip().lower() in ("1", "true", "yes")


def main() -> None:
    """The ``reco`` entry: every error a user can cause ends as one line (exit 2 usage, 1 environment);
    the traceback only with ``--debug`` (or RECO_DEBUG=1). No secret is ever printed (app.errors.redact)."""
    import os
    import sys

    from app.errors import describe, install_log_redaction

    debug = _debug_requested(sys.argv)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    try:  # typer >= 0.20 carries its own copy of click
        from typer import _click as click
    except ImportError:  # pragma: no cover - older typer uses click itself
        import click  # type: ignore[no-redef]

    try:
        code = cli(standalone_mode=False)  # click's own errors come here too: one line, not a box
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as exc:  # `reco` alone: its help
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.ClickException as exc:  # a bad option or argument: usage, exit 2
        from app.errors import one_line, redact

        ctx = getattr(exc, "ctx", None)
        where = f" (`{ctx.command_path} --help`)" if ctx is not None else ""
        typer.secho(f"error: {one_line(redact(exc.format_message()))}{where}", err=True, fg=typer.colors.RED)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        typer.secho("aborted", err=True, fg=typer.colors.YELLOW)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True, fg=typer.colors.YELLOW)
        raise SystemExit(130) from None
    except Exception as exc:
        if debug:
            import traceback

            from app.errors import redact

            sys.stderr.write(redact("".join(traceback.format_exception(exc))))
        message, code = describe(exc, data_dir=os.environ.get("RECO_DATA_DIR"))
        typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
        raise SystemExit(code) from None
    if isinstance(code, int) and code:
        raise SystemExit(code)
