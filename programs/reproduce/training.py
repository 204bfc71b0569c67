"""Training one variant's fusion for one seed on the workspace's pairs and memory."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from app.fusion.config import FusionCfg
from app.fusion.model import RecoFusion
from app.fusion.train import TrainingPairs, TrainOptions, precompute_neighbours, train_fusion
from app.memory.exact import ExactIndex
from app.retrieval import Neighbours, RetrievalCfg
from app.schemas import Modality
from programs.reproduce.memory import MemoryRows
from programs.reproduce.plan import GENERIC, ReproPlan, Variant
from programs.reproduce.workspace import UNSEEN, Workspace, pairs_of


def training_neighbours(ws: Workspace, memory: ExactIndex, pairs: TrainingPairs, k: int, retrieval: RetrievalCfg,
                        policy: str) -> tuple[Neighbours, Neighbours]:
    """Shared by the seeds and by the options that only change the model (one search each)."""
    digest = hashlib.sha1(np.ascontiguousarray(pairs.image[:: max(1, len(pairs) // 64)]).tobytes()).hexdigest()
    key = (memory.version, len(pairs), digest, k, retrieval.search, retrieval.fusion, retrieval.dedupe_by_image,
           policy)
    if key not in ws.training_neighbours:
        ws.training_neighbours[key] = precompute_neighbours(memory, pairs, k, retrieval, self_exclusion=policy,
                                                            near_duplicate_threshold=ws.threshold)
    return ws.training_neighbours[key]


def train_variant(ws: Workspace, plan: ReproPlan, variant: Variant, seed: int, *, progress: bool = False
                  ) -> tuple[RecoFusion, dict[str, Any]]:
    retrieval = RetrievalCfg(variant.search, variant.fusion, variant.dedupe_by_image)
    pairs, memory = ws.pairs, ws.memories[GENERIC].index
    if variant.extra_pairs:  # the extra pairs join the training pairs and the training memory
        base = ws.memories[GENERIC]
        extra = [ws.extra_pairs[n] for n in variant.extra_pairs]
        rows = MemoryRows.concat([MemoryRows(list(base.index.ids), np.asarray(base.index.matrix(Modality.IMAGE)),
                                             np.asarray(base.index.matrix(Modality.TEXT)),
                                             list(base.index.image_hashes), base.dhashes), *[r for _, r in extra]])
        memory = rows.index(f"train:{variant.name}:{len(rows.ids)}")
        pairs = pairs_of(MemoryRows.concat([MemoryRows(list(ws.pairs.ids or []), ws.pairs.image, ws.pairs.text,
                                                       list(ws.pairs.image_hashes or []), np.zeros(len(ws.pairs),
                                                                                                   np.uint64)),
                                            *[r for _, r in extra]]))
    batch_size, epochs = plan.batch_size, plan.epochs
    if variant.augmented_queries:  # same pairs and memory; the image query is an augmented view of its image
        if ws.augmented is None:
            raise ValueError(f"variant {variant.name} trains on augmented views, but none were encoded")
        views = ws.augmented
        pairs = TrainingPairs(np.concatenate(list(views)), np.concatenate([pairs.text] * len(views)),
                              ids=list(pairs.ids or []) * len(views),
                              image_hashes=list(pairs.image_hashes or []) * len(views))
        epochs = max(1, epochs // len(views))  # as many steps as the paper recipe
    if variant.train_pairs == UNSEEN:  # fewer pairs: smaller batches, as many steps as the paper recipe
        pairs, _ = ws.extra_pairs[UNSEEN]
        paper_steps = epochs * max(1, len(ws.pairs) // batch_size)
        batch_size = max(2, min(batch_size, len(pairs) // 8))
        epochs = max(1, -(-paper_steps // max(1, len(pairs) // batch_size)))
    options = TrainOptions(k=variant.k, lr=plan.lr, weight_decay=plan.weight_decay, batch_size=batch_size,
                           epochs=epochs, warmup_steps=plan.warmup_steps, seed=seed,
                           query_dropout=variant.query_dropout, gated_init=variant.gated_init,
                           score_bias=variant.score_bias, self_exclusion=variant.self_exclusion,
                           near_duplicate_threshold=ws.threshold,
                           threads=plan.threads, progress=progress, retrieval=retrieval)
    neighbours = training_neighbours(ws, memory, pairs, variant.k, retrieval, variant.self_exclusion)
    result = train_fusion(pairs, memory, FusionCfg(name="reco-fusion-b"), options, encoder_id=ws.encoder_id,
                          neighbours=neighbours)
    metrics = {key: result.metrics[key] for key in ("initial_loss", "final_loss", "temperature", "seconds", "steps",
                                                    "pairs", "memory_size")}
    metrics["options"] = options.to_dict()
    gates = [getattr(m, "gate", None) for m in (result.model.image, result.model.text)]
    gate = [float(torch.tanh(g.detach())) for g in gates if isinstance(g, torch.Tensor)]
    if gate:
        metrics["gate_tanh"] = gate
    return result.model, metrics
