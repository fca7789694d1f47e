"""End to end: `embedstore ui` on a free localhost port, driven by headless Chromium (Debian's chromium +
chromium-driver through selenium; no browser download). Saves test-artifacts/ui-search.png."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import embedstore

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"`embedstore ui` exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the UI did not answer at {url} within {timeout:.0f}s")


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("embedstore")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "embedstore.cli.app"]


@pytest.fixture()
def ui_server(photo_store_path, tmp_path):
    store = tmp_path / "photos.es"
    shutil.copytree(photo_store_path, store)
    s = embedstore.open(store, create=False)  # a few labels, so results carry labels and predictions
    for cls in ("astronaut", "chelsea", "coffee", "rocket"):
        s.label([p for p in s.paths_for(range(80)) if f"/{cls}/" in p][:2], cls)
    s.classify(head="knn")
    port = _free_port()
    proc = subprocess.Popen(
        _cli() + ["ui", str(store), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        first = proc.stdout.readline()
        assert f"http://localhost:{port}" in first, first
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group holds `embedstore ui` and its streamlit child
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1440,1100",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def test_search_page_renders_results_in_chromium(ui_server, browser):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    # Streamlit re-renders the grid while images load: an element found a moment ago can be replaced, so the
    # waits retry on a stale reference instead of failing (seen once in CI)
    wait = WebDriverWait(browser, 120, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(ui_server)
    wait.until(EC.presence_of_element_located((By.XPATH, "//h2[contains(., 'Search')]")))
    # the browse grid: thumbnails with a "similar" button each (key browse_nb_<id>); press the first
    similar = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "[class*='st-key-browse_nb_'] button")))
    similar.click()
    caption = "//*[@data-testid='stImageCaption' or @data-testid='caption']"
    ARTIFACTS.mkdir(exist_ok=True)
    try:  # result captions read "<cosine score> · #<id> ..."
        wait.until(lambda d: len(d.find_elements(By.XPATH, caption + "[contains(., ' · #')]")) >= 6)
        wait.until(lambda d: all(img.get_attribute("complete") == "true" and int(img.get_attribute("naturalWidth") or 0) > 0
                                 for img in d.find_elements(By.CSS_SELECTOR, "[data-testid='stImage'] img")))
    finally:
        browser.save_screenshot(str(ARTIFACTS / "ui-search.png"))
    scores = wait.until(lambda d: [float(c.text.split(" · ")[0]) for c in d.find_elements(By.XPATH, caption + "[contains(., ' · #')]")])
    assert len(scores) == 24 and scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1.0001, scores
    assert browser.find_elements(By.XPATH, caption + "[starts-with(., 'query: image #')]")
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid='stException']")
    time.sleep(1)  # let the last thumbnails paint
    assert browser.save_screenshot(str(ARTIFACTS / "ui-search.png"))
