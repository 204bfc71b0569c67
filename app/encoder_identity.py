"""The identity of an encoder as a value: which architecture, which weights, and for random weights the seed.

Outside the app.encoder package on purpose: importing it loads no model library (torch), so the dispatcher
and the watch folders, which never load a model, can name encoders too.

As a string it is the encoder id the memory is versioned by (collections, embedding rows, checkpoints):
``<model>/random/s<seed>`` for random initialisation, ``<model>/<tag or "file">/<sha256[:12]>`` for trained
weights (the digest is known only to the loaded encoder). :meth:`EncoderId.parse` reads one back;
:meth:`EncoderId.of_version` joins it with what a version row keeps (the configured ``pretrained``, which
for a checkpoint file is its path), which is what rebuilding that encoder needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from app.config import Settings


class RecordedVersion(Protocol):
    """What an embedding version row keeps of its encoder (app.db.models.EmbeddingVersion)."""

    @property
    def encoder_id(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def pretrained(self) -> str: ...

RANDOM = "random"


@dataclass(frozen=True)
class EncoderId:
    model: str
    pretrained: str = ""  # "" = random init; else an open_clip tag or a checkpoint file ("file" when parsed)
    seed: int | None = None  # random init only: the seed that rebuilds the same weights

    @property
    def is_random(self) -> bool:
        return not self.pretrained

    @property
    def label(self) -> str:
        """``<model>/<pretrained or "random">``: how a job names its encoder before any model is loaded."""
        return f"{self.model}/{self.pretrained or RANDOM}"

    @classmethod
    def parse(cls, encoder_id: str) -> EncoderId:
        """The parts of an encoder id; a random-init id (``…/random/s<seed>``) gives its seed, others none."""
        parts = encoder_id.rsplit("/", 2)  # a model name may hold a "/" (hf-hub:org/name): split from the right
        model, weights, tail = (parts + ["", ""])[:3] if len(parts) < 3 else parts
        if weights == RANDOM:
            seed = int(tail[1:]) if tail.startswith("s") and tail[1:].isdigit() else None
            return cls(model, "", seed)
        return cls(model, weights)

    @classmethod
    def of_version(cls, version: RecordedVersion) -> EncoderId:
        """A recorded version (its id, model, and pretrained as configured): what rebuilds its encoder."""
        return cls(version.model, version.pretrained, cls.parse(version.encoder_id).seed)

    @classmethod
    def from_settings(cls, settings: Settings) -> EncoderId:
        """The configured encoder (the seed only for random weights)."""
        seed = settings.random_init_seed if settings.is_random_init else None
        return cls(settings.clip_model, settings.clip_pretrained, seed)

    def format(self) -> str:
        """The encoder id of random weights; trained weights' ids end in a digest only the loaded encoder has."""
        if not self.is_random or self.seed is None:
            raise ValueError(f"{self.label}: only a random-init encoder with a seed has an id without its weights")
        return f"{self.model}/{RANDOM}/s{self.seed}"

    def settings_update(self) -> dict[str, Any]:
        """The settings fields that select this encoder (device and precision stay as configured)."""
        update: dict[str, Any] = {"clip_model": self.model, "clip_pretrained": self.pretrained}
        if self.seed is not None:
            update["random_init_seed"] = self.seed
        return update
