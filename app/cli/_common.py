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
    except Exception as exc:  # pydantic ValidationError: bad RECO_* value
        fail(f"invalid settings: {exc}")
    return settings


def serving(settings: Settings) -> Any:
    """The serving service: through a running ``reco serve`` when there is one, else in this process."""
    from app.remote import find_server

    server = find_server(settings)
    if server is not None:
        from app.services.serving_client import ServingClient

        return ServingClient.connect(settings, server)
    from app.services.serving import ServingService

    return ServingService(settings)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=None, default=str) + "\n")


def fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)
