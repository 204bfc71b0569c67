"""Fusion checkpoints: weights and metadata in one file, loaded without running any pickled code.

Format: a safetensors file whose header metadata holds ``reco_meta`` = JSON of :class:`CheckpointMeta`
(fusion config, dim, encoder id, memory version, training metrics, options). One file means one
sha256 covers weights and metadata, and that hash is what the metadata DB registers.

A torch file (``.pt``/``.pth``) holding ``{"state_dict": ..., "meta": {...}}`` is accepted too, through
``torch.load(weights_only=True)``, which refuses any pickle that would import or call something.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from app.encoder.weights import UnsafeCheckpointError, file_sha256
from app.fusion.config import FusionCfg
from app.fusion.model import RecoFusion

FORMAT_VERSION = 1
META_KEY = "reco_meta"


class CheckpointError(RuntimeError):
    """A fusion checkpoint that is unreadable, tampered with, or does not fit."""


@dataclass
class CheckpointMeta:
    config: dict[str, Any]
    dim: int
    encoder_id: str
    memory_version: str
    metrics: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # training options and retrieval switches
    format_version: int = FORMAT_VERSION
    # Chosen on validation after training (issue 16): {"fallback": {"image": tau, "text": tau} | None,
    # "softmax_scale": {"clip": s, "image": s, "text": s, "both": s}, "validation": what it was chosen on}.
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def fusion_cfg(self) -> FusionCfg:
        return FusionCfg.from_dict(self.config)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"unsupported fusion checkpoint metadata: {str(data)[:200]}")
        return cls(**data)


def save_checkpoint(path: Path, model: RecoFusion, meta: CheckpointMeta) -> str:
    """Write ``path`` (.safetensors) and return its sha256."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"fusion checkpoints are written as .safetensors, not {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp), metadata={META_KEY: meta.to_json()})
    tmp.replace(path)  # readers never see half a file
    return file_sha256(path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            state = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open is no dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    if META_KEY not in header:
        raise CheckpointError(f"{path} has no RECO metadata (is it a fusion checkpoint?)")
    return state, CheckpointMeta.from_json(header[META_KEY])


def _read_torch_file(path: Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for any global the weights-only unpickler does not allow
        raise UnsafeCheckpointError(f"refusing to load {path}: not a weights-only checkpoint ({exc})") from exc
    if not (isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and isinstance(obj.get("meta"), dict)):
        raise CheckpointError(f"{path} does not hold {{'state_dict', 'meta'}}")
    return obj["state_dict"], CheckpointMeta.from_json(json.dumps(obj["meta"]))


def read_checkpoint(
    path: Path, *, expected_sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """State dict and metadata; ``expected_sha256`` (from the DB registry) catches a swapped file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"fusion checkpoint not found: {path}")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise CheckpointError(f"{path} does not match its registered sha256 (modified after registration?)")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch_file(path)


def load_checkpoint(
    path: Path, *, expected_sha256: str | None = None, device: str | torch.device = "cpu"
) -> tuple[RecoFusion, CheckpointMeta]:
    """Rebuild the fusion model from its config and load the weights (strict: every tensor must fit)."""
    state, meta = read_checkpoint(path, expected_sha256=expected_sha256)
    try:
        model = RecoFusion(meta.fusion_cfg, meta.dim)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} does not fit its own config: {exc}") from exc
    return model.to(device).eval(), meta


# --- the committed default checkpoints (issue 16) -------------------------------------------------------
COMMITTED_DIR = Path(__file__).with_name("checkpoints")
# A checkpoint trained on fewer pairs than this is never picked up silently as an encoder's default (the
# clothing-sample fusion the demo used to train had 800 pairs and cut Flickr8k R@1 from 13.2 % to 1.9 %).
MIN_DEFAULT_PAIRS = 5000


def trained_pairs(metrics: dict[str, Any]) -> int:
    """How many pairs a checkpoint was trained on (0 when its metrics do not say)."""
    try:
        return int(metrics.get("pairs") or 0)
    except (TypeError, ValueError):
        return 0


def _encoder_of(path: Path) -> str | None:
    """The encoder id in a checkpoint's header (the tensors are not read)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
        return str(json.loads(header[META_KEY]).get("encoder_id"))
    except (SafetensorError, OSError, ValueError, KeyError):
        return None


def committed_checkpoint_for(encoder_id: str, folder: Path = COMMITTED_DIR) -> Path | None:
    """The default fusion checkpoint shipped with the repo for this encoder (checkpoints are tied to an encoder)."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        if _encoder_of(path) == encoder_id:
            return path
    return None
