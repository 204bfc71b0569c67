"""The method's commands: ``reco train``, ``reco eval``, ``reco predict`` (thin over app/services)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli._common import fail, load_settings, print_json, serving
from app.schemas import RefineMode

Modes = Annotated[str, typer.Option("--modes", help="Comma-separated: clip,image,text,both.")]
Filters = Annotated[list[str] | None, typer.Option("--memory", help="Memory rows key=value (repeatable); default all.")]
SearchOpt = Annotated[str | None, typer.Option("--search", help="Ablation: 'uni' (default) or 'cross' search.")]
FusionOpt = Annotated[str | None, typer.Option("--fusion", help="Ablation: 'cross' (default) or 'uni' fusion.")]
DedupeOpt = Annotated[bool | None, typer.Option("--dedupe/--no-dedupe", help="k neighbours = k distinct images.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _filters(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--memory takes key=value, got {pair!r}")
        values = [int(v) if key.strip() == "label" and v.lstrip("-").isdigit() else v for v in value.split(",")]
        out[key.strip()] = values if len(values) > 1 else values[0]
    return out


def train(
    dataset: Annotated[str, typer.Option(help="Training pairs: payload 'dataset' in the memory, or 'synthetic'.")]
    = "flickr8k",
    split: Annotated[str, typer.Option(help="Split of the training pairs ('' = all).")] = "train",
    memory: Filters = None,
    epochs: Annotated[int | None, typer.Option(help="Default RECO_TRAIN_EPOCHS (paper: 10).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Default RECO_TRAIN_BATCH_SIZE (paper: 4096).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (paper: 1e-3, cosine).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay (paper: 1e-5).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps.")] = None,
    k: Annotated[int | None, typer.Option(help="Neighbours per query (paper: 10).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of initialisation and batch order.")] = None,
    fusion_config: Annotated[str | None, typer.Option(help="A JSON in app/fusion/configs (or a path).")] = None,
    query_dropout: Annotated[float, typer.Option(help="Hide the query from the fusion with this probability.")]
    = 0.0,
    gated_init: Annotated[bool, typer.Option(help="Start the fusion at mean fusion (learned gate).")] = False,
    score_bias: Annotated[bool, typer.Option(help="Feed the neighbours' search similarities to the attention.")]
    = False,
    search: SearchOpt = None,
    fusion: FusionOpt = None,
    dedupe: DedupeOpt = None,
    output: Annotated[Path | None, typer.Option(help="Checkpoint file (.safetensors).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the fusion (phi_image, phi_text, temperature) on cached embeddings; register the checkpoint."""
    from pydantic import ValidationError

    from app.services.method_common import MethodError
    from app.services.train import TrainRequest, run_training

    try:
        request = TrainRequest(
            dataset=dataset, split=split or None, memory_filters=_filters(memory), fusion_config=fusion_config, k=k,
            lr=lr, weight_decay=weight_decay, batch_size=batch_size, epochs=epochs, warmup_steps=warmup_steps,
            seed=seed, query_dropout=query_dropout, gated_init=gated_init, score_bias=score_bias,
            search_modality=search,
            fusion_modality=fusion, dedupe=dedupe, output=output, progress=not as_json)
        report = run_training(load_settings(), request)
    except (ValidationError, MethodError, ValueError) as exc:
        fail(exc)
    if as_json:
        print_json(report.model_dump(mode="json"))
        return
    m = report.metrics
    typer.echo(f"checkpoint {report.checkpoint} (id {report.checkpoint_id}, sha256 {report.sha256[:12]})")
    typer.echo(f"{report.pairs} pairs, memory {report.memory_size}, k={m['k']}: loss {m['initial_loss']:.4f} → "
               f"{m['final_loss']:.4f}, temperature {m['temperature']:.4f}, {m['seconds']:.1f}s")


def evaluate(
    dataset: Annotated[str, typer.Option(help="Manifest (file or folder), a name under the data dirs, "
                                              "or 'synthetic'.")],
    split: Annotated[str, typer.Option(help="Split to evaluate ('' = all rows).")] = "test",
    task: Annotated[str, typer.Option(help="auto | zeroshot | retrieval.")] = "auto",
    modes: Modes = "clip,image,text,both",
    k: Annotated[int | None, typer.Option(help="k' at inference (default RECO_K_INFER).")] = None,
    memory: Filters = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Fusion checkpoint; default the newest registered.")]
    = None,
    mean_fusion: Annotated[bool, typer.Option(help="Ablation: untrained mean fusion instead.")] = False,
    search: SearchOpt = None,
    fusion: FusionOpt = None,
    dedupe: DedupeOpt = None,
    threshold: Annotated[float | None, typer.Option(help="Near-duplicate cosine; default calibrated.")] = None,
    templates: Annotated[str | None, typer.Option(help="single | clip-short | a file ({c} = class).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N images.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Zero-shot top-1/top-5 and image<->text recall@1/5/10 for CLIP and each RECO mode."""
    from pydantic import ValidationError

    from app.services.evaluate import EvalRequest, run_evaluation
    from app.services.method_common import MethodError

    try:
        request = EvalRequest(
            dataset=dataset, split=split or None, task=task, modes=[m.strip() for m in modes.split(",") if m.strip()],
            k=k, memory_filters=_filters(memory), checkpoint=checkpoint, fusion="mean" if mean_fusion else "trained",
            search_modality=search, fusion_modality=fusion, dedupe=dedupe, near_duplicate_threshold=threshold,
            templates=templates, limit=limit, progress=not as_json)
        report = run_evaluation(load_settings(), request)
    except (ValidationError, MethodError, ValueError, OSError) as exc:
        fail(exc)
    if as_json:
        print_json(report.to_json_dict())
        return
    typer.echo(f"encoder {report.encoder_id} · checkpoint {report.checkpoint} · memory {report.memory_size} "
               f"(near-duplicates removed {report.near_duplicates_removed}) · k'={report.k}")
    for r in report.results:
        typer.echo(f"{r.dataset:28s} {r.task:10s} {r.metric:9s} {r.mode!s:6s} {r.value:.4f}")


def predict(
    image: Annotated[Path, typer.Option(help="Image file.")],
    classes: Annotated[Path | None, typer.Option(help="classes.txt: one class name per line.")] = None,
    labels: Annotated[str | None, typer.Option(help="Comma-separated class names (instead of --classes).")] = None,
    mode: Annotated[str | None, typer.Option(
        help="clip | image | text | both (default: the checkpoint's validated mode, both when it has none).")] = None,
    top: Annotated[int, typer.Option(min=1)] = 5,
    k: Annotated[int | None, typer.Option(help="k' (default RECO_K_INFER).")] = None,
    templates: Annotated[str | None, typer.Option(help="single | clip-short | a file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Zero-shot classification of one image, with the memory neighbours behind it."""
    from pydantic import ValidationError

    from app.imaging import ImageRejected, read_image_file
    from app.manifest import ManifestError, load_classes
    from app.remote import ServerError
    from app.services.method_common import MethodError
    from app.services.serving import PredictQuery

    settings = load_settings()
    try:
        names = load_classes(classes) if classes else [s.strip() for s in (labels or "").split(",") if s.strip()]
        query = PredictQuery(labels=names, mode=mode, top=top, k=k, templates=templates)
        answer = serving(settings).predict([(image.name, read_image_file(image, settings.max_image_bytes))], query)[0]
    except (ValidationError, MethodError, ManifestError, ImageRejected, ValueError, OSError, ServerError) as exc:
        fail(exc)
    if answer.mode is not RefineMode.CLIP and answer.reco is None:
        fail(f"no RECO answer: {answer.reco_unavailable} (use --mode clip for CLIP alone)", code=1)
    predictions = answer.clip if answer.reco is None else answer.reco
    if as_json:
        print_json({"mode": str(answer.mode), "encoder_id": answer.encoder_id, "checkpoint": answer.checkpoint,
                    "predictions": [p.model_dump() for p in predictions],
                    "clip": [p.model_dump() for p in answer.clip],
                    "neighbours": [n.model_dump(include={"item_id", "score", "attention", "caption"})
                                   for n in answer.neighbours],
                    "self_attention": answer.self_attention, "via": answer.via})
        return
    for p in predictions:
        typer.echo(f"{p.score:7.4f}  {p.name}")
    for n in answer.neighbours:
        typer.echo(f"   neighbour {n.score:6.3f} attention {n.attention or 0:.3f}  {n.caption}")


def register(cli: typer.Typer) -> None:
    cli.command("train")(train)
    cli.command("eval")(evaluate)
    cli.command("predict")(predict)
