"""How the image tower runs (app/encoder/runtime.py): the defaults per family, the int8 rewrite, the GPU
path's pieces that run on CPU, the peer benchmark's bookkeeping — and the quality bounds of the chosen
CPU default for the base encoder against fp32 on real images (cosine and neighbour agreement)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from app.config import BASE_MODEL, BASE_PRETRAINED
from app.encoder import OpenClipEncoder
from app.encoder.jpeg import decode_jpeg_batch
from app.encoder.runtime import LinearSelfAttention, Runtime, default_runtime, resolve_runtime
from programs.bench.peer import _peer_result
from programs.bench.precision import GOALS, meets_goals, quality_against, topk_agreement
from programs.pretrain.data import CaptionedImages, load_image, read_manifest
from tests.conftest import SHARED_DATA

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
FLICKR = SHARED_DATA / "flickr8k"


def test_defaults_per_device_and_family_and_explicit_settings_win() -> None:
    assert default_runtime(CPU, "conv") == Runtime(channels_last=True)
    assert default_runtime(CPU, "vit") == Runtime()  # int8 fails the quality goals on trained weights
    assert default_runtime(CUDA, "vit") == Runtime(precision="fp16")
    assert resolve_runtime(CPU, "conv", precision="int8", channels_last="off") == Runtime(precision="int8")
    assert resolve_runtime(CPU, "vit", compile_model=True, threads=1) == Runtime(compile=True, threads=1)
    with pytest.raises(ValueError, match="CUDA"):
        resolve_runtime(CPU, "vit", precision="fp16")
    with pytest.raises(ValueError, match="CPU only"):
        resolve_runtime(CUDA, "vit", precision="int8")


def test_linear_self_attention_computes_what_multihead_attention_does() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(3, 7, 32)
    with torch.inference_mode():
        expected = mha(x, x, x, need_weights=False)[0]
        got = LinearSelfAttention(mha)(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_int8_replaces_every_linear_of_the_image_tower_and_only_there() -> None:
    fp32 = OpenClipEncoder("reco-tiny", "", precision="fp32")
    int8 = OpenClipEncoder("reco-tiny", "", precision="int8")
    assert int8.runtime == Runtime(precision="int8") and fp32.runtime == Runtime()
    visual = [type(m) for m in int8.image_tower.modules()]
    assert nn.Linear not in visual and nn.MultiheadAttention not in visual
    assert any("DynamicQuantized" in t.__module__ + t.__name__ or "quantized" in t.__module__ for t in visual)
    images = torch.randn(6, 3, fp32.image_size, fp32.image_size)
    a, b = fp32.encode_images(images), int8.encode_images(images)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert float((a * b).sum(1).min()) > 0.99
    np.testing.assert_array_equal(fp32.encode_texts(["a dog"]), int8.encode_texts(["a dog"]))  # text untouched


def test_uint8_tensor_batch_normalises_like_the_array_path(tiny_encoder: OpenClipEncoder) -> None:
    batch = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    torch.testing.assert_close(tiny_encoder.pixels_from_uint8(torch.from_numpy(batch).permute(0, 3, 1, 2)),
                               tiny_encoder.pixels_from_uint8(batch))


def test_jpeg_batch_decoded_by_torchvision_is_close_to_the_pil_path(tiny_encoder: OpenClipEncoder) -> None:
    files = sorted((FLICKR / "images").glob("*.jpg"))[:4]
    data = [f.read_bytes() for f in files] + [b"not a jpeg"]
    pixels, kept = decode_jpeg_batch(data, 32, "cpu")
    assert kept == [0, 1, 2, 3] and pixels is not None and pixels.shape == (4, 3, 32, 32)
    assert pixels.dtype == torch.uint8
    pil = np.stack([tiny_encoder.preprocess_uint8(load_image(f)) for f in files])
    diff = np.abs(pixels.permute(0, 2, 3, 1).numpy().astype(int) - pil.astype(int))
    assert diff.mean() < 6  # bicubic with antialiasing on tensors vs PIL's: close, not bit-identical


def test_peer_result_reports_median_spread_and_encoder_ratio() -> None:
    runs = [{"round": i, "reco_s": s, "peer_s": p, "reco_images": 100, "peer_images": 100, "peer_loop_s": 5.0,
             "encoder_fp32_s": e, "encoder_fp32_images": 50, "reco_load_start": [1.0, 1.0, 1.0]}
            for i, (s, p, e) in enumerate([(10.0, 20.0, 10.0), (8.0, 20.0, 5.0), (12.0, 15.0, 5.0)])]
    result = _peer_result(runs, {}, Path("w"), "fp32+channels-last")
    assert result.reco_img_s == 10.0 and result.peer_img_s == 5.0 and result.ratio == 2.0
    assert result.encoder_fp32_img_s == 10.0 and result.ratio_vs_encoder_fp32 == 1.0
    assert result.details["spread"]["ratio"] == {"median": 2.0, "min": 1.25, "max": 2.5}
    assert [r["ratio"] for r in result.details["rounds"]] == [2.0, 2.5, 1.25]


def test_agreement_and_goals_are_computed_not_assumed() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 16)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert topk_agreement(ref, ref, ref, ref, exclude_self=True) == 1.0
    shuffled = ref[rng.permutation(40)]
    assert topk_agreement(shuffled, shuffled, ref, ref, exclude_self=True) < 0.5
    noisy = ref + 0.3 * rng.standard_normal(ref.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    assert not meets_goals(quality_against({"images": ref}, {"images": noisy}, None))
    assert meets_goals(quality_against({"images": ref}, {"images": ref}, None))


@pytest.mark.slow
def test_the_cpu_default_of_the_base_encoder_keeps_the_quality_bounds() -> None:
    """reco-base (trained) with its CPU default against fp32 on 64 Flickr8k test images and their captions."""
    data = CaptionedImages.from_rows(read_manifest(FLICKR / "manifest.csv", "test")).subset(64)
    fp32 = OpenClipEncoder(BASE_MODEL, BASE_PRETRAINED, device="cpu", precision="fp32", channels_last="off")
    default = OpenClipEncoder(BASE_MODEL, BASE_PRETRAINED, device="cpu")
    assert default.runtime == default_runtime(CPU, "conv") != fp32.runtime
    images = [load_image(p) for p in data.images]
    ref = {"images": fp32.encode_images(images), "texts": fp32.encode_texts(data.captions)}
    mine = {"images": default.encode_images(images), "texts": default.encode_texts(data.captions)}
    quality = quality_against(ref, mine, data.caption_image)
    assert quality["cosine_mean"] >= GOALS["cosine"]
    assert quality["agree_i2i_top10"] >= GOALS["agreement"] and quality["agree_t2i_top10"] >= GOALS["agreement"]
    assert meets_goals(quality)
