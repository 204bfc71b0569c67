"""This project's model architectures are open_clip JSON configs, registered like open_clip's own."""

from __future__ import annotations

import threading
from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
_registered = False
_lock = threading.Lock()


def ensure_model_configs_registered() -> None:
    global _registered
    if _registered:
        return
    with _lock:
        if not _registered:
            import open_clip

            open_clip.add_model_config(MODEL_CONFIG_DIR)
            _registered = True


def list_reco_models() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
