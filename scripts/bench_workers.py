#!/usr/bin/env python
"""Benchmark: async ingestion through a real embed worker vs the in-process path, and refine latency.

    .venv/bin/python scripts/bench_workers.py [--n 1000] [--requests 100] [--json-out FILE]

Needs Redis (broker) and, by default, PostgreSQL (one fresh database per path, dropped afterwards;
``--sqlite`` uses SQLite files instead). Both paths ingest the same N Flickr8k images (one caption
each) with the configured encoder (``RECO_CLIP_MODEL`` / ``RECO_CLIP_PRETRAINED``; default the committed base
``reco-base``, named in the JSON as ``encoder``) into
the embedded engine (Qdrant Edge), on whatever device ``RECO_DEVICE`` resolves to. Throughput counts from
the first row read to the last row embedded, model loading excluded (both load it before the clock starts).
Refine latency: a ``refine`` worker serving the async path's memory through ``reco serve`` (which owns it;
a 1-epoch fusion checkpoint), N ``predict`` and N ``search`` requests one after another, after 5 warm-up ones.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("RECO_SHARED_DATA", ROOT.parent / "shared" / "data")) / "flickr8k"
CLASSES = ["dog", "child", "bicycle", "water", "street", "snow", "beach", "ball"]


def manifest_of_distinct_images(out: Path, n: int) -> Path:
    rows, seen = [], set()
    with open(SHARED / "manifest.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["image"] not in seen:
                seen.add(row["image"])
                rows.append({"image": str(SHARED / row["image"]), "caption": row["caption"], "split": "train"})
            if len(rows) == n:
                break
    path = out / "manifest.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "caption", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def fresh_database(args: argparse.Namespace, folder: Path, tag: str) -> str:
    if args.sqlite:
        return f"sqlite:///{folder / f'{tag}.db'}"
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"reco_bench_{tag}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    args.created.append(name)
    return make_url(args.postgres).set(database=name).render_as_string(hide_password=False)


def env_for(args: argparse.Namespace, data_dir: Path, database_url: str) -> dict[str, str]:
    return {"RECO_DATA_DIR": str(data_dir), "RECO_DATABASE_URL": database_url, "RECO_BROKER_URL": args.broker,
            "RECO_ALLOWED_ROOTS": json.dumps([str(SHARED)]), "RECO_DECODE_WORKERS": str(args.decode_workers),
            "RECO_EMBED_MAX_BATCH": str(args.batch), "RECO_INGEST_BATCH_SIZE": str(args.batch),
            "RECO_K_INFER": "10", "HF_HUB_OFFLINE": "1", "RECO_BROKER_KEY_PREFIX": f"bench{uuid.uuid4().hex[:8]}:"}


def settings_for(env: dict[str, str]) -> Any:
    os.environ.update(env)
    from app.config import get_settings

    return get_settings()


def spawn(
    args_: list[str], env: dict[str, str], log: Path, ready: str, timeout_s: float = 180
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-c", "from app.cli import main; main()", *args_]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ | env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while ready not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{args_} did not become ready:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def bench_in_process(manifest: Path, settings: Any, n: int) -> dict[str, Any]:
    from app.services.ingest import IngestService, prepare_storage
    from ingestion.pipeline import ingest_source

    prepare_storage(settings)
    service = IngestService(settings)
    service.encoder.encode_texts(["warm-up"])
    started = time.perf_counter()
    summary = ingest_source(manifest, settings, service=service, progress=False)
    seconds = time.perf_counter() - started
    assert summary["ingested"] == n, summary
    from app.memory.qdrant import close_qdrant_clients

    close_qdrant_clients()
    return {"seconds": round(seconds, 2), "items_per_s": round(n / seconds, 1)}


def bench_async(manifest: Path, settings: Any, env: dict[str, str], logs: Path, n: int) -> dict[str, Any]:
    from app.db.session import upgrade_database
    from app.services.ingest_ledger import IngestLedger
    from ingestion.dispatch import dispatch_source, wait_for_job
    from workers.celery_app import create_celery_app
    from workers.client import CeleryTaskSender

    upgrade_database(settings.resolved_database_url)
    worker = spawn(["worker", "--queues", "embed,maintenance", "--concurrency", "1", "--loglevel", "info"], env,
                   logs / "embed.log", "embed worker warm")
    try:
        started = time.perf_counter()
        job = dispatch_source(manifest, settings, CeleryTaskSender(create_celery_app(settings)), progress=False)
        enqueued = time.perf_counter() - started
        done = wait_for_job(IngestLedger.from_url(settings.resolved_database_url), job["job_id"], poll_s=0.05)
        seconds = time.perf_counter() - started
    finally:
        stop(worker)
    assert done["ingested"] == n and done["failed"] == 0, done
    batches = (logs / "embed.log").read_text().count("embed batch:")
    return {"seconds": round(seconds, 2), "items_per_s": round(n / seconds, 1), "enqueue_s": round(enqueued, 2),
            "batches": batches, "mean_batch": round(n / max(1, batches), 1)}


def bench_refine(settings: Any, env: dict[str, str], logs: Path, manifest: Path, requests: int) -> dict[str, Any]:
    import numpy as np

    from api.process import start_server, stop_server
    from app.memory.store import close_stores
    from app.services.ingest import IngestService
    from app.services.train import TrainRequest, run_training
    from workers.celery_app import create_celery_app
    from workers.client import RefineClient

    service = IngestService(settings)
    run_training(settings, TrainRequest(dataset=manifest.parent.name, split="train", epochs=1, batch_size=256,
                                        progress=False), encoder=service.encoder, memory=service.memory)
    close_stores()  # reco serve owns the memory from here on; the refine worker reaches it through it
    with (logs / "serve.log").open("wb") as serve_log:
        server, _ = start_server(settings, port=0, log=serve_log, env=env)
    worker = spawn(["worker", "--queues", "refine", "--concurrency", "1", "--loglevel", "info"], env,
                   logs / "refine.log", " ready.")
    client = RefineClient(create_celery_app(settings), timeout_s=120)
    images = [Path(r["image"]).read_bytes() for r in csv.DictReader(open(manifest, newline="", encoding="utf-8"))]
    try:
        for n in range(5):
            client.predict(images[n], CLASSES)
            client.search({"text": "a dog"}, mode="text")
        client.stats(reset=True)
        round_trips: dict[str, list[float]] = {"predict": [], "search": []}
        for n in range(requests):
            t = time.perf_counter()
            answer = client.predict(images[n % len(images)], CLASSES, mode="both")
            round_trips["predict"].append(time.perf_counter() - t)
            assert answer["reco"] is not None, answer
            t = time.perf_counter()
            client.search({"text": f"a dog runs on the beach {n}"}, mode="text", k=10)
            round_trips["search"].append(time.perf_counter() - t)
        stats = client.stats()
    finally:
        stop(worker)
        stop_server(server)
    client_side = {k: {"p50_ms": round(float(np.percentile(v, 50)) * 1000, 1),
                       "p99_ms": round(float(np.percentile(v, 99)) * 1000, 1)} for k, v in round_trips.items()}
    worker_side = {k: {"p50_ms": round(v["p50_ms"], 1), "p99_ms": round(v["p99_ms"], 1), "n": v["n"]}
                   for k, v in stats["latency"].items()}
    return {"worker_side": worker_side, "round_trip": client_side, "memory": stats.get("memory"),
            "k": settings.k_infer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="Flickr8k images (one caption each)")
    parser.add_argument("--requests", type=int, default=100, help="predict and search requests each")
    parser.add_argument("--batch", type=int, default=64, help="embed micro-batch and in-process batch size")
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/11")
    parser.add_argument("--postgres", default=os.environ.get("RECO_TEST_POSTGRES_URL",
                                                             "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--sqlite", action="store_true", help="SQLite files instead of PostgreSQL")
    parser.add_argument("--json-out", type=Path, default=ROOT / "test-artifacts" / "bench_workers.json")
    args = parser.parse_args()
    args.created = []
    result: dict[str, Any] = {"n": args.n, "batch": args.batch, "decode_workers": args.decode_workers,
                              "cpus": os.cpu_count(), "database": "sqlite" if args.sqlite else "postgresql"}
    with tempfile.TemporaryDirectory(prefix="reco-bench-") as tmp:
        root = Path(tmp)
        bench_dir = root / "flickr-bench"
        bench_dir.mkdir()
        manifest = manifest_of_distinct_images(bench_dir, args.n)
        try:
            env_a = env_for(args, root / "inproc", fresh_database(args, root, "inproc"))
            result["in_process"] = bench_in_process(manifest, settings_for(env_a), args.n)
            env_b = env_for(args, root / "async", fresh_database(args, root, "async"))
            settings_b = settings_for(env_b)
            result["async"] = bench_async(manifest, settings_b, env_b, root, args.n)
            result["speedup"] = round(result["async"]["items_per_s"] / result["in_process"]["items_per_s"], 2)
            result["refine"] = bench_refine(settings_b, env_b, root, manifest, args.requests)
            import torch

            result["device"] = "cuda" if torch.cuda.is_available() else "cpu"
            result["encoder"] = f"{settings_b.clip_model}/{settings_b.clip_pretrained or 'random'}"
        finally:
            drop_databases(args)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def drop_databases(args: argparse.Namespace) -> None:
    if not args.created:
        return
    from sqlalchemy import create_engine, text

    from app.db.session import get_engine

    get_engine.cache_clear()
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in args.created:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
