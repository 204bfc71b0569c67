"""Encoders: one interface (:class:`Encoder`), open_clip backend, one factory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.encoder.base import Encoder, l2_normalise
from app.encoder.openclip import (
    RANDOM_WEIGHTS_WARNING,
    EncoderLoadError,
    OpenClipEncoder,
    collection_name_for,
)

if TYPE_CHECKING:
    from app.config import Settings


def create_encoder(settings: Settings) -> OpenClipEncoder:
    return OpenClipEncoder.from_settings(settings)


__all__ = [
    "RANDOM_WEIGHTS_WARNING",
    "Encoder",
    "EncoderLoadError",
    "OpenClipEncoder",
    "collection_name_for",
    "create_encoder",
    "l2_normalise",
]
