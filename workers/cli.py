"""``reco worker`` (placeholder until the workers issue lands; registered through the reco.cli entry point)."""

from __future__ import annotations

import typer


def register(cli: typer.Typer) -> None:
    return None
