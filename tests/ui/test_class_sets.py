"""Class sets at speed: refined class embeddings computed in batches with a progress callback, assembled from
chunks exactly as computed whole, cached across restarts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.config import Settings
from app.schemas import RefineMode


def test_prepare_in_chunks_progress_and_restart(ui_data: Path) -> None:
    from app.services.serving import PredictQuery, ServingService
    from app.zeroshot import ClassEmbeddingCache, ZeroShotClassifier

    labels = [f"thing number {i}" for i in range(130)]
    service = ServingService(Settings())
    try:
        seen: list[tuple[int, int]] = []
        for start in range(0, len(labels), 50):  # as the Predict page does: chunks, then the whole set
            service.prepare_classes(PredictQuery(labels=labels[start: start + 50], mode="both"))
        whole = service.prepare_classes(PredictQuery(labels=labels, mode="both"),
                                        progress=lambda d, t: seen.append((d, t)))
        assert whole.refined and whole.classes == 130
        assert seen[-1] == (260, 260) and seen == sorted(seen)
        live = service.live()
        cache = service.predict_caches.class_cache(service.settings)
        assembled = ZeroShotClassifier(labels, live.encoder, refiner=live.refiner.with_k(4),
                                       checkpoint_id=live.checkpoint_label or "none", cache=cache)
        direct = ZeroShotClassifier(labels, live.encoder, refiner=live.refiner.with_k(4),
                                    checkpoint_id=live.checkpoint_label or "none", cache=ClassEmbeddingCache())
        np.testing.assert_allclose(assembled.class_embeddings(RefineMode.TEXT),
                                   direct.class_embeddings(RefineMode.TEXT), atol=1e-5)
    finally:
        service.close()
    again = ServingService(Settings())  # a restart: nothing in process (a new service owns new caches)
    try:
        progress: list[tuple[int, int]] = []
        out = again.prepare_classes(PredictQuery(labels=labels, mode="both"),
                                    progress=lambda d, t: progress.append((d, t)))
        assert out.cached and progress[0] == (130, 260)  # the whole set came from disk: no class recomputed
        assert len(list((Path(again.settings.data_dir) / "cache" / "zeroshot").glob("*.npy"))) >= 2
    finally:
        again.close()


def test_trimmed_text_encoding_is_the_full_pass() -> None:
    """Prompts batched by length and each batch cut to its longest prompt give CLIP's 77-token features."""
    import torch

    from app.encoder.openclip import OpenClipEncoder, l2_normalise
    from app.encoder.text_trim import trimmable_text_tower

    encoder = OpenClipEncoder("reco-tiny", "", device="cpu", batch_size=4)
    texts = ["a photo of a hat.", "a much longer prompt about a striped long-sleeve shirt on a wooden floor " * 3,
             "dress", "itap of a t-shirt.", "a photo of a laysan albatross, a type of bird.", "x", "shoes"]
    encoder.encode_texts(["warm-up"])
    assert trimmable_text_tower(encoder._model)
    with torch.inference_mode():
        full = l2_normalise(encoder._model.encode_text(encoder._tokenizer(texts)))
    np.testing.assert_allclose(encoder.encode_texts(texts), full, atol=1e-5)


def test_prediction_says_when_reco_fell_back_to_clip(ui_data: Path) -> None:
    """The checkpoint's do-no-harm threshold reaches the answer: above every similarity, the image side falls
    back (and says so); at -1 it never does."""
    from app.services.serving import PredictQuery, ServingService

    image = next(p for p in sorted((Path(__file__).resolve().parents[2] / "sample" / "clothing10" / "images")
                                   .iterdir()) if p.name.startswith("val_"))
    service = ServingService(Settings())
    try:
        live = service.live()
        assert live.refiner is not None
        query = PredictQuery(labels=["hat", "shoes", "dress"], mode="both")
        for threshold, expected in ((1.5, True), (-1.0, False)):
            live.refiner.fallback = {"image": threshold}
            (answer,) = service.predict([(image.name, image.read_bytes())], query)
            assert answer.fallback_threshold == threshold and answer.fell_back is expected
    finally:
        service.close()
