"""``reco ui``: the Streamlit app as a subprocess (registered through the ``reco.cli`` entry point).

:func:`launch_ui` is also what ``reco demo`` ends with. The child gets the caller's settings as ``RECO_*``
variables (so overrides made in code survive), binds 127.0.0.1 unless ``STREAMLIT_SERVER_ADDRESS`` says
otherwise, and runs headless (no browser opened) when there is no display.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Annotated

import typer

from app.child_env import port_free, settings_env
from app.config import Settings

__all__ = ["UILaunchError", "default_headless", "launch_ui", "port_free", "settings_env", "streamlit_command"]

APP_PATH = Path(__file__).resolve().parent / "app.py"
HEALTH_PATH = "/_stcore/health"


class UILaunchError(RuntimeError):
    """The UI could not start (port taken, the server died, or it never answered)."""


def default_headless() -> bool:
    """Headless (no browser opened) on Linux/BSD without an X11 or Wayland display; macOS/Windows have one."""
    if sys.platform.startswith(("linux", "freebsd", "openbsd")):
        return not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return False


def streamlit_command(settings: Settings, port: int, headless: bool) -> list[str]:
    max_upload_mb = max(1, math.ceil(settings.upload_max_total_bytes / 2**20))
    command = [sys.executable, "-m", "streamlit", "run", str(APP_PATH), "--server.port", str(port),
               "--server.headless", "true" if headless else "false", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--server.runOnSave", "false", "--client.toolbarMode", "viewer",
               "--server.maxUploadSize", str(max_upload_mb)]
    if "STREAMLIT_SERVER_ADDRESS" not in os.environ:
        command += ["--server.address", "127.0.0.1"]
    return command


def wait_until_ready(process: subprocess.Popen[bytes], port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{port}{HEALTH_PATH}"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UILaunchError(f"the UI server exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:  # noqa: S310 - our own localhost server
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    stop_ui(process)
    raise UILaunchError(f"the UI server did not answer on port {port} within {timeout_s:.0f} s")


def stop_ui(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def launch_ui(
    settings: Settings,
    port: int,
    block: bool = True,
    *,
    headless: bool | None = None,
    log: IO[bytes] | None = None,
    ready_timeout_s: float = 90.0,
) -> subprocess.Popen[bytes] | None:
    """Start the UI on ``port``. ``block``: serve until Ctrl-C (returns None); else return the running
    process once it answers its health check (the caller stops it, e.g. with :func:`stop_ui`)."""
    if not port_free(port):
        raise UILaunchError(f"port {port} is already in use (choose another with --port or RECO_UI_PORT)")
    settings.ensure_dirs()
    command = streamlit_command(settings, port, default_headless() if headless is None else headless)
    stderr = subprocess.STDOUT if log is not None else None
    process = subprocess.Popen(command, env=settings_env(settings), stdout=log, stderr=stderr)
    if not block:
        wait_until_ready(process, port, ready_timeout_s)
        return process
    # SIGTERM (docker stop; PID 1 ignores it without a handler) stops the server as Ctrl-C does
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        code = process.wait()
    except KeyboardInterrupt:
        return None
    finally:
        stop_ui(process)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if code != 0:
        raise UILaunchError(f"the UI server exited with code {code}")
    return None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def ui(
    port: Annotated[int | None, typer.Option(help="Port (default RECO_UI_PORT).")] = None,
    headless: Annotated[bool | None, typer.Option("--headless/--no-headless",
                                                  help="Do not open a browser (default: when there is no display).")]
    = None,
    server: Annotated[bool, typer.Option("--server/--no-server", help="Start `reco serve` when none runs, so other "
                                         "commands can use the memory while the UI does (default).")] = True,
) -> None:
    """Start the web UI (Streamlit): predict, search, memory, ingestion, evaluation, operations."""
    from app.cli._common import fail, load_settings  # not at import: app.cli loads this module as a plugin
    from app.remote import find_server

    settings = load_settings()
    chosen = port or settings.ui_port
    started = None
    if server and not settings.qdrant_url and not settings.ui_use_workers and find_server(settings) is None:
        from api.process import ServerLaunchError, start_server, stop_server

        log_path = Path(settings.data_dir) / "logs" / "serve.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        typer.echo(f"starting reco serve, the memory's owner (log {log_path}) …")
        try:
            with log_path.open("ab") as log:
                started, url = start_server(settings, log=log)
        except ServerLaunchError as exc:
            fail(f"{exc} (see {log_path}; or run with --no-server)", code=1)
        typer.echo(f"reco serve at {url}: the UI and every other command go through it")
    typer.echo(f"RECO UI on http://127.0.0.1:{chosen} (Ctrl-C to stop)")
    try:
        launch_ui(settings, chosen, block=True, headless=headless)
    except UILaunchError as exc:
        fail(str(exc))
    finally:
        if started is not None:
            stop_server(started)


def register(cli: typer.Typer) -> None:
    cli.command("ui")(ui)
