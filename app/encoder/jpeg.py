"""JPEG batches decoded by torchvision on the encoder's device (nvJPEG on CUDA), resized and cropped there.

Used by the GPU path (``reco bench gpu``-style runs and CUDA embed workers that opt in): the CPU's two
cores cannot decode and resize 2,500+ images/s, the GPU can. The result is a (B, 3, S, S) uint8 tensor
for :meth:`OpenClipEncoder.pixels_from_uint8`. Resizing is torchvision's bicubic with antialiasing on
tensors, close to (not bit-identical with) PIL's, so GPU-decoded embeddings differ slightly from the
CPU path's (tested on CPU: mean cosine of the embeddings). Anything torchvision cannot decode (not a
JPEG, CMYK, corrupt) is reported as None for that item so the caller can fall back to the safe PIL path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch


def gpu_jpeg_decoding_available() -> bool:
    """True where CUDA is visible and this torchvision can decode JPEGs on it."""
    if not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True


def _resize_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tf

    resized = tf.resize(image, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return cast(torch.Tensor, tf.center_crop(resized, [size, size]))


def decode_jpeg_batch(
    data: Sequence[bytes], size: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor | None, list[int]]:
    """(uint8 batch (B', 3, size, size) on ``device``, indices of ``data`` it holds): the rest failed."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    if device.type == "cuda" and not gpu_jpeg_decoding_available():
        raise RuntimeError("GPU JPEG decoding needs CUDA and torchvision's nvJPEG support")
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
    images: list[torch.Tensor] = []
    kept: list[int] = []
    try:  # one call for the batch (nvJPEG batches it); on a bad item, one at a time to keep the others
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        pairs = list(enumerate(decoded))
    except RuntimeError:
        pairs = []
        for i, raw in enumerate(encoded):
            try:
                pairs.append((i, decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)))
            except RuntimeError:
                continue
    for i, image in pairs:
        images.append(_resize_crop(image, size))
        kept.append(i)
    return (torch.stack(images) if images else None), kept
