from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.encoder import EncoderLoadError, OpenClipEncoder, collection_name_for
from app.encoder.weights import UnsafeCheckpointError, load_state_dict_file


def test_outputs_are_normalised_float32(tiny_encoder: OpenClipEncoder) -> None:
    images = [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (17, 50), (0, 0, 255))]
    v = tiny_encoder.encode_images(images)
    t = tiny_encoder.encode_texts(["a red square", "a blue strip", "a third caption"])
    assert v.shape == (2, tiny_encoder.dim) and t.shape == (3, tiny_encoder.dim)
    assert v.dtype == np.float32 and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert tiny_encoder.encode_texts([]).shape == (0, tiny_encoder.dim)


def test_preprocessed_batch_equals_pil_path(tiny_encoder: OpenClipEncoder) -> None:
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    pixels = torch.stack([tiny_encoder.preprocess(image)])
    np.testing.assert_allclose(tiny_encoder.encode_images(pixels), tiny_encoder.encode_images([image]), atol=1e-6)


def test_random_init_is_deterministic_and_named() -> None:
    a, b = OpenClipEncoder("reco-tiny", "", seed=3), OpenClipEncoder("reco-tiny", "", seed=3)
    assert a.encoder_id == "reco-tiny/random/s3"
    np.testing.assert_array_equal(a.encode_texts(["x"]), b.encode_texts(["x"]))
    assert collection_name_for(a.encoder_id) == "reco__reco-tiny_random_s3"


def test_local_checkpoint_loads_weights_only_and_is_hashed(tmp_path: Path, tiny_encoder: OpenClipEncoder) -> None:
    tiny_encoder.encode_texts(["warm"])
    state = tiny_encoder._model.state_dict()
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, ckpt)
    enc = OpenClipEncoder("reco-tiny", str(ckpt), seed=99)  # seed must not matter: weights come from the file
    assert enc.encoder_id.startswith("reco-tiny/file/") and len(enc.encoder_id.split("/")[-1]) == 12
    np.testing.assert_allclose(enc.encode_texts(["a dog"]), tiny_encoder.encode_texts(["a dog"]), atol=1e-6)


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("pwned",))


def test_pickle_with_payload_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload()}, evil)
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict_file(evil)
    with pytest.raises(UnsafeCheckpointError):
        OpenClipEncoder("reco-tiny", str(evil)).encode_texts(["x"])


def test_bad_names_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(EncoderLoadError, match="unknown model"):
        OpenClipEncoder("no-such-model")
    with pytest.raises(EncoderLoadError, match="unknown pretrained tag"):
        OpenClipEncoder("ViT-B-32", "not_a_tag")
    with pytest.raises(EncoderLoadError, match="not found"):
        OpenClipEncoder("reco-tiny", str(tmp_path / "missing.safetensors"))


def test_open_clip_tag_offline_gives_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    # huggingface_hub reads both at import, which an earlier test may have done: set them where it looks
    # (else it retries the unreachable hub for ~45 s before the same error)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    enc = OpenClipEncoder("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(EncoderLoadError, match="local checkpoint"):
        enc.encode_texts(["x"])


def test_the_model_is_published_last_when_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """``_ensure_loaded`` checks ``_model`` without the lock: a thread that finds it set must find the tokenizer
    and preprocessing set too (a refine request racing the warm-up thread once called a None tokenizer)."""
    import open_clip

    encoder = OpenClipEncoder("reco-tiny", "", seed=0)
    real = open_clip.get_tokenizer
    seen: list[object] = []

    def get_tokenizer(name: str) -> object:
        seen.append(encoder._model)  # what a racing thread would see while the tokenizer is being made
        return real(name)

    monkeypatch.setattr(open_clip, "get_tokenizer", get_tokenizer)
    encoder.encode_texts(["a caption"])
    assert seen == [None]
    assert encoder._tokenizer is not None and encoder._preprocess is not None
