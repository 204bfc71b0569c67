"""``reco ui`` and :func:`ui.cli.launch_ui`: settings travel to the server as RECO_* variables,
headless without a display, a taken port is refused before anything starts."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.config import Settings
from ui.cli import UILaunchError, default_headless, launch_ui, settings_env, streamlit_command


def test_settings_survive_the_trip_through_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(data_dir=tmp_path, allowed_roots=[tmp_path / "a"], qdrant_api_key="k3y", ui_use_workers=True,
                        k_infer=7, near_duplicate_threshold=0.9)
    env = settings_env(settings, {"RECO_QDRANT_URL": "http://stale:6333", "PATH": "/bin", "RECO_TEST_X": "kept"})
    assert "RECO_QDRANT_URL" not in env and env["PATH"] == "/bin" and env["RECO_TEST_X"] == "kept"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    again = Settings()
    assert again.model_dump(mode="json") == settings.model_dump(mode="json")
    assert again.qdrant_api_key is not None and again.qdrant_api_key.get_secret_value() == "k3y"


def test_headless_follows_the_display(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert default_headless()
    monkeypatch.setenv("DISPLAY", ":0")
    assert not default_headless()


def test_command_binds_localhost_and_caps_uploads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMLIT_SERVER_ADDRESS", raising=False)
    command = streamlit_command(Settings(data_dir=tmp_path, upload_max_total_bytes=5 * 2**20), 8600, True)
    assert command[3:5] == ["run", str(Path(__file__).resolve().parents[2] / "ui" / "app.py")]
    joined = " ".join(command)
    assert "--server.port 8600" in joined and "--server.headless true" in joined
    assert "--server.address 127.0.0.1" in joined and "--server.maxUploadSize 5" in joined
    monkeypatch.setenv("STREAMLIT_SERVER_ADDRESS", "0.0.0.0")
    assert "--server.address" not in streamlit_command(Settings(data_dir=tmp_path), 8600, True)


def test_a_taken_port_is_refused(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UILaunchError, match="already in use"):
            launch_ui(Settings(data_dir=tmp_path), taken.getsockname()[1], block=False)


def test_reco_ui_help() -> None:
    from app.cli import cli

    result = CliRunner().invoke(cli, ["ui", "--help"])
    assert result.exit_code == 0 and "--headless" in result.output and "--port" in result.output


@pytest.mark.slow
def test_blocking_server_stops_on_sigterm(tmp_path: Path) -> None:
    """`reco ui` in the foreground (PID 1 in a container): SIGTERM stops the Streamlit child too."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {"RECO_DATA_DIR": str(tmp_path / "data")}
    code = f"from app.config import get_settings; from ui.cli import launch_ui; launch_ui(get_settings(), {port})"
    parent = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 90
        while True:
            assert parent.poll() is None and time.monotonic() < deadline, "the UI did not come up"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 0
        assert _port_free_soon(port), "the Streamlit child outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def _port_free_soon(port: int, timeout_s: float = 10.0) -> bool:
    import time

    from ui.cli import port_free

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_free(port):
            return True
        time.sleep(0.2)
    return False
