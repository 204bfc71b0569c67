"""Checkpoint files: hashing, weights-only loading, and this project's own (model, tag) registry."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch

# (model, tag) -> file relative to PRETRAINED_DIR and its sha256: the project's own trained weights, named
# like open_clip's tags (data_samples_batch). Each file has a .json report and a .md model card beside it.
PRETRAINED_DIR = Path(__file__).with_name("checkpoints")
REGISTERED_TAGS: dict[tuple[str, str], tuple[str, str]] = {
    ("reco-base", "flickr8k_s229k_b128_r128"): (
        "reco-base-flickr8k_s229k_b128_r128.safetensors",
        "d8a378a36bbd49bc8ef818768035ba17550932923e285f9a7beaf23878bf3b56",
    ),
}


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


# A checkpoint may leave out a frozen tower that loads from an installed package (the base model's
# MiniLM text tower, 87 MB, would not fit a committed file). Its safetensors metadata names the left-out
# key prefix, the packaged HF model and the sha256 of that package's weights file.
META_OMITTED_PREFIX = "reco.omitted_prefix"
META_OMITTED_MODEL = "reco.omitted_hf_model"
META_OMITTED_SHA = "reco.omitted_weights_sha256"


class OmittedWeightsError(RuntimeError):
    """The package that should supply a checkpoint's left-out tower is missing or holds other weights."""


def checkpoint_metadata(path: Path) -> dict[str, str]:
    """String metadata of a safetensors file; {} for other formats."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


@lru_cache(maxsize=8)
def _cached_sha256(path: Path, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def omitted_prefix_verified(path: Path) -> str:
    """'' for a complete checkpoint; else the prefix of keys the checkpoint leaves out, once the package
    that supplies them is found and its weights file has the recorded sha256."""
    meta = checkpoint_metadata(path)
    prefix = meta.get(META_OMITTED_PREFIX, "")
    if not prefix:
        return ""
    from app.encoder.registry import packaged_hf_model_dir

    hf_name = meta.get(META_OMITTED_MODEL, "")
    folder = packaged_hf_model_dir(hf_name)
    weights = folder / "model.safetensors" if folder is not None else None
    if weights is None or not weights.is_file():
        raise OmittedWeightsError(f"{path} needs the packaged text tower {hf_name!r}, which is not installed")
    stat = weights.stat()
    actual = _cached_sha256(weights, stat.st_size, stat.st_mtime_ns)
    if actual != meta.get(META_OMITTED_SHA):
        raise OmittedWeightsError(
            f"{path} was trained with {hf_name} weights sha256 {meta.get(META_OMITTED_SHA)}, "
            f"but {weights} has {actual}"
        )
    return prefix
