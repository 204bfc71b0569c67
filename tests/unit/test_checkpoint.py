"""Fusion checkpoints round-trip; a tampered file or a pickle with a payload is refused."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from app.encoder.weights import UnsafeCheckpointError
from app.fusion.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, read_checkpoint, save_checkpoint
from app.fusion.config import get_fusion_config
from app.fusion.model import RecoFusion


def _model() -> RecoFusion:
    torch.manual_seed(0)
    return RecoFusion(get_fusion_config("reco-fusion-b"), 32)


def _meta(model: RecoFusion) -> CheckpointMeta:
    return CheckpointMeta(config=model.cfg.to_dict(), dim=model.dim, encoder_id="reco-tiny/random/s0",
                          memory_version="exact:10:abc", metrics={"final_loss": 1.5},
                          options={"retrieval": {"search": "uni", "fusion": "cross", "dedupe_by_image": True}})


def test_round_trip_keeps_weights_and_metadata(tmp_path: Path) -> None:
    model = _model()
    sha = save_checkpoint(tmp_path / "f.safetensors", model, _meta(model))
    loaded, meta = load_checkpoint(tmp_path / "f.safetensors", expected_sha256=sha)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert meta == _meta(model) and meta.fusion_cfg == model.cfg
    assert not loaded.training


def test_a_modified_file_is_refused(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "f.safetensors"
    sha = save_checkpoint(path, model, _meta(model))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one weight byte
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path, expected_sha256=sha)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(data[20:]))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_with_a_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {}, "meta": {}, "x": _Exploit(marker)}, fh, protocol=2)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(path)
    torch.save({"state_dict": {}, "meta": {}, "x": _Exploit(marker)}, tmp_path / "evil2.pt")
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(tmp_path / "evil2.pt")
    assert not marker.exists()


def test_a_weights_only_torch_file_loads(tmp_path: Path) -> None:
    model = _model()
    meta = _meta(model)
    torch.save({"state_dict": model.state_dict(), "meta": {**meta.__dict__}}, tmp_path / "ok.pt")
    loaded, got = load_checkpoint(tmp_path / "ok.pt")
    assert got.encoder_id == meta.encoder_id
    assert torch.equal(loaded.logit_scale, model.logit_scale)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path: Path) -> None:
    model = _model()
    meta = _meta(model)
    meta.config = {**meta.config, "mlp_dim": 64}  # the config says 64 hidden units, the weights have 32
    save_checkpoint(tmp_path / "f.safetensors", model, meta)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / "f.safetensors")
