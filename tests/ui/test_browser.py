"""End to end in a real browser: ``reco ui``'s server on localhost over the prepared memory, Debian's
Chromium driven by Selenium, an image uploaded through the page's file input; CLIP and RECO predictions
and the neighbour thumbnails must appear. The screenshot goes to ``test-artifacts/`` (git-ignored).

Under CI=true a missing Chromium is a failure, not a skip (``.ci/run`` installs it)."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageStat
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import IN_CI
from tests.ui.conftest import memory_settings, sample_image
from ui.cli import launch_ui, stop_ui

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("RECO_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-dev-shm-usage", "--window-size=1400,2400")
WAIT_S = 90


def _browser_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    message = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    if IN_CI:
        pytest.fail(f"{message}; CI=true: a missing browser is a failure, not a skip")
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def served_ui(prepared_memory: Path, tmp_path: Path) -> Iterator[str]:
    data_dir = tmp_path / "data"
    shutil.copytree(prepared_memory, data_dir)
    port = _free_port()
    with (tmp_path / "streamlit.log").open("wb") as log:
        try:
            process = launch_ui(memory_settings(data_dir), port, block=False, headless=True, log=log)
        except Exception:
            log.flush()
            print((tmp_path / "streamlit.log").read_text(errors="replace"))
            raise
        assert process is not None
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            stop_ui(process)
    print((tmp_path / "streamlit.log").read_text(errors="replace")[-4000:])


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[WebDriver]:
    browser, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _neighbour_thumbnails(driver: WebDriver) -> int:
    images = driver.find_elements(By.CSS_SELECTOR, "img[alt^='neighbour:']")
    loaded = "return arguments[0].complete && arguments[0].naturalWidth > 0"
    return sum(1 for img in images if driver.execute_script(loaded, img))


def assert_not_blank(path: Path) -> None:
    with Image.open(path) as shot:
        rgb = shot.convert("RGB")
        spread = max(ImageStat.Stat(rgb).stddev)
        colours = rgb.getcolors(maxcolors=1 << 22) or []
    assert spread > 10 and len(colours) > 200, f"screenshot looks blank: stddev {spread:.1f}, {len(colours)} colours"


def test_upload_shows_clip_reco_and_neighbours(served_ui: str, chromium: WebDriver) -> None:
    driver = chromium
    wait = WebDriverWait(driver, WAIT_S)

    def body() -> str:
        return str(driver.find_element(By.TAG_NAME, "body").text)

    # a deep link as the server's very first request must still go through the entry script
    driver.get(served_ui + "search")
    wait.until(lambda _: "Query by" in body() and "RANDOM WEIGHTS" in body())
    assert "Traceback" not in body() and "Error" not in body()

    driver.get(served_ui)
    file_input = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type='file']"))
    file_input.send_keys(str(sample_image()))
    wait.until(lambda _: "CLIP top-5" in body() and "RECO top-5" in body() and _neighbour_thumbnails(driver) >= 4)
    text = body()
    assert "RANDOM WEIGHTS" in text
    assert "attention" in text and "No RECO answer" not in text
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ui-predict.png"
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.save_screenshot(str(shot))
    assert_not_blank(shot)
