"""Predict in the serving service: CLIP beside RECO for each image, with the neighbours and attention that
explain it, the class sets it predicts against (prepared and cached ahead), how related the memory is to the
query, and which classes the memory holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from app.imaging import open_image_safely
from app.manifest import load_classes
from app.memory.base import MemoryStoreError
from app.refine import mode_or_recommended
from app.schemas import Modality, RefineMode
from app.services.method_common import MethodError
from app.services.predict import PredictRequest, predict_image
from app.services.serving_live import ServingBase, _Live, class_sets
from app.services.serving_models import (
    ClassCoverage,
    ClassExplanation,
    ClassSetPrepared,
    NeighbourOut,
    PredictionOut,
    PredictQuery,
    Relatedness,
)


def mode_for(query: PredictQuery, live: _Live) -> RefineMode:
    """The query's mode, else the live checkpoint's validated one (both without a checkpoint, where the answer
    then says RECO is unavailable)."""
    return mode_or_recommended(query.mode, live.refiner)


class PredictServing(ServingBase):
    """Predictions (see :class:`app.services.serving.ServingService`)."""

    def resolve_classes(self, query: PredictQuery) -> list[str]:
        if query.labels is not None:
            return list(query.labels)
        sets = class_sets(self.settings)
        assert query.class_set is not None
        if query.class_set not in sets:
            raise LookupError(f"unknown class set {query.class_set!r}; known: {', '.join(sorted(sets)) or 'none'}")
        return load_classes(sets[query.class_set])

    def prepare_classes(self, query: PredictQuery,
                        progress: Callable[[int, int], None] | None = None) -> ClassSetPrepared:
        """Compute (or find cached) the class embeddings a prediction against this class set needs: CLIP's, and
        for modes text/both the refined ones — batched, cached on disk across restarts. ``progress(done, total)``
        counts class embeddings (twice the classes when the prompts are refined). A front end prepares a large
        set in chunks of labels to show a progress bar; the full set is then assembled from the chunks' rows."""
        from app.zeroshot import ZeroShotClassifier

        started = time.perf_counter()
        classes = self.resolve_classes(query)
        live = self.live()
        k = query.k or self.settings.k_infer
        refines = mode_for(query, live) in (RefineMode.TEXT, RefineMode.BOTH) and live.refiner is not None
        total = len(classes) * (2 if refines else 1)
        cache = self.predict_caches.class_cache(self.settings)
        hits = cache.hits
        clip = ZeroShotClassifier(classes, live.encoder, templates=query.templates, cache=cache)
        clip.class_embeddings(RefineMode.CLIP, progress=lambda d, _t: progress and progress(d, total))
        if refines:
            assert live.refiner is not None
            refined = ZeroShotClassifier(classes, live.encoder, templates=query.templates,
                                         refiner=live.refiner.with_k(k), checkpoint_id=live.checkpoint_label or "none",
                                         cache=cache)
            refined.class_embeddings(RefineMode.TEXT,
                                     progress=lambda d, _t: progress and progress(len(classes) + d, total))
        return ClassSetPrepared(classes=len(classes), refined=refines, seconds=time.perf_counter() - started,
                                cached=cache.hits > hits)

    def predict(self, images: list[tuple[str, bytes]], query: PredictQuery) -> list[PredictionOut]:
        """CLIP and RECO for each image: one decode and one encode per image; class embeddings cached."""
        self.last_request = time.monotonic()
        classes = self.resolve_classes(query)
        live = self.live()
        mode = mode_for(query, live)
        k = query.k or self.settings.k_infer
        fit = getattr(live.encoder, "image_size", None)  # downscaled right after decoding: bounded memory
        decoded = [open_image_safely(data, self.limits, fit=fit) for _, data in images]  # ImageRejected: a 4xx
        vectors = live.encoder.encode_images(decoded) if decoded else np.zeros((0, 0), np.float32)
        loaded = (live.refiner, live.checkpoint_label or "") if live.refiner is not None else None
        out = []
        for (name, _), vector in zip(images, vectors, strict=True):
            def run(mode: RefineMode, v: np.ndarray = vector) -> Any:
                request = PredictRequest(image_bytes=b"", classes=classes, mode=mode, k=k, top=query.top,
                                         templates=query.templates)
                return predict_image(self.settings, request, encoder=live.encoder, memory=live.memory,
                                     session_factory=self.repo.session_factory, refiner=loaded, image_vector=v,
                                     caches=self.predict_caches)

            clip = run(RefineMode.CLIP)
            answer = PredictionOut(name=name, clip=clip.predictions, mode=mode, k=k,
                                   encoder_id=live.encoder.encoder_id)
            if live.memory is not None:
                answer.relatedness = self.relatedness(live, vector)
            if mode is RefineMode.CLIP:
                out.append(answer)
                continue
            if loaded is None:
                answer.reco_unavailable = live.refiner_error
                out.append(answer)
                continue
            try:
                reco = run(mode)
            except (MethodError, MemoryStoreError) as exc:
                answer.reco_unavailable = str(exc)
                out.append(answer)
                continue
            answer.reco, answer.checkpoint = reco.predictions, reco.checkpoint
            answer.self_attention = reco.self_attention
            threshold = live.refiner.fallback.get("image") if live.refiner is not None else None
            if threshold is not None and mode in (RefineMode.IMAGE, RefineMode.BOTH) and reco.neighbours:
                answer.fallback_threshold = float(threshold)
                answer.fell_back = max(n.score for n in reco.neighbours) < threshold
            answer.neighbours = self._with_metadata([
                NeighbourOut(item_id=n.item_id, caption=n.caption or "", score=n.score, attention=n.attention)
                for n in reco.neighbours])
            if mode in (RefineMode.TEXT, RefineMode.BOTH):
                answer.class_explanations = self._explain_classes(live, [c.name for c in reco.predictions[:3]],
                                                                  query.templates, k)
            out.append(answer)
        return out

    def _explain_classes(self, live: _Live, names: list[str], templates: str | None, k: int) -> list[ClassExplanation]:
        """Each class's first prompt, refined as the text side refines it: what it retrieved and how the
        fusion weighed it (the class embedding averages this over the prompt templates)."""
        from app.zeroshot import resolve_templates

        assert live.refiner is not None
        template = resolve_templates(templates)[0]
        prompts = [template.replace("{c}", n) for n in names]
        vectors = live.encoder.encode_texts(prompts)
        refiner = live.refiner.with_k(k).for_task("zeroshot")  # as the class prompts are refined
        out = []
        for name, prompt, vector in zip(names, prompts, vectors, strict=True):
            result = refiner.refine_one(vector, Modality.TEXT)
            out.append(ClassExplanation(name=name, prompt=prompt, self_attention=result.self_attention,
                                        neighbours=self._with_metadata([
                                            NeighbourOut(item_id=n.item_id, caption=n.caption or "", score=n.score,
                                                         attention=n.attention, image_hash=n.image_hash)
                                            for n in result.neighbours])))
        return out

    def relatedness(self, live: _Live, vector: np.ndarray) -> Relatedness | None:
        """The query's nearest memory image against the memory's own nearest-image similarities."""
        assert live.memory is not None
        hits = live.memory.search(vector, Modality.IMAGE, 1)
        if not hits:
            return None
        typical = self._typical_relatedness(live)
        return Relatedness(top_similarity=hits[0].score, **typical)

    def _typical_relatedness(self, live: _Live, sample: int = 64) -> dict[str, Any]:
        """Median and 5th percentile of "nearest other image" similarity over a sample of the memory's images,
        cached per collection and size (one batched search)."""
        memory = live.memory
        assert memory is not None
        key = (memory.collection, memory.count())
        cached = self._relatedness_cache.get(key)
        if cached is not None:
            return cached
        points = list(next(iter(memory.scroll(limit=sample, with_vectors=True)), []))[:sample]
        if len(points) < 5:
            return {}
        vectors = np.stack([p.vector(Modality.IMAGE) for p in points])
        found = memory.search_batch(vectors, Modality.IMAGE, 12)
        best = []
        for point, hits in zip(points, found, strict=True):
            own = point.payload.image_hash if point.payload else None
            others = [h.score for h in hits if h.item_id != point.item_id
                      and (h.payload is None or h.payload.image_hash != own)]
            if others:
                best.append(others[0])
        if not best:
            return {}
        value = {"typical": float(np.median(best)), "low": float(np.percentile(best, 5)), "sample": len(best)}
        self._relatedness_cache[key] = value
        return value

    def class_coverage(self, labels: list[str]) -> ClassCoverage:
        """Which of ``labels`` the memory holds: some caption mentions the class name (case-insensitive,
        '_' and '-' read as spaces). One pass over the memory's distinct captions, cached per item count."""
        count = self.repo.count_items()
        if self._captions_cache is None or self._captions_cache[0] != count:
            self._captions_cache = (count, " \n ".join(_words(c) for c in self.repo.distinct_captions()))
        text = self._captions_cache[1]
        missing = [label for label in labels if _words(label) not in text]
        return ClassCoverage(classes=len(labels), held=len(labels) - len(missing), missing=missing[:50],
                             missing_count=len(missing))


def _words(text: str) -> str:
    """Lower case, punctuation and '_'/'-' as spaces, padded: whole-word containment by substring."""
    import re

    return " " + " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split()) + " "

