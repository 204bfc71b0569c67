"""The README's first command as a user lives it: ``reco demo`` (reco serve, the sample ingested through it,
CLIP vs RECO, then the UI as the server's client), offline, on embedded defaults.

In the real Chromium, while the demo runs: a RECO prediction and a text search answer in the UI while
``reco ingest`` of 100 more Flickr8k pairs runs in another process and ``reco status --json`` answers; then
the new pairs are found by a search in the UI without a restart. A second ``reco demo`` re-ingests nothing
and reuses the checkpoint. Screenshots go to ``test-artifacts/`` (git-ignored) for a person to look at.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import SHARED_DATA
from tests.integration.workers_support import flickr_manifest
from tests.ui.test_browser import ARTIFACTS, assert_not_blank, chromium  # noqa: F401 - a fixture

ROOT = Path(__file__).resolve().parents[2]
RECO = [sys.executable, "-c", "from app.cli import main; main()"]
SAMPLE_IMAGE = next(p for p in sorted((ROOT / "sample" / "clothing10" / "images").iterdir())
                    if p.name.startswith("val_"))
WAIT_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECO_")}
    return env | {"RECO_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "RECO_ALLOWED_ROOTS": "[]"}


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[dict, str, dict[str, str], Path, Callable[[], None]]]:  # type: ignore[type-arg]
    """``reco demo --json --port P`` running: its JSON result, the UI's URL, the environment, the log, and a
    stop() that presses Ctrl-C (the UI and the server stop with the demo)."""
    port = _free_port()
    env = _env(tmp_path / "data")
    out, log = tmp_path / "demo.out", tmp_path / "demo.log"
    with out.open("wb") as stdout, log.open("wb") as stderr:
        process = subprocess.Popen([*RECO, "demo", "--json", "--port", str(port)], cwd=ROOT, env=env,
                                   stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        result = None
        while result is None:  # the JSON line may be read while it is still being written: wait for all of it
            text = out.read_text()
            # the UI's own lines follow the JSON on stdout: take the first complete JSON line
            for line in text.splitlines(keepends=True):
                if line.startswith("{") and line.endswith("\n"):
                    try:
                        result = json.loads(line)
                        break
                    except json.JSONDecodeError:
                        pass
            if result is not None:
                break
            assert process.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "the demo printed no JSON line in 15 min"
            time.sleep(1)
        # the JSON is printed before the UI starts: wait until the UI listens (a user's browser would retry)
        while not _listening(port):
            assert process.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, f"the UI did not listen on port {port}"
            time.sleep(1)

        def stop() -> None:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()

        yield result, f"http://127.0.0.1:{port}/", env, log, stop
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _body(driver: WebDriver) -> str:
    return str(driver.find_element(By.TAG_NAME, "body").text)


def _shot(driver: WebDriver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.save_screenshot(str(ARTIFACTS / name))
    assert_not_blank(ARTIFACTS / name)


def _search(driver: WebDriver, wait: WebDriverWait, url: str, text: str, *, captions: bool) -> str:
    driver.get(url + "search")
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[aria-label='Text query']"))
    box.clear()
    box.send_keys(text)
    if captions:
        wait.until(lambda d: d.find_element(By.XPATH, "//label[.//p[text()='Captions']]")).click()
    box.send_keys(Keys.ENTER)  # submits the form
    wait.until(lambda _: " results for " in _body(driver))
    return _body(driver)


@pytest.mark.slow
@pytest.mark.browser
def test_readme_command_one_as_a_user_lives_it(demo, chromium: WebDriver, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    result, url, env, log, stop = demo
    # the demo's own report: the committed base encoder, and RECO's point on the sample
    assert result["ingest"]["ingested"] == result["ingest"]["seen"] == 800
    assert result["encoder"]["random_weights"] is False and result["encoder"]["model"] == "reco-base"
    top1 = {r["mode"]: r["value"] for r in result["evaluation"]["results"] if r["metric"] == "top1"}
    assert set(top1) == {"clip", "image", "text", "both"} and max(top1["text"], top1["both"]) > top1["clip"] + 0.05
    assert result["server"].startswith("http://127.0.0.1:")

    # another process ingests 100 more Flickr8k pairs through the server while the UI is used
    manifest = flickr_manifest(SHARED_DATA, tmp_path / "flickr100", 100)
    ingest = subprocess.Popen([*RECO, "ingest", str(manifest), "--json"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    driver = chromium
    wait = WebDriverWait(driver, WAIT_S)
    driver.get(url)
    file_input = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type='file']"))
    file_input.send_keys(str(SAMPLE_IMAGE))
    wait.until(lambda _: "CLIP top-5" in _body(driver) and "RECO top-5" in _body(driver))
    predicted = _body(driver)
    assert "No RECO answer" not in predicted and "attention" in predicted and "reco serve" in predicted
    _shot(driver, "demo-predict.png")
    status = subprocess.run([*RECO, "status", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert status.returncode == 0, status.stderr[-2000:]
    counts = json.loads(status.stdout.strip().splitlines()[-1])
    assert counts["memory"]["backend"] == "reco-serve" and counts["items"] >= 800
    during = ingest.poll() is None  # the status answered while the ingestion was still running (usually)
    found = _search(driver, wait, url, "a photo of a hat", captions=False)
    assert "Traceback" not in found and "The search failed" not in found
    _shot(driver, "demo-search.png")
    out, err = ingest.communicate(timeout=600)
    assert ingest.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["ingested"] + summary["duplicates"] == 100 and summary["failed"] == 0, summary
    # the new pairs, searched in the same UI (no restart): the exact caption ranks first among captions
    with manifest.open(encoding="utf-8") as handle:
        caption = handle.read().splitlines()[1].split(",", 2)[1].strip('"')
    found = _search(driver, wait, url, caption, captions=True)
    assert caption in found, found[:2000]
    _shot(driver, "demo-search-new-pairs.png")
    print(f"status answered while ingesting: {during}; the demo log:\n{log.read_text()[-1500:]}")

    stop()  # Ctrl-C: the UI and the server stop, the announcement goes with them
    assert not (tmp_path / "data" / "serve.json").exists(), "the demo's server outlived the demo"
    again = subprocess.run([*RECO, "demo", "--no-ui", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads(again.stdout.strip().splitlines()[-1])
    assert second["ingest"]["ingested"] == 0 and second["ingest"]["duplicates"] == 800
    assert second["checkpoint"]["origin"] in {"registered", "committed default", "configured"}
