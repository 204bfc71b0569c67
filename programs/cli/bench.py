"""``reco bench ingest|search|refine|train|serve|all``: the benchmarks of programs/bench, with ``--json``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli._common import fail, print_json

bench_app = typer.Typer(help="Benchmarks: ingest, search, refine, train, or all (writes docs/performance.md).",
                        no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object (the issue's contract).")]
ImagesOpt = Annotated[Path, typer.Option("--images", help="Folder of JPEGs; the first N sorted by name are used.")]
DEFAULT_IMAGES = Path(__file__).resolve().parents[3] / "shared" / "data" / "flickr8k" / "images"


def _show(result: Any, as_json: bool) -> None:
    if as_json:
        print_json(result.model_dump())
        return
    for key, value in result.model_dump().items():
        typer.echo(f"{key}: {value}")


@bench_app.command("ingest")
def ingest(
    images: ImagesOpt = DEFAULT_IMAGES,
    n: Annotated[int, typer.Option("--n", min=1, help="Images.")] = 1000,
    rounds: Annotated[int | None, typer.Option(min=1, help="Interleaved rounds (default 4; --peer: 3).")] = None,
    batch: Annotated[int, typer.Option(min=1)] = 64,
    model: Annotated[str, typer.Option(help="open_clip model (random weights unless --pretrained).")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="Pretrained tag or checkpoint file.")] = "",
    peer: Annotated[bool, typer.Option("--peer", help="Instead: `reco ingest` vs clip-retrieval, whole commands, "
                                                      "and our fp32 encoder-only, interleaved (~4 min a round; "
                                                      "writes docs/performance/peer.json).")] = False,
    encoder_n: Annotated[int, typer.Option(help="--peer: images of the fp32 encoder-only leg (0: none).")] = 256,
    reco_precision: Annotated[str | None, typer.Option(help="--peer: RECO_PRECISION for `reco ingest` "
                                                            "(default: the project's auto).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Full ingest pipeline vs encoder-only on pre-decoded tensors (same run, same images)."""
    from programs.bench.ingest import BenchError

    try:
        if peer:
            from programs.bench.peer import run_peer_bench

            result: Any = run_peer_bench(images, n, rounds=rounds or 3, batch=batch, encoder_n=encoder_n,
                                         reco_precision=reco_precision, log=lambda m: typer.echo(m, err=True))
            _save_peer(result)
        else:
            from programs.bench.ingest import run_ingest_bench

            result = run_ingest_bench(images, n, model=model, pretrained=pretrained, batch=batch, rounds=rounds or 4)
    except BenchError as exc:
        fail(exc)
    _show(result, as_json)


def _save_peer(result: Any) -> None:
    import json

    folder = Path("docs") / "performance"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "peer.json").write_text(json.dumps(result.model_dump() | {"details": result.details}, indent=1,
                                                 default=str) + "\n")
    if (folder / "results.json").is_file():
        from programs.bench.report import write_report

        write_report(folder.parent)


@bench_app.command("precision")
def precision(
    models: Annotated[str, typer.Option(help="Comma-separated model[/pretrained] (reco-base: the committed base).")]
    = "reco-base/flickr8k_s229k_b128_r128,ViT-B-32",
    quality_n: Annotated[int | None, typer.Option(help="Flickr8k test images for quality (default: all).")] = None,
    speed_n: Annotated[int, typer.Option(min=8, help="Images timed per variant and round.")] = 256,
    rounds: Annotated[int, typer.Option(min=1, help="Interleaved speed rounds.")] = 2,
    max_seconds: Annotated[float, typer.Option(help="A variant stops after this many seconds a round.")] = 60.0,
    compile_models: Annotated[str | None, typer.Option(help="Comma-separated models whose torch.compile variants "
                                                           "run (default: all; minutes of compiling each).")] = None,
    docs: Annotated[Path, typer.Option(help="Where performance.md and performance/precision.json go.")]
    = Path("docs"),
    as_json: JsonOpt = False,
) -> None:
    """Speed and quality vs fp32 of bf16, channels-last, torch.compile, int8, batch sizes, threads (~25 min)."""
    import json

    from app.config import get_settings
    from programs.bench.precision import run_precision_bench
    from programs.bench.report import ASSETS, write_report

    pairs = [(m.split("/", 1)[0], m.split("/", 1)[1] if "/" in m else "") for m in models.split(",") if m.strip()]
    (docs / ASSETS).mkdir(parents=True, exist_ok=True)
    out = docs / ASSETS / "precision.json"
    result = run_precision_bench(
        get_settings().shared_data, models=pairs, quality_n=quality_n, speed_n=speed_n, rounds=rounds,
        max_seconds=max_seconds, log=lambda m: typer.echo(m, err=True), checkpoint=out,
        compile_models=compile_models.split(",") if compile_models is not None else None)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    if (docs / ASSETS / "results.json").is_file():
        write_report(docs)
    summary = [{k: m[k] for k in ("model", "coded_default", "recommended", "default_matches_measurement")}
               for m in result["models"]]
    if as_json:
        print_json({"models": summary, "cpu_flags": result["cpu_flags"]})
        return
    for row in summary:
        typer.echo(f"{row['model']}: default {row['coded_default']}, best measured {row['recommended']}")


@bench_app.command("gpu")
def gpu(
    images: ImagesOpt = DEFAULT_IMAGES,
    n: Annotated[int, typer.Option("--n", min=1)] = 1000,
    batch: Annotated[int, typer.Option(min=1)] = 256,
    model: Annotated[str, typer.Option(help="open_clip model (random weights: speed only).")] = "ViT-B-32",
) -> None:
    """ViT-B-32 fp16 on CUDA: end to end (PIL decode threads; and nvJPEG decode where available) and encoder-only."""
    from programs.bench.gpu import run_gpu_bench

    print_json(run_gpu_bench(images, n, batch=batch, model=model))


@bench_app.command("search")
def search(
    sizes: Annotated[str, typer.Option(help="Comma-separated memory sizes (pairs).")] = "100000",
    data: Annotated[str, typer.Option(help="embeddings: the base encoder's real embeddings of the shared datasets, "
                                           "grown by perturbation (Qdrant Edge vs exact; writes "
                                           "docs/performance/engine.md); synthetic: random unit vectors "
                                           "(exact vs Qdrant local mode / server).")] = "embeddings",
    backends: Annotated[str, typer.Option(help="--data embeddings: exact plus any of edge, edge-int8, edge-int8-disk "
                                                "(int8 in RAM, originals memory-mapped from disk).")]
    = "exact,edge,edge-int8",
    efs: Annotated[str, typer.Option(help="--data embeddings: hnsw_ef values of the recall curve.")]
    = "16,32,64,128,256",
    queries: Annotated[int, typer.Option(min=10, help="Single queries per row.")] = 100,
    qdrant_local_max: Annotated[int, typer.Option(help="--data synthetic: largest size run in Qdrant local mode.")]
    = 100_000,
    stretch: Annotated[bool, typer.Option("--stretch", help="Instead: 10M pairs in int8 + float rescoring (~15 min, "
                                                            "~35 GB disk; writes docs/performance/stretch.json).")]
    = False,
    as_json: JsonOpt = False,
) -> None:
    """Exact index vs Qdrant Edge (HNSW per ef, int8, filtered, exact mode): QPS, p50/p99, recall@10, RSS."""
    import json
    import shlex
    import sys

    from programs.bench.search import EDGE_LAYOUTS, engine_report, merge_runs, run_engine_bench, run_search_bench

    if stretch:
        _run_stretch(as_json)
        return
    try:
        size_list = [int(s) for s in sizes.split(",") if s.strip()]
        ef_list = [int(s) for s in efs.split(",") if s.strip()]
    except ValueError:
        fail(f"--sizes and --efs take integers, got {sizes!r} / {efs!r}")
    if data == "embeddings":
        from app.cli._common import load_settings

        wanted = [b.strip() for b in backends.split(",") if b.strip()]
        unknown = set(wanted) - {"exact", *EDGE_LAYOUTS}
        if unknown or "exact" not in wanted:
            fail(f"--backends: exact plus any of {sorted(EDGE_LAYOUTS)} (unknown: {sorted(unknown)})")
        settings = load_settings()
        try:
            result = run_engine_bench(size_list, data_root=settings.shared_data, settings=settings, efs=ef_list,
                                      backends=wanted, single=queries, log=lambda m: typer.echo(m, err=True))
        except FileNotFoundError as exc:
            fail(str(exc))
        folder = Path("docs") / "performance"
        folder.mkdir(parents=True, exist_ok=True)
        saved = folder / "search.json"
        command = shlex.join(["reco", *sys.argv[1:]])
        merged = merge_runs(json.loads(saved.read_text()) if saved.is_file() else None, result, command)
        saved.write_text(json.dumps(merged.model_dump() | {"details": merged.details}, indent=1, default=str) + "\n")
        (folder / "engine.md").write_text(engine_report(merged, command))
        typer.echo(f"wrote {folder / 'engine.md'} and {folder / 'search.json'}", err=True)
    elif data == "synthetic":
        result = run_search_bench(size_list, qdrant_local_max=qdrant_local_max)
    else:
        fail(f"--data is embeddings or synthetic, got {data!r}")
    if as_json:
        print_json(result.model_dump())
        return
    for row in result.results:
        ef = f" ef {row.ef:3d}" if row.ef else "       "
        typer.echo(f"{row.size:>9,} {row.backend:10s}{ef} batch {row.batch:3d}{' 1%' if row.filtered else '   '}: "
                   f"{row.qps:10.1f} QPS  p50 {row.p50_ms:8.2f} ms  p99 {row.p99_ms:8.2f} ms  "
                   f"recall@10 {row.recall_at_10:.3f}  RSS {row.rss_mb:,.0f} MB")


def _run_stretch(as_json: bool) -> None:
    import json

    from programs.bench.stretch import run_stretch_bench

    result = run_stretch_bench()
    folder = Path("docs") / "performance"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stretch.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    if as_json:
        print_json({k: v for k, v in result.items() if k != "machine"})
        return
    typer.echo(f"{result['size']:,} pairs int8: recall@10 {result['recall_at_10']}, peak RSS "
               f"{result['peak_rss_mb'] / 1024:.1f} GiB, load {result['load_s']} s, batch of 64 {result['batch_s']} s")


@bench_app.command("refine")
def refine(
    images: ImagesOpt = DEFAULT_IMAGES,
    memory_size: Annotated[int, typer.Option(help="Pairs in the memory.")] = 100_000,
    n: Annotated[int, typer.Option("--n", min=2, help="Images (requests per mode).")] = 40,
    dtype: Annotated[str, typer.Option(help="Exact index storage: float32 or float16.")] = "float32",
    threads: Annotated[int, typer.Option(help="torch threads while timing (0 = torch's default).")] = 1,
    memory: Annotated[str, typer.Option(help="edge: Qdrant Edge (HNSW) over embedding-like rows, beside the exact "
                                             "index of the same rows; exact: synthetic exact indexes (--dtype).")]
    = "edge",
    class_sets: Annotated[bool, typer.Option(
        "--class-sets/--no-class-sets",
        help="Also time class-set preparation: 1,000 labels, and the first prediction against CUB-100.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Image bytes → CLIP top-5 vs RECO top-5 (retrieval + fusion), p50/p99 and RECO's overhead; and the
    class-set preparation a first prediction against a new class set waits for (cold cache)."""
    from programs.bench.refine import run_refine_bench

    if dtype not in ("float32", "float16"):
        fail("--dtype is float32 or float16")
    result = run_refine_bench(images, memory_size=memory_size, n_images=n, dtype=dtype,  # type: ignore[arg-type]
                              threads=threads or None, class_sets=class_sets, memory=memory)
    _show(result, as_json)
    if class_sets and not as_json:
        prep = result.details.get("class_set_preparation", {})
        typer.echo(f"class-set preparation: 1,000 labels {prep.get('labels_1000_s')} s, CUB-100 first prediction "
                   f"{prep.get('cub100_first_prediction_s')} s ({prep.get('templates')} templates per class, "
                   f"memory {prep.get('memory_size')}, encode batch {prep.get('encode_batch_size')}, "
                   f"{prep.get('threads')} threads)")


@bench_app.command("train")
def train(
    pairs: Annotated[int, typer.Option(min=2)] = 8192,
    memory_size: Annotated[int, typer.Option()] = 50_000,
    batch_size: Annotated[int, typer.Option(min=2)] = 1024,
    epochs: Annotated[int, typer.Option(min=1)] = 2,
    as_json: JsonOpt = False,
) -> None:
    """Fusion training samples/s on cached embeddings (neighbours precomputed in one batched pass)."""
    from programs.bench.train import run_train_bench

    _show(run_train_bench(pairs=pairs, memory_size=memory_size, batch_size=batch_size, epochs=epochs), as_json)


@bench_app.command("serve")
def serve(
    size: Annotated[int, typer.Option(help="Memory size (pairs).")] = 100_000,
    seconds: Annotated[float, typer.Option(help="Seconds per workload and concurrency.")] = 15.0,
    as_json: JsonOpt = False,
) -> None:
    """reco serve under 1, 4 and 16 concurrent HTTP clients vs the serving service in-process (same memory,
    same run): throughput, p50/p99, errors, HTTP overhead; writes docs/performance/serve.json."""
    import json

    from programs.bench.serve import run_serve_bench

    result = run_serve_bench(size, seconds=seconds, progress=lambda msg: typer.echo(msg, err=True))
    folder = Path("docs") / "performance"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "serve.json").write_text(json.dumps(result.model_dump() | {"details": result.details}, indent=1,
                                                  default=str) + "\n")
    if as_json:
        print_json(result.model_dump())
        return
    for row in result.rows:
        typer.echo(f"{row.workload:8s} {row.via:10s} c={row.concurrency:<3d} {row.requests:6d} req "
                   f"{row.throughput_rps:8.1f} req/s  p50 {row.p50_ms:8.1f} ms  p99 {row.p99_ms:8.1f} ms  "
                   f"errors {row.errors}")
    typer.echo(f"HTTP overhead at one client (p50): {result.http_overhead_c1}")


@bench_app.command("all")
def run_all_benchmarks(
    images: ImagesOpt = DEFAULT_IMAGES,
    n: Annotated[int, typer.Option("--n", min=2)] = 1000,
    docs: Annotated[Path, typer.Option(help="Where performance.md and performance/ go.")] = Path("docs"),
    as_json: JsonOpt = False,
) -> None:
    """Every benchmark (~15 min on 2 cores), then regenerate docs/performance.md with tables and plots."""
    from programs.bench.suite import run_all

    results = run_all(images, docs, n=n, log=lambda msg: typer.echo(msg, err=True))
    if as_json:
        print_json({key: value.get("result", value) if isinstance(value, dict) else value
                    for key, value in results.items()})
        return
    typer.echo(f"wrote {docs / 'performance.md'} in {results['duration_s'] / 60:.1f} min")


def register(cli: typer.Typer) -> None:
    cli.add_typer(bench_app, name="bench")
