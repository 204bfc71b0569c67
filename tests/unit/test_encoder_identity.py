"""The encoder's identity as a value: parsed from and formatted to the id the memory is versioned by."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from app.encoder_identity import EncoderId


@pytest.mark.parametrize(("encoder_id", "expected"), [
    ("reco-tiny/random/s7", EncoderId("reco-tiny", "", 7)),
    ("hf-hub:org/name/random/s0042", EncoderId("hf-hub:org/name", "", 42)),
    ("ViT-B-32/openai/0123456789ab", EncoderId("ViT-B-32", "openai")),
    ("ViT-B-32/file/0123456789ab", EncoderId("ViT-B-32", "file")),
    ("reco-tiny/random/sx", EncoderId("reco-tiny", "", None)),  # no seed to rebuild from
    ("reco-tiny/random", EncoderId("reco-tiny", "", None)),  # a job's label, not an id
    ("reco-tiny/random/s7/x", EncoderId("reco-tiny/random", "s7")),
])
def test_parse(encoder_id: str, expected: EncoderId) -> None:
    assert EncoderId.parse(encoder_id) == expected


def test_random_ids_round_trip_and_trained_ones_need_their_digest() -> None:
    assert EncoderId.parse(EncoderId("reco-tiny", "", 7).format()) == EncoderId("reco-tiny", "", 7)
    assert EncoderId("reco-tiny", "", 7).format() == "reco-tiny/random/s7"
    with pytest.raises(ValueError):
        EncoderId("ViT-B-32", "openai").format()


def test_label_and_version() -> None:
    assert EncoderId("ViT-B-32", "openai").label == "ViT-B-32/openai"
    assert EncoderId("reco-tiny", "", 3).label == "reco-tiny/random"
    version = SimpleNamespace(encoder_id="reco-tiny/random/s9", model="reco-tiny", pretrained="")
    assert EncoderId.of_version(version) == EncoderId("reco-tiny", "", 9)
    trained = SimpleNamespace(encoder_id="m/file/abc", model="m", pretrained="/w/m.pt")
    assert EncoderId.of_version(trained) == EncoderId("m", "/w/m.pt", None)
    assert EncoderId("m", "/w/m.pt").settings_update() == {"clip_model": "m", "clip_pretrained": "/w/m.pt"}
    assert EncoderId("m", "", 4).settings_update() == {"clip_model": "m", "clip_pretrained": "", "random_init_seed": 4}
