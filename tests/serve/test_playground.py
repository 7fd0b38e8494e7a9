"""The playground as a person uses it, in real headless Chromium (Debian's chromium and
chromium-driver through selenium): type a prompt, start a diffusion run, see masked cells appear
and fill step by step, and get exactly the library's text; AR mode draws one token per forward;
Stop cancels the request on the server. Screenshots go to the test's folder, and to docs/figures/
when TWOTOWER_UPDATE_FIGURES=1.

Skipped where Chromium or selenium is missing, except under CI (CI=true), where it must run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from twotower.loading import load_for_inference
from twotower.serve.app import ServerConfig
from twotower.serve.server import make_server

from .helpers import metric, reference, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FIGURES = Path(__file__).resolve().parents[2] / "docs" / "figures"
PROMPT = "The sqlite3_open() interface"
SETTINGS = {"block_size": 16, "steps_per_block": 16, "confidence_threshold": 0.9}
MAX_TOKENS = 48


def _require_browser():
    missing = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", DRIVER)) if not found]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test needs {', '.join(missing)} (.ci/run installs them)")
        pytest.skip(f"no {', '.join(missing)}")


@pytest.fixture(scope="module")
def bundled():
    return load_for_inference(None)  # the trained tiny model: real words in the screenshot


@pytest.fixture(scope="module")
def server(bundled):
    with make_server(bundled, ServerConfig(port=0)).start() as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,820"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def start(browser, server, *, mode: str, pace: str, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server.url + "/")
    wait_for(lambda: browser.find_element(By.ID, "model-name").text not in ("", "…"), timeout=10)
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    Select(browser.find_element(By.ID, "mode")).select_by_value(mode)
    Select(browser.find_element(By.ID, "block-size")).select_by_value(str(SETTINGS["block_size"]))
    Select(browser.find_element(By.ID, "pace")).select_by_value(pace)
    for field, value in (("steps", SETTINGS["steps_per_block"]), ("max-tokens", max_tokens)):
        el = browser.find_element(By.ID, field)
        if el.is_enabled():
            el.clear()
            el.send_keys(str(value))
    browser.find_element(By.ID, "run").click()


def state(browser) -> dict:
    return browser.execute_script("return window.playground")


def shoot(browser, tmp_path, name: str) -> Path:
    path = tmp_path / name
    browser.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    if os.environ.get("TWOTOWER_UPDATE_FIGURES") == "1":
        shutil.copy(path, FIGURES / name)
    return path


def test_a_diffusion_run_shows_masked_cells_filling_and_ends_with_the_librarys_text(browser, server, bundled, tmp_path):
    from selenium.webdriver.common.by import By

    start(browser, server, mode="diffusion", pace="400")
    assert browser.find_element(By.ID, "model-name").text == bundled.name
    # mid-run: a block on screen with hatched, empty masked cells next to committed ones
    assert wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".row .cell.masked")) > 0, timeout=60)
    masked = browser.find_elements(By.CSS_SELECTOR, ".row .cell.masked")
    assert all(cell.text.strip() == "" for cell in masked)
    half_filled = "return [...document.querySelectorAll('.row')].some(r => r.querySelector('.cell.masked') && r.querySelector('.cell.new'))"
    assert wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".row")) >= 2, timeout=60)
    assert wait_for(lambda: browser.execute_script(half_filled), timeout=30)  # a block part filled, part masked
    shoot(browser, tmp_path, "playground.png")
    assert wait_for(lambda: state(browser)["done"], timeout=120)
    final = state(browser)
    assert final["error"] is None
    expected = reference(bundled, PROMPT, max_tokens=MAX_TOKENS, **SETTINGS)
    assert browser.find_element(By.ID, "output").get_attribute("textContent") == expected
    log = final["log"]
    blocks = sorted({e["block"] for e in log})
    assert blocks == list(range(len(blocks))) and len(blocks) >= 2
    for b in blocks:
        masked_counts = [e["masked"] for e in log if e["block"] == b]
        assert masked_counts[-1] == 0 or final["summary"]["finish_reason"] == "stop"  # filled (or ended at EOS)
        assert masked_counts == sorted(masked_counts, reverse=True)
    assert max(e["masked"] for e in log) > 0  # cells were seen masked before they filled
    summary = final["summary"]
    assert summary["forwards"] == len(log) and summary["tokens_per_forward"] > 1  # several tokens per forward
    assert browser.find_element(By.ID, "stat-tpf").text == f"{summary['tokens_per_forward']:.2f}"


def test_ar_mode_draws_one_token_per_forward(browser, server, bundled, tmp_path):
    from selenium.webdriver.common.by import By

    start(browser, server, mode="ar", pace="0", max_tokens=24)
    assert wait_for(lambda: state(browser)["done"], timeout=120)
    final = state(browser)
    assert [e["cells"] for e in final["log"]] == [1] * final["summary"]["completion_tokens"]
    assert final["summary"]["tokens_per_forward"] is None or final["summary"]["mode"] == "ar"
    expected = reference(bundled, PROMPT, max_tokens=24, mode="ar")
    assert browser.find_element(By.ID, "output").get_attribute("textContent") == expected
    shoot(browser, tmp_path, "playground_ar.png")


def test_stop_cancels_the_request_on_the_server(browser, server):
    from selenium.webdriver.common.by import By

    before = metric(server, "twotower_requests_total", status="499")
    start(browser, server, mode="diffusion", pace="400", max_tokens=1024)
    assert wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".row")) >= 1, timeout=60)
    browser.find_element(By.ID, "stop").click()
    assert wait_for(lambda: state(browser)["done"], timeout=30)
    assert wait_for(lambda: metric(server, "twotower_in_flight") == 0, timeout=30)
    assert metric(server, "twotower_requests_total", status="499") == before + 1
