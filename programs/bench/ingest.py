"""``reco bench ingest``: the full ingest pipeline against encoder-only, same run, same images.

- encoder-only: every image decoded and preprocessed into one tensor first (untimed), then
  ``encode_images`` in batches (timed); when the items carry captions (``<image>.txt`` beside it), their
  distinct captions are encoded too (tokenising included: it is ~0.1 ms a caption), since the pipeline
  encodes both.
- pipeline: ``ingest_source`` on the folder: read, decode, hash, preprocess, encode, Qdrant upsert
  (local mode on disk, the embedded default), SQLite metadata and statuses (timed, model load excluded
  as for encoder-only: both share one loaded encoder, warmed once).

The images are split into ``rounds`` parts (4 by default: ~40 s legs, so a change of load on the shared
machine hits both); each round runs both legs on one part, alternating which goes first. The pipeline
itself is ``ingestion.pipeline.ingest_source`` (this program sits above ``ingestion``), or one passed in by
the caller.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from pydantic import BaseModel, Field

from app.config import Settings, get_settings
from app.encoder.openclip import OpenClipEncoder
from app.imaging import ImageLimits, open_image_safely
from programs.bench.common import load_average, machine_info

IngestPipeline = Callable[..., dict[str, Any]]  # ingestion.pipeline.ingest_source
IMAGE_SUFFIXES = (".jpg", ".jpeg")


class BenchError(RuntimeError):
    """A benchmark cannot run here (missing images, pipeline, peer)."""


class IngestBenchResult(BaseModel):
    """The issue's JSON contract; ``details`` (rounds, machine, load) is kept out of ``model_dump``."""

    n: int
    encoder_only_img_s: float
    pipeline_img_s: float
    ratio: float
    model: str
    device: str
    details: dict[str, Any] = Field(default_factory=dict, exclude=True)


def load_ingest_pipeline() -> IngestPipeline:
    """``ingestion.pipeline.ingest_source``, imported when a benchmark needs it (it loads the ingestion stack)."""
    from ingestion.pipeline import ingest_source

    return cast(IngestPipeline, ingest_source)


def first_images(folder: Path, n: int) -> list[Path]:
    """The first ``n`` JPEGs of ``folder`` sorted by name (as the peer's benchmark takes them)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < n:
        raise BenchError(f"{folder} holds {len(files)} JPEGs, {n} wanted")
    return files[:n]


def stage_images(files: Sequence[Path], root: Path, parts: int) -> list[Path]:
    """Copies of ``files`` in ``parts`` folders (with their caption sidecars, if any)."""
    folders = [root / f"part{i}" for i in range(parts)]
    bounds = np.linspace(0, len(files), parts + 1).round().astype(int)  # contiguous, near-equal parts
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        for f in files[bounds[i]: bounds[i + 1]]:
            shutil.copyfile(f, folder / f.name)
            sidecar = f.with_suffix(".txt")
            if sidecar.is_file():
                shutil.copyfile(sidecar, folder / sidecar.name)
    return folders


def build_encoder(model: str, pretrained: str = "", device: str = "auto", batch: int = 64,
                  precision: str = "auto") -> OpenClipEncoder:
    """CUDA when a GPU is visible, else CPU, with the project's defaults (app/encoder/runtime.py: fp16 on
    CUDA); loaded and warmed (untimed)."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    encoder = OpenClipEncoder(model, pretrained, device="cuda" if use_cuda else "cpu", precision=precision,
                              batch_size=batch)
    size = encoder.image_size
    encoder.encode_images(torch.zeros(min(batch, 8), 3, size, size))
    return encoder


def _captions(files: Sequence[Path]) -> list[str]:
    texts = [" ".join(f.with_suffix(".txt").read_text(errors="replace").split()) if f.with_suffix(".txt").is_file()
             else "" for f in files]
    return [t for t in dict.fromkeys(texts) if t]


def encoder_only_seconds(
    encoder: OpenClipEncoder, folder: Path, limits: ImageLimits
) -> tuple[float, int, float, float]:
    """(timed encode seconds, images, untimed decode+preprocess seconds, process CPU seconds of the encode)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    start = time.perf_counter()
    pixels = torch.stack([encoder.preprocess(open_image_safely(f.read_bytes(), limits)) for f in files])
    captions = _captions(files)
    prepare_s = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    encoder.encode_images(pixels)
    if captions:
        encoder.encode_texts(captions)
    return time.perf_counter() - start, len(files), prepare_s, time.process_time() - cpu


def pipeline_settings(data_dir: Path, encoder: OpenClipEncoder, batch: int, **overrides: Any) -> Settings:
    """The embedded defaults (Qdrant local mode on disk, SQLite) in a scratch folder; images-only allowed."""
    values: dict[str, Any] = {
        "data_dir": data_dir, "database_url": None, "qdrant_url": None, "memory_path": None,
        "clip_model": encoder.model_name, "clip_pretrained": encoder.pretrained, "require_caption": False,
        "ingest_batch_size": batch, "encode_batch_size": batch, "device": encoder.device.type,
        "precision": encoder.precision,
    }
    return get_settings(**(values | overrides))


def run_ingest_bench(
    images: Path,
    n: int = 1000,
    *,
    model: str = "ViT-B-32",
    pretrained: str = "",
    batch: int = 64,
    rounds: int = 4,
    pipeline: IngestPipeline | None = None,
    encoder: OpenClipEncoder | None = None,
    workdir: Path | None = None,
) -> IngestBenchResult:
    """Encoder-only vs the full pipeline on the first ``n`` images of ``images``, interleaved by round."""
    from app.services.ingest import IngestService, prepare_storage

    pipeline = pipeline or load_ingest_pipeline()
    files = first_images(images, n)
    info = machine_info()
    root = Path(tempfile.mkdtemp(prefix="reco-bench-ingest-", dir=workdir))
    try:
        parts = stage_images(files, root / "images", max(1, min(rounds, n)))
        encoder = encoder or build_encoder(model, pretrained, batch=batch)
        settings = pipeline_settings(root / "data", encoder, batch)
        prepare_storage(settings)
        service = IngestService(settings, encoder=encoder)
        limits = ImageLimits.from_settings(settings)
        rows: list[dict[str, Any]] = []
        for i, part in enumerate(parts):
            legs: dict[str, Any] = {"round": i, "load_avg_1m": load_average()[:1]}
            order = ("encoder", "pipeline") if i % 2 == 0 else ("pipeline", "encoder")
            for leg in order:
                if leg == "encoder":
                    timed = encoder_only_seconds(encoder, part, limits)
                    legs["encoder_s"], legs["images"], legs["prepare_s"], legs["encoder_cpu_s"] = timed
                else:
                    start, cpu = time.perf_counter(), time.process_time()
                    summary = pipeline(part, settings, service=service, progress=False)
                    legs["pipeline_s"], legs["pipeline_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
                    legs["ingested"], legs["failed"] = summary["ingested"], summary["failed"]
            rows.append(legs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return _ingest_result(rows, encoder, info, images, batch, captions=bool(_captions(files)))


def _ingest_result(
    rows: list[dict[str, Any]], encoder: OpenClipEncoder, info: dict[str, Any], images: Path, batch: int,
    *, captions: bool,
) -> IngestBenchResult:
    total = sum(r["images"] for r in rows)
    encoder_s = sum(r["encoder_s"] for r in rows)
    pipeline_s = sum(r["pipeline_s"] for r in rows)
    failed = sum(r["failed"] for r in rows)
    if failed:
        raise BenchError(f"the pipeline refused {failed} of {total} images; the comparison would be unfair")
    enc_rate, pipe_rate = total / encoder_s, total / pipeline_s
    enc_cpu, pipe_cpu = sum(r["encoder_cpu_s"] for r in rows), sum(r["pipeline_cpu_s"] for r in rows)
    details = {
        # On a shared, oversubscribed machine a process with more runnable threads gets more CPU: CPU time
        # per image says how much work each leg does, independent of the share it got.
        "encoder_cpu_ms_per_img": round(enc_cpu / total * 1e3, 1),
        "pipeline_cpu_ms_per_img": round(pipe_cpu / total * 1e3, 1),
        "cpu_ratio": round(enc_cpu / pipe_cpu, 4),
        "images_dir": str(images), "batch": batch, "rounds": rows, "machine": info,
        "load_avg_end": load_average(), "captions": captions, "random_weights": encoder.is_random,
        "encoder_s": round(encoder_s, 3), "pipeline_s": round(pipeline_s, 3),
    }
    return IngestBenchResult(
        n=total, encoder_only_img_s=round(enc_rate, 3), pipeline_img_s=round(pipe_rate, 3),
        ratio=round(pipe_rate / enc_rate, 4), model=f"{encoder.model_name}/{encoder.pretrained or 'random'}",
        device=f"{encoder.device.type}/{encoder.runtime.label}", details=details)
