"""Helpers shared by the command modules (output, settings, errors)."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer

from app.config import Settings, get_settings


def load_settings() -> Settings:
    try:
        settings = get_settings()
    except Exception as exc:  # pydantic ValidationError: bad RECO_* value; never its input values (secrets)
        from app.errors import settings_error_line

        fail(f"invalid settings: {settings_error_line(exc)} (fix the RECO_* environment variable)")
    from app.errors import register_secrets, settings_secrets

    register_secrets(settings_secrets(settings))
    return settings


def serving(settings: Settings) -> Any:
    """The serving service: through a running ``reco serve`` when there is one, else in this process."""
    from app.remote import find_server

    server = find_server(settings)
    if server is not None:
        from app.services.serving_client import ServingClient

        return ServingClient.connect(settings, server)
    from app.db.session import upgrade_database
    from app.services.serving import ServingService

    settings.ensure_dirs()  # a fresh data dir: an empty memory, not "no such table"
    upgrade_database(settings.resolved_database_url)
    return ServingService(settings)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=None, default=str) + "\n")


def fail(message: str | BaseException, code: int = 2) -> NoReturn:
    """One line on stderr (secrets redacted, newlines folded), then exit ``code`` (2 usage, 1 environment).

    An exception may be given: a pydantic ValidationError then reads ``--option: what is wrong``."""
    from app.errors import one_line, redact, settings_error_line

    if isinstance(message, BaseException):
        is_validation = type(message).__name__ == "ValidationError" and callable(getattr(message, "errors", None))
        message = f"invalid input: {settings_error_line(message, options=True)}" if is_validation else str(message)
    typer.secho(f"error: {one_line(redact(message))}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)
