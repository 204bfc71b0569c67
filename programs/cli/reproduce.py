"""``reco reproduce``: the miniature reproduction of the paper's tables on the frozen base encoder."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli._common import fail, load_settings, print_json


def register(cli: typer.Typer) -> None:
    cli.command("reproduce")(reproduce)


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{option} takes comma-separated integers, got {text!r}")
    if not values:
        fail(f"{option} is empty")
    return values


def reproduce(
    seeds: Annotated[str | None, typer.Option(help="Seeds of the main table (comma-separated; default 0,1,2, "
                                                   "--quick: 0).")] = None,
    ablation_seeds: Annotated[str | None, typer.Option(help="Seeds of every other variant (default: the first "
                                                            "main seed).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small subsets, one seed, 2 epochs: a smoke run.")] = False,
    out: Annotated[Path, typer.Option(help="Folder for reproduction.md, reproduction.json and reproduction/*.png.")]
    = Path("docs"),
    variants: Annotated[str | None, typer.Option(help="Only these variants (comma-separated names; 'paper' is "
                                                      "always kept; issue 5's k/option/exclusion variants can be "
                                                      "named too).")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Fusion epochs (default 5; the paper trains 10).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=2, help="Fusion batch size (default 1024).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most N images per split and dataset.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Folder with flickr8k/, cub100/, … "
                                                        "(default RECO_SHARED_DATA).")] = None,
    model: Annotated[str | None, typer.Option(help="Encoder model (default RECO_CLIP_MODEL).")] = None,
    pretrained: Annotated[str | None, typer.Option(help="Encoder weights: tag or file (default "
                                                        "RECO_CLIP_PRETRAINED).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the aggregated results as JSON.")] = False,
    render_only: Annotated[bool, typer.Option("--render-only", help="Only re-render reproduction.md and the plots "
                                                                     "from <out>/reproduction.json.")] = False,
    export_default: Annotated[Path | None, typer.Option(help="Also write the default recipe's fusion (first main seed, "
                                                             "with its validation calibration, metrics and a model "
                                                             "card) into this folder, e.g. app/fusion/checkpoints.")]
    = None,
) -> None:
    """Train RECO on Flickr8k against a generic memory, evaluate with it and with domain pairs added; write docs."""
    import json

    from app.encoder import EncoderLoadError, OpenClipEncoder
    from programs.reproduce import ReproPlan
    from programs.reproduce.plan import extended_variants
    from programs.reproduce.service import run_reproduction

    if render_only:
        from programs.reproduce.report import render_from_json

        if not (out / "reproduction.json").is_file():
            fail(f"no {out / 'reproduction.json'} to render")
        typer.echo(f"wrote {render_from_json(out)}")
        return
    settings = load_settings()
    main_seeds = _ints(seeds or ("0" if quick else "0,1,2"), "--seeds")
    overrides: dict[str, Any] = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "limit": limit,
                                                   "threads": threads}.items() if v is not None}
    overrides["seeds"] = main_seeds
    overrides["ablation_seeds"] = _ints(ablation_seeds, "--ablation-seeds") if ablation_seeds else main_seeds[:1]
    plan = ReproPlan.quick(**overrides) if quick else ReproPlan(**overrides)
    if variants:
        known = [*plan.variants, *extended_variants()]
        wanted = {v.strip() for v in variants.split(",") if v.strip()} | {"paper"}
        unknown = wanted - {v.name for v in known}
        if unknown:
            fail(f"unknown variants {sorted(unknown)}; known: {[v.name for v in known]}")
        wanted |= {v.reuse for v in known if v.name in wanted and v.reuse}
        plan = plan.model_copy(update={"variants": [v for v in known if v.name in wanted]})
    try:
        encoder = OpenClipEncoder(model or settings.clip_model,
                                  settings.clip_pretrained if pretrained is None else pretrained,
                                  device=settings.device, precision=settings.precision,
                                  batch_size=max(settings.encode_batch_size, 128), seed=settings.random_init_seed)
        done = run_reproduction(encoder, data_root or settings.shared_data,
                                settings.data_dir / "cache" / "reproduce", out, plan,
                                command=shlex.join(["reco", *sys.argv[1:]]), progress=not as_json,
                                export_default=export_default)
    except (EncoderLoadError, FileNotFoundError, ValueError) as exc:
        fail(exc)
    if as_json:
        print_json(json.loads(done.json_path.read_text())["results"])
        return
    typer.echo(f"wrote {done.markdown_path} and {done.json_path} in {done.meta['seconds'] / 60:.1f} min")
    if done.exported is not None:
        typer.echo(f"default recipe `{done.meta['default_variant']}`: fusion checkpoint {done.exported}")
