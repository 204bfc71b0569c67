"""The uploader's and the analyst's experience in a real Chromium: the UI as a client of a running
``reco serve`` over the demo's memory (base encoder), each page driven as a person would. Screenshots at
1400 px wide go to ``test-artifacts/`` (git-ignored) so a person can look."""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from app.config import Settings
from tests.ui.conftest import base_settings, start_server, stop_process, val_images
from tests.ui.test_browser import ARTIFACTS, WAIT_S, _free_port, assert_not_blank, chromium  # noqa: F401
from ui.cli import launch_ui, stop_ui

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@contextlib.contextmanager
def serve_with_ui(settings: Settings, tmp_path: Path, *, show_logs: bool = False) -> Iterator[str]:
    """``reco serve`` with ``settings`` and the UI (its client) on a free port; the UI's URL. Logs in
    ``tmp_path`` (serve.log, streamlit.log), their tails printed at the end with ``show_logs``."""
    server = start_server(settings, tmp_path / "serve.log")
    port = _free_port()
    try:
        with (tmp_path / "streamlit.log").open("wb") as log:
            process = launch_ui(settings, port, block=False, headless=True, log=log)
            assert process is not None
            try:
                yield f"http://127.0.0.1:{port}/"
            finally:
                stop_ui(process)
    finally:
        stop_process(server)
        if show_logs:
            print((tmp_path / "streamlit.log").read_text(errors="replace")[-3000:])
            print((tmp_path / "serve.log").read_text(errors="replace")[-3000:])


@pytest.fixture
def served_base_ui(base_memory: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``reco serve`` over a copy of the base memory, and the UI (its client) on a free port."""
    data_dir = tmp_path / "data"
    shutil.copytree(base_memory, data_dir)
    with serve_with_ui(base_settings(data_dir), tmp_path, show_logs=True) as url:
        yield url, data_dir


def _body(driver: WebDriver) -> Callable[[], str]:
    return lambda: str(driver.find_element(By.TAG_NAME, "body").text)


def _click_text(driver: WebDriver, tag: str, text: str) -> None:
    element = WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_element(By.XPATH, f"//{tag}[.//p[normalize-space()='{text}']]"))
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def screenshot(driver: WebDriver, name: str, *, sparse: bool = False) -> Path:
    """The whole page at 1400 px wide (the window grows to the content's height). ``sparse``: a page with
    little on it (an empty state) is not checked for looking blank."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script(
        "const m = document.querySelector('[data-testid=\"stMainBlockContainer\"]');"
        "return m ? m.scrollHeight : document.body.scrollHeight")
    driver.set_window_size(1400, min(max(int(height) + 160, 900), 6000))
    driver.execute_script("window.scrollTo(0, 0)")
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path))
    if not sparse:
        assert_not_blank(path)
    return path


def test_similar_image_search_in_chromium(served_base_ui: tuple[str, Path], chromium: WebDriver) -> None:  # noqa: F811
    url, _ = served_base_ui
    driver, body = chromium, _body(chromium)
    wait = WebDriverWait(driver, WAIT_S)
    hat = next(path for path, label in val_images(1) if label == 1)
    driver.get(url + "search")
    wait.until(lambda _: "Query by" in body())
    _click_text(driver, "label", "Image")
    file_input = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type='file']"))
    file_input.send_keys(str(hat))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid='stFileChipName']"))
    _click_text(driver, "button", "Search")
    wait.until(lambda _: "image→image" in body() and "reco serve" in body())
    text = body()
    assert "Query: image " + hat.name in text and "Traceback" not in text
    first = driver.find_elements(By.CSS_SELECTOR, "img[alt^='neighbour:']")
    assert len(first) >= 5
    classes = re.findall(r"class (.+?) · clothing10", text)  # each result card's class line, in rank order
    assert classes and classes[0] == "hat", classes
    assert driver.find_elements(By.CSS_SELECTOR, "img[alt^='query image']")
    screenshot(driver, "ui-search.png")


def test_ingestion_with_failures_is_amber_with_the_right_job(served_base_ui: tuple[str, Path], tmp_path: Path,
                                                            chromium: WebDriver) -> None:  # noqa: F811
    from tests.ui.conftest import png_bytes
    from tests.ui.test_ingestion_page import make_zip

    url, _ = served_base_ui
    driver, body = chromium, _body(chromium)
    wait = WebDriverWait(driver, WAIT_S)
    archive = tmp_path / "mixed squares.zip"
    archive.write_bytes(make_zip({f"b{n}.png": png_bytes(color=(n, 90, 90))[:60] for n in range(3)}
                                 | {f"b{n}.txt": b"a broken square" for n in range(3)}
                                 | {"blue.png": png_bytes((64, 64), (0, 0, 250)), "blue.txt": b"a blue square"}))
    driver.get(url + "ingestion")
    file_input = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type='file']"))
    file_input.send_keys(str(archive))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid='stFileChipName']"))
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[aria-label='Dataset name']")
               .get_attribute("value") == "mixed squares")
    _click_text(driver, "button", "Ingest the zip")
    def chosen(d: WebDriver) -> list[str]:
        boxes = d.find_elements(By.CSS_SELECTOR, "[data-testid='stSelectbox']")
        return [str(e.get_attribute("outerHTML")) for e in boxes]

    wait.until(lambda d: "finished with 3 failures" in body() and "Retry the failed items of job 2" in body()
               and any("job 2 · 3 failed" in html for html in chosen(d)))  # the failures shown: the new job's
    text = body()
    assert "has no failures" not in text and "Cancel the job" not in text
    alert = driver.find_element(By.XPATH, "//*[contains(text(), 'finished with 3 failures')]"
                                          "/ancestor::*[@data-testid='stAlertContainer']")
    assert "Warning" in (alert.get_attribute("class") or "") + (alert.get_attribute("kind") or "") or \
        "stAlertContentWarning" in alert.get_attribute("innerHTML"), alert.get_attribute("outerHTML")[:500]
    screenshot(driver, "ui-ingestion.png")


def test_memory_grid_item_url_back_and_map(served_base_ui: tuple[str, Path], chromium: WebDriver) -> None:  # noqa: F811
    from app.config import Settings
    from app.db.repo import MetadataRepo

    url, data_dir = served_base_ui
    driver, body = chromium, _body(chromium)
    wait = WebDriverWait(driver, WAIT_S)
    driver.get(url + "memory")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img[alt^='memory item:']")) >= 20
               and "class dress" in body())
    assert "200 items · page 1 of 10" in body()
    screenshot(driver, "ui-memory-grid.png")
    # an item's own URL, opened directly (a fresh session, as a shared link would be)
    item = MetadataRepo.from_url(Settings(data_dir=data_dir).resolved_database_url).list_items(limit=1)[0][0]
    driver.get(url + f"memory?item={item.id}")
    wait.until(lambda _: "Memory item" in body() and item.caption in body() and "Its neighbours" in body())
    assert item.id in body()
    screenshot(driver, "ui-memory-item.png")
    # from the grid through an item's Open link, then the browser's Back returns to the grid
    driver.get(url + "memory")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "img[alt^='memory item:']"))
    link = wait.until(lambda d: d.find_element(By.XPATH, "//a[normalize-space()='Open']"))
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", link)
    link.click()
    wait.until(lambda d: "item=" in d.current_url and "Memory item" in body())
    opened = driver.current_url
    driver.back()
    wait.until(lambda d: "item=" not in d.current_url and "items · page 1 of 10" in body())
    driver.forward()
    wait.until(lambda d: d.current_url == opened and "Memory item" in body())
    # the map, with that item as the query and its nearest images ringed
    driver.get(url + f"memory?near={item.id}&view=map")
    wait.until(lambda d: "The query's 8 nearest images" in body()
               and d.find_elements(By.CSS_SELECTOR, "canvas, svg.marks"))
    assert "variance" in body()
    screenshot(driver, "ui-memory-map.png")


@pytest.fixture
def served_fused_ui(prepared_memory: Path, tmp_path: Path) -> Iterator[str]:
    """``reco serve`` over a copy of the prepared memory (tiny encoder, with a fusion checkpoint) and its UI."""
    from tests.ui.conftest import memory_settings

    data_dir = tmp_path / "data"
    shutil.copytree(prepared_memory, data_dir)
    with serve_with_ui(memory_settings(data_dir), tmp_path) as url:
        yield url


def test_text_side_explanation_in_chromium(served_fused_ui: str, chromium: WebDriver) -> None:  # noqa: F811
    from tests.ui.conftest import sample_image

    driver, body = chromium, _body(chromium)
    wait = WebDriverWait(driver, WAIT_S)
    driver.get(served_fused_ui)
    wait.until(lambda _: "RECO mode" in body() and "The memory's captions mention all 10 classes" in body())
    file_input = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type='file']"))
    file_input.send_keys(str(sample_image()))
    wait.until(lambda _: "Why RECO answered as it did" in body() and "Nearest memory image" in body()
               and body().count("retrieved these captions (text→text)") == 3)
    text = body()
    assert "Text side: the top classes' prompts" in text and "Image side: the image's neighbours" in text
    assert "reco serve" in text and "RECO changed the top-1" not in text
    screenshot(driver, "ui-predict-explained.png")


def test_evaluation_and_operations_pages_in_chromium(served_base_ui: tuple[str, Path],
                                                     chromium: WebDriver) -> None:  # noqa: F811
    url, _ = served_base_ui
    driver, body = chromium, _body(chromium)
    wait = WebDriverWait(driver, WAIT_S)
    for page, title in (("evaluation", "Evaluation"), ("operations", "Operations")):
        driver.get(url + page)
        wait.until(lambda _, t=title: t in body() and "Running" not in body()[:200])
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "h1"))
        assert "Traceback" not in body()
        screenshot(driver, f"ui-{page}.png", sparse=page == "evaluation")  # no evaluation runs in this memory
