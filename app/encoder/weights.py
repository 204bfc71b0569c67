"""Checkpoint files: hashing, weights-only loading, and this project's own (model, tag) registry."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

# (model, tag) -> file relative to this folder and its sha256. Issue "base model" adds entries.
PRETRAINED_DIR = Path(__file__).with_name("checkpoints")
REGISTERED_TAGS: dict[tuple[str, str], tuple[str, str]] = {}


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that would need arbitrary code (pickle globals) to load."""


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Safetensors, or a torch file under ``weights_only=True`` (a pickle payload is refused)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError for disallowed globals
        raise UnsafeCheckpointError(f"refusing to load {path}: not a weights-only checkpoint ({exc})") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UnsafeCheckpointError(f"{path} holds {type(obj).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def resolve_registered_tag(model: str, tag: str) -> tuple[Path, str] | None:
    entry = REGISTERED_TAGS.get((model, tag))
    if entry is None:
        return None
    rel, sha = entry
    path = PRETRAINED_DIR / rel
    if not path.is_file():
        raise FileNotFoundError(f"registered weights {model}/{tag} expected at {path}")
    return path, sha


def write_model_card(path: Path, card: dict[str, object]) -> None:
    path.write_text(json.dumps(card, indent=2) + "\n")
