"""``reco bench``, ``reco reproduce`` and ``reco pretrain``: added to ``reco`` through the ``reco.cli`` entry point."""

from __future__ import annotations

import typer

from programs.cli import bench, pretrain, reproduce


def register(cli: typer.Typer) -> None:
    for module in (bench, pretrain, reproduce):
        module.register(cli)
