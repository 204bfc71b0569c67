"""Caches have owners: prediction caches belong to their caller (the serving service holds one), the
re-embedding target's encoder to the worker runtime — two owners never share what they keep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.config import Settings


def test_prediction_caches_are_per_owner(tmp_path: Path) -> None:
    from app.services.predict import PredictCaches

    settings = Settings(data_dir=tmp_path)
    first, second = PredictCaches(max_refiners=2), PredictCaches()
    assert first.class_cache(settings) is first.class_cache(settings)
    assert first.class_cache(settings) is not second.class_cache(settings)
    assert first.class_cache(settings).folder == tmp_path / "cache" / "zeroshot"
    kept = first.class_cache(settings)
    first.forget_classes()  # as a restart: a new in-process cache (the files on disk stay)
    assert first.class_cache(settings) is not kept

    memory: Any = object()
    other_memory: Any = object()
    refiners: list[Any] = [object(), object(), object()]
    first.keep_refiner(("a", "h", id(memory), 4), memory, refiners[0])
    assert first.refiner(("a", "h", id(memory), 4), memory) is refiners[0]
    assert first.refiner(("a", "h", id(memory), 4), other_memory) is None
    assert second.refiner(("a", "h", id(memory), 4), memory) is None
    first.keep_refiner(("b", "h", id(memory), 4), memory, refiners[1])
    first.refiner(("a", "h", id(memory), 4), memory)  # used: the newest now
    first.keep_refiner(("c", "h", id(memory), 4), memory, refiners[2])
    assert first.refiner(("b", "h", id(memory), 4), memory) is None  # least recent
    assert first.refiner(("a", "h", id(memory), 4), memory) is refiners[0]


def test_the_runtime_keeps_one_target_encoder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from app.encoder_identity import EncoderId
    from app.services import reembed
    from workers import maintenance
    from workers.runtime import WorkerRuntime

    built: list[tuple[str, str, int | None]] = []

    def encoder_for(settings: Settings, identity: EncoderId) -> Any:
        built.append((identity.model, identity.pretrained, identity.seed))
        return object()

    monkeypatch.setattr(reembed, "encoder_for", encoder_for)
    settings = Settings(data_dir=tmp_path, precision="fp32")
    no_app: Any = None  # the runtime's Celery app is not needed to hold an encoder
    runtime, other = WorkerRuntime(settings, no_app), WorkerRuntime(settings, no_app)
    m_p_0, m_p_1 = EncoderId("m", "p", 0), EncoderId("m", "p", 1)
    first = maintenance._encoder(runtime, m_p_0)
    assert maintenance._encoder(runtime, EncoderId("m", "p", 0)) is first and built == [("m", "p", 0)]
    maintenance._encoder(other, m_p_0)  # another process's runtime builds its own
    assert len(built) == 2
    assert maintenance._encoder(runtime, m_p_1) is not first  # a new target replaces the old one
    assert maintenance._encoder(runtime, m_p_0) is not first and len(built) == 4
