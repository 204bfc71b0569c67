"""``reco bench refine``: image bytes to top-5 classes, CLIP against RECO, through ``predict_image``.

Both go through the prediction service (:func:`app.services.predict.predict_image`): safe decode,
encode (one image, ViT-B-32), then CLIP scores against the cached class embeddings; RECO (mode
``both``) adds the image's retrieval from the memory and the fusion, against cached refined class
embeddings. The memory (``memory``) is what serving uses, a Qdrant Edge collection (HNSW) of ``memory_size``
embedding-like pairs (:mod:`programs.bench.embedding_memory`; the base encoder's embeddings, randomly projected to
the timed encoder's dimension when they differ), beside the exact index of the same rows; or, with
``memory="exact"``, exact indexes of synthetic pairs in both storage types (random unit vectors: exact cost
does not depend on their meaning). The fusion checkpoint is randomly initialised (speed only). Class
embeddings are computed before timing (they are cached per class set in production too). Requests
alternate CLIP/RECO image by image, so both see the same machine state.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from app.config import Settings, get_settings
from app.encoder.openclip import OpenClipEncoder
from app.memory.base import ItemPayload
from app.memory.exact import ExactIndex, StorageDtype
from app.schemas import RefineMode
from programs.bench.common import load_average, machine_info, percentile_ms, unit_vectors
from programs.bench.ingest import build_encoder, first_images
from programs.bench.memory_files import synthetic_hash, synthetic_id

FALLBACK_CLASSES = [f"class {i}" for i in range(10)]


class RefineBenchResult(BaseModel):
    """The issue's JSON contract (overhead = reco / clip - 1 at the median); details stay out of the dump."""

    memory_size: int
    clip_p50_ms: float
    reco_p50_ms: float
    clip_p99_ms: float
    reco_p99_ms: float
    overhead: float
    # class-set preparation (cold cache, mode both: CLIP's and the refined prompt embeddings, batched)
    class_set_1000_labels_s: float | None = None
    cub100_first_prediction_s: float | None = None
    details: dict[str, Any] = Field(default_factory=dict, exclude=True)


def synthetic_index(size: int, dim: int, dtype: StorageDtype, seed: int = 0) -> ExactIndex:
    ids = [synthetic_id(r) for r in range(size)]
    hashes = [synthetic_hash(r) for r in range(size)]
    payloads = [ItemPayload(item_id=i, image_hash=h, caption=f"synthetic caption {r}", dataset="synthetic")
                for r, (i, h) in enumerate(zip(ids, hashes, strict=True))]
    return ExactIndex(ids, unit_vectors(size, dim, seed), unit_vectors(size, dim, seed + 1), hashes,
                      payloads=payloads, dtype=dtype, normalise=False, version=f"synthetic:{size}:{dtype}")


def register_random_fusion(settings: Settings, encoder: OpenClipEncoder, index: Any) -> Path:
    """A seeded, untrained fusion checkpoint registered as the newest for this encoder."""
    from app.db.runs import register_checkpoint
    from app.fusion.checkpoint import CheckpointMeta, save_checkpoint
    from app.fusion.config import get_fusion_config
    from app.fusion.model import RecoFusion
    from app.services.method_common import session_factory_for

    version = str(getattr(index, "version", None) or getattr(index, "collection", "bench"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = RecoFusion(get_fusion_config(settings.fusion_config), encoder.dim)
    meta = CheckpointMeta(config=model.cfg.to_dict(), dim=encoder.dim, encoder_id=encoder.encoder_id,
                          memory_version=version, metrics={"note": "random init, speed benchmark only"})
    path = settings.data_dir / "fusion-random.safetensors"
    sha = save_checkpoint(path, model, meta)
    register_checkpoint(session_factory_for(settings), path=str(path), sha256=sha, encoder_id=encoder.encoder_id,
                        memory_version=version, config=model.cfg.to_dict(), metrics=meta.metrics)
    return path


def _classes(settings: Settings) -> list[str]:
    path = settings.shared_data / "imagenette" / "classes.txt"
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    return names or FALLBACK_CLASSES


def run_refine_bench(
    images: Path,
    *,
    memory_size: int = 100_000,
    n_images: int = 40,
    model: str = "ViT-B-32",
    dtype: StorageDtype = "float32",
    k: int = 10,
    threads: int | None = 1,
    encoder: OpenClipEncoder | None = None,
    workdir: Path | None = None,
    memory: str = "edge",
    class_sets: bool = True,
) -> RefineBenchResult:
    """CLIP vs RECO per image, interleaved; RECO over ``dtype`` (contract) and the other storage (details).

    ``threads``: torch intra-op threads while timing. One request at a time is what a refine worker
    serves; on the shared 2-core VM two OpenMP threads per tiny batch-1 op wait on each other (a
    single-image encode took 1.8 s with 2 threads, 0.15 s with 1, same load), so 1 is the default.
    """
    info = machine_info()
    previous_threads = torch.get_num_threads()
    root = Path(tempfile.mkdtemp(prefix="reco-bench-refine-", dir=workdir))
    try:
        encoder = encoder or build_encoder(model, batch=1)
        if threads:
            torch.set_num_threads(threads)
        other: StorageDtype = "float16" if dtype == "float32" else "float32"
        if memory == "edge":
            indexes = _edge_and_exact(root, memory_size, encoder.dim)
            dtype, other = "edge", "float32"  # type: ignore[assignment]  # leg names: the contract's, then the other
        else:
            indexes = {d: synthetic_index(memory_size, encoder.dim, d) for d in (dtype, other)}
        blobs = [p.read_bytes() for p in first_images(images, n_images)]
        times = _timed_predictions(root, encoder, indexes, blobs, k)
        retrieval = {d: _retrieval_only(index, encoder, k) for d, index in indexes.items()}
        torch.set_num_threads(previous_threads)  # class sets are prepared as the serving service runs: all threads
        preparation = (class_set_preparation(root, encoder, indexes[dtype], blobs[0], k) if class_sets
                       else {})
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(root, ignore_errors=True)
    details = {"info": info, "dtype": dtype, "memory": memory, "k": k, "images": len(blobs),
               "threads": threads or previous_threads,
               "model": f"{encoder.model_name}/{encoder.pretrained or 'random'}",
               "retrieval_fusion_ms": retrieval, "other_dtype": other,
               "reco_other_dtype_p50_ms": percentile_ms(times[f"reco-{other}"], 50),
               "reco_other_dtype_p99_ms": percentile_ms(times[f"reco-{other}"], 99),
               "overhead_other_dtype": round(percentile_ms(times[f"reco-{other}"], 50)
                                             / percentile_ms(times["clip"], 50) - 1, 4)}
    result = _refine_result(times["clip"], times[f"reco-{dtype}"], memory_size, details | {
        "class_set_preparation": preparation})
    result.class_set_1000_labels_s = preparation.get("labels_1000_s")
    result.cub100_first_prediction_s = preparation.get("cub100_first_prediction_s")
    return result


def thousand_labels(settings: Settings, n: int = 1000) -> list[str]:
    """Class names of the shared datasets (CUB, Flowers, Imagenette, CIFAR-10, Clothing-10), padded to ``n``
    with "object N": a large typed class set."""
    names: list[str] = []
    for path in sorted(Path(settings.shared_data).glob("*/classes.txt")):
        names += [ln.strip().replace("_", " ") for ln in path.read_text().splitlines() if ln.strip()]
    names = list(dict.fromkeys(names))[:n]
    return names + [f"object {i}" for i in range(n - len(names))]


def class_set_preparation(root: Path, encoder: OpenClipEncoder, index: Any, image: bytes,
                          k: int) -> dict[str, Any]:
    """Cold-cache timings of what a first prediction against a new class set waits for: 1,000 typed labels
    prepared (mode both: the prompts encoded in batches, retrieved and fused in batches), and the first
    prediction against CUB-100 (its class embeddings included). The encoder batches the prompts as the
    serving service does (``RECO_ENCODE_BATCH_SIZE``)."""
    from app.services import predict as predict_module
    from app.services.method_common import session_factory_for
    from app.services.predict import PredictCaches, PredictRequest, predict_image
    from app.zeroshot import ZeroShotClassifier, resolve_templates

    settings = get_settings(data_dir=root / "class-sets", database_url=None, qdrant_url=None,
                            clip_model=encoder.model_name, clip_pretrained=encoder.pretrained, k_infer=k,
                            device=encoder.device.type)
    register_random_fusion(settings, encoder, index)
    factory = session_factory_for(settings)
    previous_batch = encoder.batch_size
    encoder.batch_size = settings.encode_batch_size
    out: dict[str, Any] = {"templates": len(resolve_templates(None)), "encode_batch_size": encoder.batch_size,
                           "memory_size": index.count(), "threads": torch.get_num_threads()}
    caches = PredictCaches()
    try:
        refiner, label = predict_module._load_refiner(
            settings, PredictRequest(image_bytes=b"", classes=["x"], k=k), encoder.encoder_id, index, factory,
            caches)
        assert refiner is not None
        labels = thousand_labels(settings)
        caches.forget_classes()
        start = time.perf_counter()
        for refined in (False, True):
            ZeroShotClassifier(labels, encoder, refiner=refiner if refined else None,
                               checkpoint_id=label or "none" if refined else "none",
                               cache=caches.class_cache(settings)).class_embeddings(
                RefineMode.TEXT if refined else RefineMode.CLIP)
        out["labels_1000_s"] = round(time.perf_counter() - start, 3)
        cub = Path(settings.shared_data) / "cub100" / "classes.txt"
        if cub.is_file():
            classes = [ln.strip() for ln in cub.read_text().splitlines() if ln.strip()]
            caches.forget_classes()
            start = time.perf_counter()
            for mode in (RefineMode.CLIP, RefineMode.BOTH):  # what the serving service runs for one image
                predict_image(settings, PredictRequest(image_bytes=image, classes=classes, mode=mode, k=k),
                              encoder=encoder, memory=index, session_factory=factory, caches=caches)
            out["cub100_first_prediction_s"] = round(time.perf_counter() - start, 3)
            out["cub100_classes"] = len(classes)
    finally:
        encoder.batch_size = previous_batch
        caches.forget_classes()
    return out


def _edge_and_exact(root: Path, size: int, dim: int) -> dict[str, Any]:
    """{"edge": an indexed Edge collection, "float32": the exact index} of the same embedding-like rows."""
    from app.memory.edge import EdgeStore
    from app.memory.layout import MemoryLayout
    from programs.bench.child import fill_edge
    from programs.bench.embedding_memory import write_embedding_memories
    from programs.bench.memory_files import memory_folder
    from programs.bench.search import _embedding_pairs

    settings = get_settings()
    pairs = _embedding_pairs(settings, settings.shared_data)
    source_dim = np.asarray(pairs["image"]).shape[1]
    if source_dim != dim:
        # the base encoder (384-d) vs the timed encoder (ViT-B-32, 512-d): a fixed random projection keeps the
        # real embeddings' cosine structure (Johnson-Lindenstrauss) at the dimension the fusion expects
        projection = np.random.default_rng(0).standard_normal((source_dim, dim)).astype(np.float32)
        for side in ("image", "text"):
            moved = np.asarray(pairs[side], np.float32) @ projection
            pairs[side] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
    write_embedding_memories(root / "rows", [size], pairs)
    folder = memory_folder(root / "rows", size, "float32")
    store = EdgeStore(root / "edge", MemoryLayout(indexing_threshold=1, min_free_mb=0))
    edge = store.ensure_collection("bench", dim)
    fill_edge(edge, folder)
    store.index_pending(force=True)
    return {"edge": edge, "float32": ExactIndex.load(folder, mmap=True)}


def _timed_predictions(
    root: Path, encoder: OpenClipEncoder, indexes: dict[str, Any], blobs: list[bytes], k: int
) -> dict[str, list[float]]:
    """Per image, in rotating order: CLIP, then RECO over each index (seconds per request)."""
    from app.services.method_common import session_factory_for
    from app.services.predict import PredictCaches, PredictRequest, predict_image

    settings = get_settings(data_dir=root, database_url=None, qdrant_url=None, clip_model=encoder.model_name,
                            clip_pretrained=encoder.pretrained, k_infer=k, device=encoder.device.type)
    register_random_fusion(settings, encoder, indexes[next(iter(indexes))])
    factory = session_factory_for(settings)
    caches = PredictCaches()  # kept across the calls, as the serving service keeps its own
    classes = _classes(settings)
    legs: list[tuple[str, RefineMode, Any]] = [("clip", RefineMode.CLIP, None)]
    legs += [(f"reco-{d}", RefineMode.BOTH, index) for d, index in indexes.items()]

    def predict(data: bytes, mode: RefineMode, memory: Any) -> float:
        request = PredictRequest(image_bytes=data, classes=classes, mode=mode, top=5, k=k)
        start = time.perf_counter()
        predict_image(settings, request, encoder=encoder, memory=memory, session_factory=factory, caches=caches)
        return time.perf_counter() - start

    for _, mode, memory in legs:  # untimed: class embeddings and the fusion model get cached
        predict(blobs[0], mode, memory)
    times: dict[str, list[float]] = {name: [] for name, _, _ in legs}
    for i, data in enumerate(blobs):
        for name, mode, memory in legs[i % len(legs):] + legs[: i % len(legs)]:
            times[name].append(predict(data, mode, memory))
    return times


def _retrieval_only(index: Any, encoder: OpenClipEncoder, k: int, n: int = 20) -> dict[str, float]:
    """The part RECO adds, alone: neighbours of one image embedding from the index, then the fusion."""
    from app.fusion.config import get_fusion_config
    from app.fusion.model import RecoFusion
    from app.refine import Refiner

    refiner = Refiner(RecoFusion(get_fusion_config("reco-fusion-b"), encoder.dim), index, k=k)
    vectors = unit_vectors(n, encoder.dim, 99)
    refiner.refine_image(vectors[0])
    spent: list[float] = []
    for v in vectors:
        start = time.perf_counter()
        refiner.refine_image(v)
        spent.append(time.perf_counter() - start)
    return {"p50_ms": percentile_ms(spent, 50), "p99_ms": percentile_ms(spent, 99)}


def _refine_result(
    clip: list[float], reco: list[float], memory_size: int, details: dict[str, Any]
) -> RefineBenchResult:
    clip_p50, reco_p50 = percentile_ms(clip, 50), percentile_ms(reco, 50)
    details |= {"clip_mean_ms": round(float(np.mean(clip)) * 1e3, 3),
                "reco_mean_ms": round(float(np.mean(reco)) * 1e3, 3),
                "overhead_mean": round(float(np.mean(reco) / np.mean(clip) - 1), 4), "load_avg_end": load_average(),
                "reco_mode": "both"}
    return RefineBenchResult(memory_size=memory_size, clip_p50_ms=clip_p50, reco_p50_ms=reco_p50,
                             clip_p99_ms=percentile_ms(clip, 99), reco_p99_ms=percentile_ms(reco, 99),
                             overhead=round(reco_p50 / clip_p50 - 1, 4), details=details)
