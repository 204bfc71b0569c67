"""Training the fusion on cached embeddings (paper Sec. 3.2 and 4: AdamW, cosine lr, learned temperature).

The encoder is frozen, so training pairs are embeddings computed once. Neighbours of every training
query are retrieved from the memory in one batched pass before the first step (the exact index),
with each query's own item and exact duplicates of its image excluded, so a pair never sees itself.
Only neighbour *rows* are kept; their embeddings are gathered per batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from app.fusion.checkpoint import CheckpointMeta, save_checkpoint
from app.fusion.config import FusionCfg
from app.fusion.loss import reco_loss
from app.fusion.model import MAX_LOGIT_SCALE, RecoFusion
from app.fusion.recipe import PAPER_RECIPE
from app.memory.exact import ExactIndex
from app.retrieval import Neighbours, RetrievalCfg, find_neighbours, gather_embeddings
from app.schemas import Modality

log = logging.getLogger(__name__)

SelfExclusion = Literal["pair", "image", "near-duplicates"]
SELF_EXCLUSION_POLICIES: tuple[str, ...] = ("pair", "image", "near-duplicates")
NEAR_DUPLICATE_FETCH = 64  # near-copies looked for per training image (more than any image has here)


@dataclass(frozen=True)
class TrainOptions:
    """Paper recipe by default (:data:`~app.fusion.recipe.PAPER_RECIPE`); the options of issues 5 and 16 are off
    (the paper has none of them)."""

    k: int = PAPER_RECIPE.k
    lr: float = PAPER_RECIPE.lr
    weight_decay: float = PAPER_RECIPE.weight_decay
    batch_size: int = PAPER_RECIPE.batch_size
    epochs: int = PAPER_RECIPE.epochs
    warmup_steps: int = PAPER_RECIPE.warmup_steps
    seed: int = PAPER_RECIPE.seed
    query_dropout: float = 0.0  # probability of hiding the query token from the fusion during training
    gated_init: bool = False  # start every fusion module at mean fusion (learned gate, initialised to 0)
    score_bias: bool = False  # the neighbours' search similarities as an attention bias (FusionCfg.score_bias)
    # What a training query may not retrieve: its own pair ("pair"), every row of its image ("image", the
    # default: exact duplicates), or also memory images whose image cosine with it exceeds
    # ``near_duplicate_threshold`` ("near-duplicates"; the paper does this for test images only).
    self_exclusion: SelfExclusion = "image"
    near_duplicate_threshold: float | None = None
    device: str = "cpu"
    threads: int | None = None  # CPU threads while training; None = torch's. Tiny models run best on one.
    progress: bool = True
    retrieval: RetrievalCfg = field(default_factory=RetrievalCfg)

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> TrainOptions:
        values: dict[str, Any] = {
            "k": settings.k_train, "lr": settings.train_lr, "weight_decay": settings.train_weight_decay,
            "batch_size": settings.train_batch_size, "epochs": settings.train_epochs,
            "warmup_steps": settings.train_warmup_steps, "seed": settings.train_seed,
            "retrieval": RetrievalCfg.from_settings(settings),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("progress")
        return data


@dataclass
class TrainingPairs:
    """Row-aligned image and text embeddings of the training pairs (L2-normalised)."""

    image: np.ndarray
    text: np.ndarray
    ids: list[str] | None = None  # item ids, when the pairs also sit in the memory (self-exclusion)
    image_hashes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.image)


@dataclass
class TrainResult:
    model: RecoFusion
    metrics: dict[str, Any]
    checkpoint: Path | None = None
    sha256: str | None = None


def near_duplicate_hashes(index: ExactIndex, images: np.ndarray, threshold: float) -> list[list[str]]:
    """Per query image: hashes of memory images whose image cosine with it is above ``threshold``."""
    fetch = min(len(index), NEAR_DUPLICATE_FETCH * index.max_rows_per_image)
    scores, rows = index.knn(images, Modality.IMAGE, fetch)
    return [sorted({index.image_hashes[r] for r, s in zip(row, score, strict=True) if r >= 0 and s > threshold})
            for row, score in zip(rows, scores, strict=True)]


def exclusion_lists(
    index: ExactIndex, pairs: TrainingPairs, policy: str = "image", threshold: float | None = None
) -> tuple[list[list[str]] | None, list[list[str]] | None]:
    """(ids, image hashes) each training query must not retrieve under a self-exclusion policy."""
    if policy not in SELF_EXCLUSION_POLICIES:
        raise ValueError(f"self-exclusion must be one of {SELF_EXCLUSION_POLICIES}, got {policy!r}")
    exclude_ids = [[i] for i in pairs.ids] if pairs.ids is not None else None
    if policy == "pair" or pairs.image_hashes is None:
        return exclude_ids, None
    exclude_hashes = [[h] for h in pairs.image_hashes]
    if policy == "near-duplicates":
        if threshold is None:
            raise ValueError("self-exclusion 'near-duplicates' needs near_duplicate_threshold")
        near = near_duplicate_hashes(index, pairs.image, threshold)
        exclude_hashes = [sorted({*own, *extra}) for own, extra in zip(exclude_hashes, near, strict=True)]
    return exclude_ids, exclude_hashes


def precompute_neighbours(
    index: ExactIndex, pairs: TrainingPairs, k: int, cfg: RetrievalCfg,
    *, self_exclusion: str = "image", near_duplicate_threshold: float | None = None,
) -> tuple[Neighbours, Neighbours]:
    """Neighbours of every image query and every text query, own item and image excluded (by default)."""
    exclude_ids, exclude_hashes = exclusion_lists(index, pairs, self_exclusion, near_duplicate_threshold)
    image_nb = find_neighbours(index, pairs.image, Modality.IMAGE, k, cfg,
                               exclude_ids=exclude_ids, exclude_image_hashes=exclude_hashes)
    text_nb = find_neighbours(index, pairs.text, Modality.TEXT, k, cfg,
                              exclude_ids=exclude_ids, exclude_image_hashes=exclude_hashes)
    return image_nb, text_nb


def cosine_with_warmup(warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _optimizer(model: RecoFusion, options: TrainOptions) -> torch.optim.AdamW:
    # CLIP's convention: no weight decay on gains, biases, the temperature or the gate.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": options.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=options.lr)


class _Batches:
    """Gathers a batch of queries and their neighbours' embeddings from the index."""

    def __init__(self, index: ExactIndex, pairs: TrainingPairs, neighbours: tuple[Neighbours, Neighbours],
                 cfg: RetrievalCfg, device: torch.device) -> None:
        self.index, self.pairs, self.cfg, self.device = index, pairs, cfg, device
        self.image_nb, self.text_nb = neighbours

    def get(self, batch: np.ndarray) -> dict[str, torch.Tensor]:
        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

        v_nb, v_valid = gather_embeddings(self.index, self.image_nb.rows[batch], self.cfg.fused(Modality.IMAGE))
        t_nb, t_valid = gather_embeddings(self.index, self.text_nb.rows[batch], self.cfg.fused(Modality.TEXT))
        return {"v": tensor(self.pairs.image[batch]), "t": tensor(self.pairs.text[batch]),
                "v_nb": tensor(v_nb), "v_valid": tensor(v_valid), "t_nb": tensor(t_nb), "t_valid": tensor(t_valid),
                "v_scores": tensor(self.image_nb.scores[batch].astype(np.float32)),
                "t_scores": tensor(self.text_nb.scores[batch].astype(np.float32))}


def _step_loss(model: RecoFusion, b: dict[str, torch.Tensor], options: TrainOptions,
               gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    drop_v = drop_t = None
    if options.query_dropout > 0:
        draws = torch.rand(2, len(b["v"]), generator=gen).to(b["v"].device)
        drop_v, drop_t = draws[0] < options.query_dropout, draws[1] < options.query_dropout
    v_bar = model.refine(Modality.IMAGE, b["v"], b["v_nb"], b["v_valid"], drop_v, b["v_scores"]).embedding
    t_bar = model.refine(Modality.TEXT, b["t"], b["t_nb"], b["t_valid"], drop_t, b["t_scores"]).embedding
    return reco_loss(b["v"], b["t"], v_bar, t_bar, model.scale())


def _fit(model: RecoFusion, batches: _Batches, n: int, options: TrainOptions) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(options.seed)
    batch_size = max(2, min(options.batch_size, n))
    steps_per_epoch = n // batch_size  # the last partial batch is dropped (as open_clip's loader does)
    total = steps_per_epoch * options.epochs
    optimizer = _optimizer(model, options)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(options.warmup_steps, total))
    history: list[float] = []
    parts: dict[str, float] = {}  # mean of each loss term over the last epoch
    first_loss: float | None = None
    model.train()
    with tqdm(total=total, desc="train fusion", unit="step", disable=not options.progress) as bar:
        for _epoch in range(options.epochs):
            order = torch.randperm(n, generator=gen).numpy()
            losses, epoch_parts = [], []
            for step in range(steps_per_epoch):
                batch = order[step * batch_size: (step + 1) * batch_size]
                loss, step_parts = _step_loss(model, batches.get(batch), options, gen)
                epoch_parts.append(step_parts)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
                losses.append(float(loss.detach()))
                first_loss = losses[0] if first_loss is None else first_loss
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", T=f"{model.temperature:.4f}")
            history.append(float(np.mean(losses)))
            parts = {key: float(np.mean([p[key] for p in epoch_parts])) for key in epoch_parts[0]}
    model.eval()
    return {"loss_history": history, "initial_loss": first_loss, "final_loss": history[-1] if history else None,
            "steps": total, "loss_parts": parts}


@contextmanager
def _cpu_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_fusion(
    pairs: TrainingPairs,
    index: ExactIndex,
    fusion_cfg: FusionCfg,
    options: TrainOptions,
    *,
    encoder_id: str,
    memory_version: str | None = None,
    checkpoint_path: Path | None = None,
    neighbours: tuple[Neighbours, Neighbours] | None = None,
) -> TrainResult:
    """Train phi_image, phi_text and the temperature; write a checkpoint when a path is given.

    ``neighbours``: rows from :func:`precompute_neighbours` with these options, when the caller
    already has them (several fusions trained on the same pairs and memory share one search).
    """
    if len(pairs) < 2:
        raise ValueError("training needs at least two pairs (a contrastive batch needs negatives)")
    started = time.perf_counter()
    device = torch.device(options.device)
    cfg = replace(fusion_cfg, gated=fusion_cfg.gated or options.gated_init,
                  score_bias=fusion_cfg.score_bias or options.score_bias)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        model = RecoFusion(cfg, index.dim).to(device)
    init_scale = float(model.logit_scale.detach())
    if neighbours is None:
        neighbours = precompute_neighbours(index, pairs, options.k, options.retrieval,
                                           self_exclusion=options.self_exclusion,
                                           near_duplicate_threshold=options.near_duplicate_threshold)
    elif len(neighbours[0].rows) != len(pairs) or neighbours[0].rows.shape[1] != options.k:
        raise ValueError("precomputed neighbours do not match the training pairs and k")
    with _cpu_threads(options.threads):
        fit = _fit(model, _Batches(index, pairs, neighbours, options.retrieval, device), len(pairs), options)
    metrics = {
        **fit, "pairs": len(pairs), "memory_size": len(index), "k": options.k,
        "logit_scale_init": init_scale, "logit_scale": float(model.logit_scale.detach()),
        "temperature": model.temperature, "seconds": round(time.perf_counter() - started, 3),
    }
    model = model.cpu()
    result = TrainResult(model=model, metrics=metrics)
    if checkpoint_path is not None:
        meta = CheckpointMeta(config=model.cfg.to_dict(), dim=model.dim, encoder_id=encoder_id,
                              memory_version=memory_version or index.version, metrics=metrics,
                              options=options.to_dict())
        result.checkpoint = Path(checkpoint_path)
        result.sha256 = save_checkpoint(result.checkpoint, model, meta)
        log.info("fusion checkpoint %s (sha256 %s)", result.checkpoint, result.sha256[:12])
    return result
