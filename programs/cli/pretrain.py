"""``reco pretrain``: train the frozen base encoder on Flickr8k train and report its figures."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.cli._common import load_settings, print_json

# Environment that changes how (not what) the run computes; recorded with the command in the model card.
_ENV_THAT_MATTERS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "HF_HUB_OFFLINE")


def register(cli: typer.Typer) -> None:
    cli.command("pretrain")(pretrain)


def pretrain(
    data_root: Annotated[
        Path | None, typer.Option(help="Folder with flickr8k/, imagenette/, … (default RECO_SHARED_DATA).")
    ] = None,
    model: Annotated[str, typer.Option(help="reco-* model config to train.")] = "reco-base",
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs (default: the committed recipe).")] = None,
    minutes: Annotated[
        float | None, typer.Option(help="Stop after this many minutes (a cap, not the schedule).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the image tower's init and of the data order.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint to write (default <data_dir>/checkpoints/<model>.safetensors); "
            "its .json report and .md model card are written beside it."
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Decoded-image and caption-feature cache (default <data_dir>/cache/pretrain).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch CPU threads (1 is faster when the cores are shared).")
    ] = None,
    evaluate: Annotated[bool, typer.Option(help="Evaluate the exported file (Flickr8k test, zero-shot).")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole report as JSON.")] = False,
) -> None:
    """Train the base CLIP-style model (frozen MiniLM text tower, conv image tower) on CPU and evaluate it."""
    from programs.pretrain import PretrainRequest, committed_recipe, run_pretrain, write_report_and_card

    settings = load_settings()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    request = PretrainRequest(
        data_root=data_root or settings.shared_data,
        out=out or settings.data_dir / "checkpoints" / f"{model}.safetensors",
        cache_dir=cache_dir or settings.data_dir / "cache" / "pretrain",
        config=committed_recipe(model=model, epochs=epochs, minutes=minutes, seed=seed),
        evaluate=evaluate,
    )
    report = run_pretrain(request)
    env = [f"{k}={os.environ[k]}" for k in _ENV_THAT_MATTERS if k in os.environ]
    write_report_and_card(report, command=shlex.join([*env, "reco", *sys.argv[1:]]))
    if json_out:
        print_json(report)
    else:
        typer.echo(json.dumps(report.get("evaluation", report), indent=2))
