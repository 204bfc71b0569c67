"""What a child process of ours needs from its parent: the settings as ``RECO_*`` variables, a free port.

``reco serve``, ``reco ui`` and ``reco demo`` start each other as subprocesses; the child must see the
caller's settings (overrides made in code included), so every field travels as its environment variable.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from pydantic import SecretStr

from app.config import Settings


def _env_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str)
    return str(value)


def settings_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this environment) with every settings field as ``RECO_<FIELD>``; unset fields removed."""
    env = dict(os.environ if base is None else base)
    for name in Settings.model_fields:
        key = f"RECO_{name.upper()}"
        env.pop(key, None)
        value = getattr(settings, name)
        if value is not None:
            env[key] = _env_value(value)
    return env


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
