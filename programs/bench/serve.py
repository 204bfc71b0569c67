"""``reco bench serve``: ``reco serve`` under concurrent HTTP clients, against the same serving service called
in-process, on the same memory, in one run.

The memory: ``size`` pairs of clustered unit vectors at the encoder's dimension (HNSW-indexed by the engine;
the cost of a search does not depend on what the vectors mean, and clusters behave more like embeddings than
uniform noise), a fusion checkpoint with random weights (speed only), the configured encoder (the committed
base by default). Workloads: ``predict`` (one image, 10 classes, RECO mode both, k'=10: image encode +
retrieval + fusion; class embeddings cached before timing) and ``search`` (a text query, k=10, CLIP).

For each workload and concurrency (1, 4, 16 clients, ``seconds`` each): requests answered, throughput,
p50/p99 latency and errors (must be 0). The in-process phase runs before and after the HTTP phase (the
memory has one owner at a time) and the two are pooled, so a drift of the machine shows in both; the HTTP
overhead is the p50 ratio at concurrency 1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from app.config import Settings, get_settings
from programs.bench.common import load_average, machine_info, percentile_ms

CONCURRENCY = (1, 4, 16)
SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "sample" / "clothing10" / "images"
CLASSES = ["dress", "hat", "longsleeve", "outwear", "pants", "shirt", "shoes", "shorts", "skirt", "t-shirt"]


class ServeRow(BaseModel):
    workload: str  # predict | search
    via: str  # http | in-process
    concurrency: int
    requests: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    server_p50_ms: float | None = None  # http: the server's own time (Server-Timing), the rest is HTTP + client


class ServeBenchResult(BaseModel):
    memory_size: int
    rows: list[ServeRow]
    http_overhead_c1: dict[str, float]  # workload -> http p50 / in-process p50 - 1 at one client
    details: dict[str, Any] = Field(default_factory=dict, exclude=True)


def build_memory(settings: Settings, size: int, *, seed: int = 0, progress: Callable[[str], None] = print) -> str:
    """``size`` pairs in the configured encoder's collection, indexed, live; a random fusion registered."""
    from app.db.repo import MetadataRepo
    from app.encoder import create_encoder
    from app.encoder.openclip import collection_name_for
    from app.memory.base import ItemPayload, MemoryRecord
    from app.memory.store import close_stores, open_store
    from app.services.ingest import prepare_storage
    from programs.bench.memory_files import synthetic_hash, synthetic_id

    prepare_storage(settings)
    encoder = create_encoder(settings)
    store = open_store(settings)
    memory = store.ensure_collection(collection_name_for(encoder.encoder_id), encoder.dim)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(10, size // 500), encoder.dim)).astype(np.float32)
    started = time.perf_counter()
    for lo in range(0, size, 4096):
        hi = min(size, lo + 4096)
        picks = rng.integers(0, len(centres), hi - lo)
        images = centres[picks] + 0.6 * rng.normal(size=(hi - lo, encoder.dim)).astype(np.float32)
        texts = centres[picks] + 0.9 * rng.normal(size=(hi - lo, encoder.dim)).astype(np.float32)
        images /= np.linalg.norm(images, axis=1, keepdims=True)
        texts /= np.linalg.norm(texts, axis=1, keepdims=True)
        memory.upsert([MemoryRecord(ItemPayload(item_id=synthetic_id(r), image_hash=synthetic_hash(r),
                                                caption=f"synthetic caption {r}", dataset="synthetic"),
                                    images[r - lo], texts[r - lo]) for r in range(lo, hi)])
    fill_s = time.perf_counter() - started
    progress(f"memory: {size:,} pairs written in {fill_s:.0f} s; building the HNSW index …")
    started = time.perf_counter()
    store.index_pending(force=True)
    index_s = time.perf_counter() - started
    store.swap_alias(settings.memory_alias, memory.collection)
    repo = MetadataRepo.from_url(settings.resolved_database_url)
    repo.ensure_version(encoder.encoder_id, memory.collection, settings.clip_model, settings.clip_pretrained,
                        encoder.dim)
    repo.set_live_version(encoder.encoder_id)
    _register_random_fusion(settings, encoder, f"bench:{size}")
    close_stores()
    return f"fill {fill_s:.1f} s, index {index_s:.1f} s"


def _register_random_fusion(settings: Settings, encoder: Any, version: str) -> None:
    import torch

    from app.db.runs import register_checkpoint
    from app.fusion.checkpoint import CheckpointMeta, save_checkpoint
    from app.fusion.config import get_fusion_config
    from app.fusion.model import RecoFusion
    from app.services.method_common import session_factory_for

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = RecoFusion(get_fusion_config(settings.fusion_config), encoder.dim)
    meta = CheckpointMeta(config=model.cfg.to_dict(), dim=encoder.dim, encoder_id=encoder.encoder_id,
                          memory_version=version, metrics={"note": "random init, speed benchmark only"})
    path = Path(settings.data_dir) / "fusion-random.safetensors"
    sha = save_checkpoint(path, model, meta)
    register_checkpoint(session_factory_for(settings), path=str(path), sha256=sha, encoder_id=encoder.encoder_id,
                        memory_version=version, config=model.cfg.to_dict(), metrics=meta.metrics)


def _drive(call: Callable[[int], float | None], concurrency: int, seconds: float) -> tuple[list[float], int]:
    """``concurrency`` threads calling ``call`` for ``seconds``: the latencies and the errors; ``call`` may
    return the server's own time in ms (kept in ``server_ms``)."""
    latencies: list[float] = []
    server_ms: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(n: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                own = call(n * 100_000 + i)
            except Exception:  # noqa: BLE001 - counted: the goal is 0
                with lock:
                    errors[0] += 1
            else:
                with lock:
                    latencies.append(time.perf_counter() - started)
                    if own is not None:
                        server_ms.append(own / 1000.0)
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _SERVER_TIMES[id(latencies)] = server_ms
    return latencies, errors[0]


_SERVER_TIMES: dict[int, list[float]] = {}


def _row(workload: str, via: str, concurrency: int, latencies: list[float], errors: int, seconds: float) -> ServeRow:
    own = _SERVER_TIMES.get(id(latencies)) or []
    return ServeRow(workload=workload, via=via, concurrency=concurrency, requests=len(latencies), errors=errors,
                    throughput_rps=round(len(latencies) / seconds, 2),
                    p50_ms=percentile_ms(latencies, 50) if latencies else 0.0,
                    p99_ms=percentile_ms(latencies, 99) if latencies else 0.0,
                    server_p50_ms=percentile_ms(own, 50) if own else None)


def _workloads(service: Any, images: list[bytes]) -> dict[str, Callable[[int], float | None]]:
    from app.schemas import RefineMode
    from app.services.serving import PredictQuery, SearchQuery

    query = PredictQuery(labels=CLASSES, mode=RefineMode.BOTH, k=10)

    def server_ms() -> float | None:
        http = getattr(service, "http", None)
        return getattr(http, "last_server_ms", None)

    def predict(i: int) -> float | None:
        answer = service.predict([("image", images[i % len(images)])], query)[0]
        if answer.reco is None:
            raise RuntimeError(answer.reco_unavailable or "no RECO answer")
        return server_ms()

    def search(i: int) -> float | None:
        found = service.search(SearchQuery(text=f"a photo of a {CLASSES[i % len(CLASSES)]} number {i}", k=10))
        if len(found.results) != 10:
            raise RuntimeError(f"{len(found.results)} results")
        return server_ms()

    return {"predict": predict, "search": search}


Measured = dict[tuple[str, int], tuple[list[float], int]]


def _measure(service: Any, via: str, images: list[bytes], seconds: float) -> Measured:
    out = {}
    for name, call in _workloads(service, images).items():
        call(0)  # warm: class embeddings, first query
        for c in CONCURRENCY:
            out[(name, c)] = _drive(call, c, seconds)
    return out


def run_serve_bench(size: int = 100_000, *, seconds: float = 15.0, n_images: int = 40,
                    settings: Settings | None = None, workdir: Path | None = None,
                    progress: Callable[[str], None] = print) -> ServeBenchResult:
    from app.memory.store import close_stores
    from app.services.serving import ServingService

    root = Path(tempfile.mkdtemp(prefix="reco-bench-serve-", dir=workdir))
    settings = (settings or get_settings()).model_copy(update={"data_dir": root / "data", "database_url": None,
                                                               "qdrant_url": None, "memory_path": None,
                                                               "api_url": None, "fusion_checkpoint": ""})
    images = [p.read_bytes() for p in sorted(SAMPLE_IMAGES.glob("val_*"))[:n_images]]
    info = machine_info()
    load = {"start": load_average()}
    try:
        built = build_memory(settings, size, progress=progress)
        pooled: Measured = {}

        def in_process() -> None:
            service = ServingService(settings)
            service.warm_up()
            for key, (lat, err) in _measure(service, "in-process", images, seconds / 2).items():
                old = pooled.get(key, ([], 0))
                pooled[key] = (old[0] + lat, old[1] + err)
            service.close()
            close_stores()

        progress("in-process (first half) …")
        in_process()
        progress("HTTP through reco serve …")
        http = _http_phase(settings, images, seconds, root)
        load["after_http"] = load_average()
        progress("in-process (second half) …")
        in_process()
    finally:
        close_stores()
        shutil.rmtree(root, ignore_errors=True)
    load["end"] = load_average()
    rows = [_row(name, "in-process", c, lat, err, seconds) for (name, c), (lat, err) in pooled.items()]
    rows += [_row(name, "http", c, lat, err, seconds) for (name, c), (lat, err) in http.items()]
    overhead = {}
    for name in ("predict", "search"):
        mine = next(r for r in rows if (r.workload, r.via, r.concurrency) == (name, "in-process", 1))
        theirs = next(r for r in rows if (r.workload, r.via, r.concurrency) == (name, "http", 1))
        overhead[name] = round(theirs.p50_ms / mine.p50_ms - 1, 4) if mine.p50_ms else float("nan")
    return ServeBenchResult(memory_size=size, rows=sorted(rows, key=lambda r: (r.workload, r.concurrency, r.via)),
                            http_overhead_c1=overhead,
                            details={"machine": info, "load_average": load, "memory": built, "seconds": seconds,
                                     "encoder": f"{settings.clip_model}/{settings.clip_pretrained or 'random'}",
                                     "images": len(images)})


def _http_phase(settings: Settings, images: list[bytes], seconds: float, root: Path) -> Measured:
    """``reco serve`` as a child process; one ``ServingClient`` (its own connection pool) per client thread."""
    from app.remote import ServerInfo, find_server
    from app.services.serving_client import ServingClient

    env = os.environ | {f"RECO_{k.upper()}": str(v) for k, v in {
        "data_dir": settings.data_dir, "clip_model": settings.clip_model,
        "clip_pretrained": settings.clip_pretrained}.items()}
    env.pop("RECO_DATABASE_URL", None)
    env.pop("RECO_API_URL", None)
    log = (root / "serve.log").open("wb")
    process = subprocess.Popen([sys.executable, "-c", "from app.cli import main; main()", "serve", "--port", "0"],
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        server: ServerInfo | None = None
        while server is None or server.pid != process.pid:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"reco serve did not start: {(root / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.2)
            server = find_server(settings)
        local = threading.local()

        class PerThread:
            """Each client thread talks over its own connection, as separate clients would."""

            def __getattr__(self, name: str) -> Any:
                if not hasattr(local, "client"):
                    local.client = ServingClient.connect(settings, server)  # type: ignore[arg-type]
                return getattr(local.client, name)

        return _measure(PerThread(), "http", images, seconds)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
