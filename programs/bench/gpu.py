"""GPU embedding throughput: ViT-B-32 in fp16 with parallel decoding (only where a GPU is visible).

Decode threads do the PIL stage only (:meth:`OpenClipEncoder.preprocess_uint8`: decode, resize, crop
to uint8); the batch goes to the GPU as uint8 (a quarter of float32's bytes over PCIe) and is
normalised there (:meth:`OpenClipEncoder.pixels_from_uint8`). Where torchvision can decode JPEGs on the
GPU (nvJPEG), a second end-to-end figure decodes, resizes and crops there too (:mod:`app.encoder.jpeg`):
the CPU threads only read bytes. The anchor is clip-retrieval's reported 2,500 images/s per A100 for B/32,
bottlenecked by resizing. Without a GPU this reports "not run" (nothing here was run on a GPU yet).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.encoder.jpeg import decode_jpeg_batch, gpu_jpeg_decoding_available
from app.encoder.openclip import OpenClipEncoder
from app.imaging import ImageLimits, open_image_safely
from programs.bench.common import gpu_name, load_average
from programs.bench.ingest import build_encoder, first_images

PEER_ANCHOR_IMG_S = 2500.0


def _uint8_batches(encoder: OpenClipEncoder, files: list[Path], batch: int, workers: int) -> Iterator[np.ndarray]:
    limits = ImageLimits()

    def stage(path: Path) -> np.ndarray:
        out = encoder.preprocess_uint8(open_image_safely(path.read_bytes(), limits))
        if out is None:
            raise RuntimeError(f"{encoder.model_name}: preprocessing cannot be split")
        return out

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpu-decode") as pool:
        for start in range(0, len(files), batch):
            yield np.stack(list(pool.map(stage, files[start: start + batch])))


def run_gpu_bench(
    images: Path, n: int = 1000, *, batch: int = 256, workers: int | None = None, device: str = "cuda",
    model: str = "ViT-B-32",
) -> dict[str, Any]:
    """End-to-end img/s (decode included, model load excluded) and encoder-only img/s on the same images."""
    if device == "cuda" and not torch.cuda.is_available():
        return {"status": "not run: no GPU", "anchor_img_s": PEER_ANCHOR_IMG_S}
    encoder = build_encoder(model, device=device, batch=batch)
    files = first_images(images, n)
    workers = workers or os.cpu_count() or 1
    for warm in _uint8_batches(encoder, files[:batch], batch, workers):  # warm-up: kernels, page cache
        encoder.encode_images(encoder.pixels_from_uint8(warm))
    _sync(encoder)
    start = time.perf_counter()
    for chunk in _uint8_batches(encoder, files, batch, workers):
        encoder.encode_images(encoder.pixels_from_uint8(chunk))
    _sync(encoder)
    end_to_end_s = time.perf_counter() - start
    pixels = torch.cat([encoder.pixels_from_uint8(c) for c in _uint8_batches(encoder, files, batch, workers)])
    _sync(encoder)
    start = time.perf_counter()
    encoder.encode_images(pixels)
    _sync(encoder)
    encoder_s = time.perf_counter() - start
    rate = n / end_to_end_s
    gpu_decode = _gpu_decode_img_s(encoder, files, batch, workers) if gpu_jpeg_decoding_available() else None
    return {"status": "ok", "device": gpu_name() or device, "precision": encoder.runtime.label, "n": n, "batch": batch,
            "decode_workers": workers, "end_to_end_img_s": round(rate, 1), "gpu_decode_img_s": gpu_decode,
            "encoder_only_img_s": round(n / encoder_s, 1), "anchor_img_s": PEER_ANCHOR_IMG_S,
            "vs_anchor": round(rate / PEER_ANCHOR_IMG_S, 3), "load_avg_end": load_average()}


def _gpu_decode_img_s(encoder: OpenClipEncoder, files: list[Path], batch: int, workers: int) -> float:
    """End to end with JPEG decoding, resizing and cropping on the GPU; CPU threads read bytes only."""
    size = encoder.image_size

    def chunks() -> Iterator[list[bytes]]:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpu-read") as pool:
            for start in range(0, len(files), batch):
                yield list(pool.map(Path.read_bytes, files[start: start + batch]))

    def run() -> None:
        for data in chunks():
            pixels, _ = decode_jpeg_batch(data, size, encoder.device)
            if pixels is not None:
                encoder.encode_images(encoder.pixels_from_uint8(pixels))
        _sync(encoder)

    run()  # warm-up: nvJPEG handles, kernels, page cache
    start = time.perf_counter()
    run()
    return round(len(files) / (time.perf_counter() - start), 1)


def _sync(encoder: OpenClipEncoder) -> None:
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
