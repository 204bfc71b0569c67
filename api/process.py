"""Starting ``reco serve`` as a child process and waiting until it announced itself (``reco demo``, tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from app.config import Settings

RECO = [sys.executable, "-c", "from app.cli import main; main()"]


class ServerLaunchError(RuntimeError):
    """``reco serve`` exited or did not announce itself in time (its log says why)."""


def start_server(settings: Settings, *, port: int | None = None, log: IO[bytes] | None = None,
                 env: dict[str, str] | None = None, timeout_s: float = 180.0) -> tuple[subprocess.Popen[bytes], str]:
    """``reco serve`` in its own process group; returns it and its URL once ``serve.json`` names it."""
    from app.child_env import port_free, settings_env

    chosen = settings.api_port if port is None else port
    if chosen and not port_free(chosen, settings.api_host):
        chosen = 0  # taken: any free port (clients find the server through the data dir anyway)
    announcement = Path(settings.data_dir) / "serve.json"
    base = dict(os.environ) | env if env is not None else settings_env(settings)
    child_env = base | {"RECO_SERVE_EXIT_WITH_PID": str(os.getpid())}
    process = subprocess.Popen([*RECO, "serve", "--port", str(chosen)], env=child_env,
                               stdout=log, stderr=subprocess.STDOUT if log is not None else None,
                               start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            data = json.loads(announcement.read_text())
            if data.get("pid") == process.pid:
                return process, str(data["url"])
        except (OSError, ValueError):
            pass
        if process.poll() is not None:
            raise ServerLaunchError(f"reco serve exited with code {process.returncode} before it was ready")
        time.sleep(0.2)
    stop_server(process)
    raise ServerLaunchError(f"reco serve did not announce itself within {timeout_s:.0f} s")


def stop_server(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """SIGTERM (graceful: the engine flushes, the announcement is withdrawn), SIGKILL after ``timeout_s``."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
