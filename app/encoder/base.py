"""The one encoder interface every part of the system uses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image


@runtime_checkable
class Encoder(Protocol):
    """A frozen dual encoder. Outputs are float32, L2-normalised, shape (n, dim)."""

    @property
    def encoder_id(self) -> str:
        """Names model, weights and checkpoint hash; it is the embedding version."""
        ...

    @property
    def dim(self) -> int: ...

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB image to the model's input tensor (C, H, W)."""
        ...

    def encode_images(self, images: Sequence[Image.Image] | torch.Tensor) -> np.ndarray:
        """PIL images, or a batch already passed through :meth:`preprocess`."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def l2_normalise(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return torch.nn.functional.normalize(x, dim=-1).cpu().numpy().astype(np.float32, copy=False)
