"""``reco train``: train the fusion on pairs from the memory, write and register a checkpoint.

Training pairs and the memory both come from the Qdrant collection of the configured encoder
(embeddings computed once at ingestion): pairs = the rows with ``dataset``/``split`` (default
Flickr8k train), memory = every row or those matching ``memory_filters``. When the pairs are also in
the memory (the default) each pair's own item and every row of its image are excluded from its
neighbours. ``dataset="synthetic"`` trains on the synthetic world instead (seconds on CPU).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.config import Settings
from app.db.factory import SessionFactory
from app.db.runs import register_checkpoint
from app.encoder import Encoder, create_encoder
from app.fusion.config import get_fusion_config
from app.fusion.train import TrainingPairs, TrainOptions, TrainResult, train_fusion
from app.memory.base import VectorMemory
from app.retrieval import RetrievalCfg
from app.services.method_common import (
    MethodError,
    describe_filters,
    exact_index,
    load_matrices,
    memory_for_encoder,
    resolve_device,
    safe_name,
    session_factory_for,
)
from app.synthetic import SyntheticCfg, SyntheticWorld, synthetic_train_options

SYNTHETIC = "synthetic"


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(default="flickr8k", description="Payload 'dataset' of the training pairs, or 'synthetic'.")
    split: str | None = "train"
    memory_filters: dict[str, Any] = Field(default_factory=dict, description="Memory rows; empty = all.")
    fusion_config: str | None = None
    k: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0)
    weight_decay: float | None = Field(default=None, ge=0)
    batch_size: int | None = Field(default=None, ge=2)
    epochs: int | None = Field(default=None, ge=1)
    warmup_steps: int | None = Field(default=None, ge=0)
    seed: int | None = None
    query_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    gated_init: bool = False
    score_bias: bool = False  # neighbours' search similarities as an attention bias (issue 16)
    search_modality: Literal["uni", "cross"] | None = None
    fusion_modality: Literal["cross", "uni"] | None = None
    dedupe: bool | None = None
    output: Path | None = None
    progress: bool = True


class TrainReport(BaseModel):
    checkpoint: str
    sha256: str
    checkpoint_id: int | None
    encoder_id: str
    memory_version: str
    memory_size: int
    pairs: int
    metrics: dict[str, Any]
    options: dict[str, Any]


def _retrieval(settings: Settings, request: TrainRequest) -> RetrievalCfg:
    base = RetrievalCfg.from_settings(settings)
    return RetrievalCfg(request.search_modality or base.search, request.fusion_modality or base.fusion,
                        base.dedupe_by_image if request.dedupe is None else request.dedupe)


def _options(settings: Settings, request: TrainRequest, base: TrainOptions | None = None) -> TrainOptions:
    overrides = {name: getattr(request, name) for name in
                 ("k", "lr", "weight_decay", "batch_size", "epochs", "warmup_steps", "seed")}
    overrides.update(query_dropout=request.query_dropout, gated_init=request.gated_init, score_bias=request.score_bias,
                     retrieval=_retrieval(settings, request), progress=request.progress,
                     device=resolve_device(settings))
    if base is None:
        return TrainOptions.from_settings(settings, **overrides)
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _checkpoint_path(settings: Settings, request: TrainRequest, encoder_id: str) -> Path:
    if request.output is not None:
        return request.output
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return settings.data_dir / "checkpoints" / "fusion" / f"{safe_name(encoder_id)}-{stamp}.safetensors"


def _register(
    settings: Settings, result: TrainResult, encoder_id: str, memory_version: str,
    factory: SessionFactory | None,
) -> TrainReport:
    assert result.checkpoint is not None and result.sha256 is not None
    factory = factory or session_factory_for(settings)
    record = register_checkpoint(factory, path=str(result.checkpoint.resolve()), sha256=result.sha256,
                                 encoder_id=encoder_id, memory_version=memory_version,
                                 config=result.model.cfg.to_dict(), metrics=result.metrics)
    return TrainReport(checkpoint=str(result.checkpoint), sha256=result.sha256, checkpoint_id=record.id,
                       encoder_id=encoder_id, memory_version=memory_version,
                       memory_size=int(result.metrics["memory_size"]), pairs=int(result.metrics["pairs"]),
                       metrics=result.metrics, options={})


def train_synthetic(
    settings: Settings, request: TrainRequest, *, session_factory: SessionFactory | None = None
) -> TrainReport:
    world = SyntheticWorld(SyntheticCfg(seed=request.seed or 0))
    options = _options(settings, request, base=synthetic_train_options())
    index = world.memory()
    result = train_fusion(world.training_pairs(), index, get_fusion_config(request.fusion_config or
                                                                           settings.fusion_config),
                          options, encoder_id=world.encoder_id, memory_version=index.version,
                          checkpoint_path=_checkpoint_path(settings, request, world.encoder_id))
    report = _register(settings, result, world.encoder_id, index.version, session_factory)
    report.options = options.to_dict()
    return report


def run_training(
    settings: Settings,
    request: TrainRequest,
    *,
    encoder: Encoder | None = None,
    memory: VectorMemory | None = None,
    session_factory: SessionFactory | None = None,
) -> TrainReport:
    """Train on the memory of the configured encoder; returns where the checkpoint went and its metrics."""
    if request.dataset == SYNTHETIC:
        return train_synthetic(settings, request, session_factory=session_factory)
    encoder_id = (encoder or create_encoder(settings)).encoder_id
    memory = memory or memory_for_encoder(settings, encoder_id)
    pair_filter: dict[str, Any] = {"dataset": request.dataset}
    if request.split:
        pair_filter["split"] = request.split
    pair_rows = load_matrices(settings, memory, pair_filter)
    if len(pair_rows) < 2:
        raise MethodError(f"no training pairs with {describe_filters(pair_filter)} in {memory.collection}")
    index = exact_index(settings, load_matrices(settings, memory, request.memory_filters or None))
    memory_version = f"{memory.collection}[{describe_filters(request.memory_filters)}]:{index.version}"
    pairs = TrainingPairs(image=pair_rows.image, text=pair_rows.text, ids=pair_rows.ids,
                          image_hashes=pair_rows.image_hashes)
    options = _options(settings, request)
    result = train_fusion(pairs, index, get_fusion_config(request.fusion_config or settings.fusion_config),
                          options, encoder_id=encoder_id, memory_version=memory_version,
                          checkpoint_path=_checkpoint_path(settings, request, encoder_id))
    report = _register(settings, result, encoder_id, memory_version, session_factory)
    report.options = {**options.to_dict(), "pairs": pair_filter, "memory": request.memory_filters}
    return report
