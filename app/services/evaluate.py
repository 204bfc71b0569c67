"""``reco eval``: zero-shot and retrieval evaluation of CLIP and each RECO mode on a manifest.

Evaluation images are read from the manifest (safe decoding), encoded once; the memory is exported
from Qdrant into the exact index; near-duplicates of the evaluation images are removed from it
(content hash + image-embedding cosine) and counted; then every mode is scored. The report is the
JSON of :class:`~app.evaluation.report.EvalReport` and is stored as evaluation runs in the DB.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from app.config import Settings
from app.db.factory import SessionFactory
from app.db.runs import store_eval_run
from app.encoder import Encoder, create_encoder
from app.evaluation import EvalReport, ResultRow, evaluate_retrieval, evaluate_zeroshot, remove_near_duplicates
from app.fusion.checkpoint import load_checkpoint
from app.imaging import ImageLimits, ImageRejected, open_image_safely, read_image_file
from app.manifest import ManifestError, load_classes, read_manifest
from app.memory.base import VectorMemory
from app.memory.exact import ExactIndex
from app.refine import Refiner, mean_fusion_refiner
from app.retrieval import RetrievalCfg
from app.schemas import RefineMode
from app.services.method_common import (
    MethodError,
    checkpoint_label,
    exact_index,
    load_matrices,
    memory_for_encoder,
    resolve_checkpoint,
    resolve_device,
    session_factory_for,
)
from app.synthetic import SyntheticCfg, SyntheticWorld, evaluate_synthetic
from app.zeroshot import ClassEmbeddingCache, ZeroShotClassifier

log = logging.getLogger(__name__)
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")


class EvalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="Manifest file or folder, a dataset name under the data dirs, or 'synthetic'.")
    split: str | None = "test"
    task: Literal["auto", "zeroshot", "retrieval"] = "auto"
    modes: list[RefineMode] = Field(default_factory=lambda: list(RefineMode))
    k: int | None = Field(default=None, ge=1, description="k' (neighbours at inference); default RECO_K_INFER.")
    memory_filters: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Path | None = None
    fusion: Literal["trained", "mean"] = "trained"
    search_modality: Literal["uni", "cross"] | None = None
    fusion_modality: Literal["cross", "uni"] | None = None
    dedupe: bool | None = None
    near_duplicate_threshold: float | None = None
    templates: str | None = None
    limit: int | None = Field(default=None, ge=1, description="Evaluate the first N images only.")
    seed: int | None = None
    store: bool = True
    progress: bool = True


@dataclass
class EvalSet:
    name: str
    image_emb: np.ndarray
    image_hashes: list[str]
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    text_emb: np.ndarray | None = None
    image_of_text: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)


def resolve_manifest(settings: Settings, dataset: str) -> Path:
    """A manifest file, a folder holding one, or a dataset name under the shared or own data dir."""
    candidates = [Path(dataset).expanduser()]
    candidates += [root / dataset for root in (settings.shared_data, settings.data_dir / "datasets", settings.data_dir)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
        for name in MANIFEST_NAMES:
            if (candidate / name).is_file():
                return candidate / name
    raise MethodError(f"no manifest for {dataset!r} (looked at {', '.join(str(c) for c in candidates)})")


def _decoded(rows: Sequence[Any], limits: ImageLimits, skipped: list[str]) -> Iterator[tuple[Any, Any, str]]:
    for row in rows:
        try:
            data = read_image_file(row.path, limits.max_bytes)  # a regular file, at most the cap, never blocks
            yield row, open_image_safely(data, limits), hashlib.sha256(data).hexdigest()
        except (OSError, ImageRejected) as exc:
            skipped.append(f"{row.source}: {exc}")


def load_eval_set(
    settings: Settings, manifest: Path, split: str | None, encoder: Encoder, *, limit: int | None, progress: bool
) -> EvalSet:
    """Images of one split, one row per image; captions grouped per image (Flickr8k has five)."""
    per_image: dict[Path, list[Any]] = {}
    skipped: list[str] = []
    for row in read_manifest(manifest, allowed_roots=settings.allowed_roots):
        if row.problem is not None or row.path is None:
            skipped.append(f"{row.source}: {row.problem}")
        elif split is None or row.split == split:
            per_image.setdefault(row.path, []).append(row)
    groups = list(per_image.values())[:limit]
    embeddings, hashes, kept = [], [], []
    batch = max(1, settings.encode_batch_size)
    decoded = _decoded([g[0] for g in groups], ImageLimits.from_settings(settings), skipped)
    with tqdm(total=len(groups), desc="encode images", unit="img", disable=not progress) as bar:
        while chunk := [item for _, item in zip(range(batch), decoded, strict=False)]:
            embeddings.append(encoder.encode_images([image for _, image, _ in chunk]))
            hashes += [digest for *_, digest in chunk]
            kept += [per_image[row.path] for row, _, _ in chunk]
            bar.update(len(chunk))
    if not kept:
        raise MethodError(f"no usable images in {manifest} (split {split})")
    out = EvalSet(manifest.parent.name, np.concatenate(embeddings), hashes, skipped=skipped)
    _attach_labels(out, manifest, kept)
    _attach_captions(out, kept, encoder)
    return out


def _attach_labels(out: EvalSet, manifest: Path, groups: list[list[Any]]) -> None:
    classes_file = manifest.parent / "classes.txt"
    labels = [g[0].label for g in groups]
    if classes_file.is_file() and all(label is not None for label in labels):
        out.class_names = load_classes(classes_file)
        out.labels = np.asarray(labels, np.int64)


def _attach_captions(out: EvalSet, groups: list[list[Any]], encoder: Encoder) -> None:
    captions = [(i, row.caption) for i, g in enumerate(groups) for row in g if row.caption.strip()]
    if captions:
        out.text_emb = encoder.encode_texts([c for _, c in captions])
        out.image_of_text = np.asarray([i for i, _ in captions], np.int64)


def _retrieval_cfg(settings: Settings, request: EvalRequest, trained: RetrievalCfg | None) -> RetrievalCfg:
    base = trained or RetrievalCfg.from_settings(settings)
    return RetrievalCfg(request.search_modality or base.search, request.fusion_modality or base.fusion,
                        base.dedupe_by_image if request.dedupe is None else request.dedupe)


def _refiner(
    settings: Settings, request: EvalRequest, encoder_id: str, index: ExactIndex, factory: SessionFactory
) -> tuple[Refiner | None, str | None, int | None]:
    """The fusion to evaluate: a checkpoint, the mean-fusion baseline, or none (CLIP only)."""
    k = request.k or settings.k_infer
    if request.fusion == "mean":
        retrieval = _retrieval_cfg(settings, request, None)
        return mean_fusion_refiner(index, index.dim, k=k, retrieval=retrieval), "mean-fusion", None
    if all(RefineMode(m) is RefineMode.CLIP for m in request.modes):
        return None, None, None
    path, record = resolve_checkpoint(settings, encoder_id, request.checkpoint, factory)
    device = resolve_device(settings)
    model, meta = load_checkpoint(path, expected_sha256=record.sha256 if record else None, device=device)
    if meta.encoder_id != encoder_id:
        raise MethodError(f"checkpoint {path} was trained for {meta.encoder_id}, the encoder is {encoder_id}")
    retrieval = _retrieval_cfg(settings, request, RetrievalCfg.from_dict(meta.options.get("retrieval", {})))
    refiner = Refiner(model, index, k=k, retrieval=retrieval, device=device, calibration=meta.calibration)
    return refiner, checkpoint_label(path, record), record.id if record else None


def _score(settings: Settings, request: EvalRequest, data: EvalSet, refiner: Refiner | None,
           encoder: Encoder, checkpoint: str | None) -> list[ResultRow]:
    rows: list[ResultRow] = []
    do_zeroshot = request.task in ("auto", "zeroshot") and data.labels is not None
    do_retrieval = request.task in ("auto", "retrieval") and data.text_emb is not None
    if not (do_zeroshot or do_retrieval):
        raise MethodError(f"{data.name}: nothing to evaluate for task {request.task} (labels + classes.txt for "
                          "zero-shot, captions for retrieval)")
    if do_zeroshot:
        assert data.class_names is not None and data.labels is not None
        cache = ClassEmbeddingCache(settings.data_dir / "cache" / "zeroshot")
        classifier = ZeroShotClassifier(data.class_names, encoder, templates=request.templates, refiner=refiner,
                                        checkpoint_id=checkpoint or "none", cache=cache)
        rows += evaluate_zeroshot(data.name, data.image_emb, data.labels, classifier, request.modes)
    if do_retrieval:
        assert data.text_emb is not None and data.image_of_text is not None
        rows += evaluate_retrieval(data.name, data.image_emb, data.text_emb, data.image_of_text, refiner,
                                   request.modes)
    return rows


def run_evaluation(
    settings: Settings,
    request: EvalRequest,
    *,
    encoder: Encoder | None = None,
    memory: VectorMemory | None = None,
    session_factory: SessionFactory | None = None,
) -> EvalReport:
    if request.dataset == "synthetic":
        return run_synthetic_evaluation(settings, request, session_factory=session_factory)
    encoder = encoder or create_encoder(settings)
    factory = session_factory or session_factory_for(settings)
    try:
        data = load_eval_set(settings, resolve_manifest(settings, request.dataset), request.split, encoder,
                             limit=request.limit, progress=request.progress)
    except ManifestError as exc:
        raise MethodError(str(exc)) from exc
    memory = memory or memory_for_encoder(settings, encoder.encoder_id)
    full = exact_index(settings, load_matrices(settings, memory, request.memory_filters or None))
    removal = remove_near_duplicates(full, data.image_emb, data.image_hashes,
                                     threshold=request.near_duplicate_threshold or settings.near_duplicate_threshold)
    log.info("removed %d near-duplicate memory rows (threshold %.4f)", removal.removed, removal.threshold)
    refiner, checkpoint, checkpoint_id = _refiner(settings, request, encoder.encoder_id, removal.index, factory)
    rows = _score(settings, request, data, refiner, encoder, checkpoint)
    report = EvalReport(results=rows, memory_size=len(removal.index), k=request.k or settings.k_infer,
                        encoder_id=encoder.encoder_id, checkpoint=checkpoint,
                        near_duplicates_removed=removal.removed)
    if request.store:
        options = {**request.model_dump(mode="json"), "near_duplicate_threshold_used": removal.threshold,
                   "skipped_inputs": len(data.skipped)}
        store_eval_run(factory, report.to_json_dict(), checkpoint_id=checkpoint_id, options=options)
    return report


def run_synthetic_evaluation(
    settings: Settings, request: EvalRequest, *, session_factory: SessionFactory | None = None
) -> EvalReport:
    """The synthetic world: CLIP, each RECO mode, mean fusion and a shuffled-caption memory."""
    world = SyntheticWorld(SyntheticCfg(seed=request.seed or 0))
    factory = session_factory or session_factory_for(settings)
    path, record = resolve_checkpoint(settings, world.encoder_id, request.checkpoint, factory)
    model, meta = load_checkpoint(path, expected_sha256=record.sha256 if record else None)
    if meta.encoder_id != world.encoder_id:
        raise MethodError(f"checkpoint {path} was trained for {meta.encoder_id}, not the synthetic world")
    retrieval = _retrieval_cfg(settings, request, RetrievalCfg.from_dict(meta.options.get("retrieval", {})))
    report = evaluate_synthetic(world, model, k=request.k or settings.k_infer, retrieval=retrieval,
                                templates=request.templates, checkpoint=checkpoint_label(path, record))
    if request.store:
        store_eval_run(factory, report.to_json_dict(), checkpoint_id=record.id if record else None,
                       options=request.model_dump(mode="json"))
    return report
