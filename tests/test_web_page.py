"""The web page in a real headless browser (Debian's chromium through selenium, no browser
download) against `forkllm serve` of the default model with an API key: the page asks for the
key, streams an answer, runs self-consistency with n = 4 and particle filtering, and draws the
trees from the server's tree events (leaves, votes, forks and prunes as the server counts them);
the server's errors show as it returns them. Screenshots go to $FORKLLM_SCREENSHOTS (the README's
come from there) or the test's temporary folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402
from test_server import _free_port  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "page-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    cmd = [sys.executable, "-m", "forkllm.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--api-key", KEY, "--kv-cache-memory", "512MiB"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "serve exited"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "forkllm serve did not become ready"
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"  # selenium must not fetch a browser or a driver
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.add_argument("--window-size=1400,900")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("FORKLLM_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _set(driver, element_id: str, value: str) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(value)


def _ask(driver, wait, question: str) -> None:
    """Send a message and wait for the page to finish the turn (answer or error shown)."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error"))
    driver.find_element(By.ID, "input").send_keys(question)
    driver.find_element(By.ID, "send").click()
    wait.until(
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error")) > before
            and not d.find_element(By.ID, "send").get_attribute("disabled")
        )
    )


def _nodes(driver, selector: str = "") -> list:
    return driver.find_elements(By.CSS_SELECTOR, f"#tree g.node{selector}")


def test_the_page_chats_and_draws_the_tree(server, browser, shots):
    d, wait = browser, WebDriverWait(browser, 120)
    d.get(server + "/")
    # the API needs a key: the page asks once, then lists the model
    wait.until(lambda d: d.find_element(By.ID, "key-dialog").is_displayed())
    d.find_element(By.ID, "key-input").send_keys(KEY)
    d.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait.until(lambda d: d.find_element(By.ID, "model").text == "SmolLM2-135M-Instruct")

    # plain: the answer streams into the log; the tree is one sequence
    _set(d, "system", "You are a concise assistant.")
    _set(d, "max-tokens", "40")
    _ask(d, wait, "Say hello in one short sentence.")
    answer = d.find_elements(By.CSS_SELECTOR, ".msg.assistant .sample .text")[-1].text
    assert answer.strip()
    assert len(_nodes(d)) == 1 and len(_nodes(d, ".leaf")) == 1
    assert "tokens in" in d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")[-1].text

    # self-consistency, n = 4: four leaves, and the votes the page shows are the tree's votes
    d.find_element(By.ID, "clear").click()
    _set(d, "system", "")
    Select(d.find_element(By.ID, "strategy")).select_by_value("self_consistency")
    _set(d, "n", "4")
    _set(d, "max-tokens", "48")
    _set(d, "seed", "0")
    _ask(d, wait, "What is 7 + 5? Answer with the number.")
    assert len(_nodes(d)) == 4 and len(_nodes(d, ".leaf")) == 4
    node_votes = [g.get_attribute("data-vote") for g in _nodes(d) if g.get_attribute("data-vote")]
    rows = d.find_elements(By.CSS_SELECTOR, "#votes tr.vote")
    shown = {r.get_attribute("data-answer"): float(r.get_attribute("data-votes")) for r in rows}
    assert node_votes and shown == {a: float(node_votes.count(a)) for a in set(node_votes)}
    assert len(_nodes(d, ".on-path")) >= 1  # the chosen sample is highlighted
    stats = d.find_element(By.ID, "tree-stats")
    meta = d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")[-1]
    assert stats.get_attribute("data-forks") == meta.get_attribute("data-forks") == "3"
    d.save_screenshot(str(shots / "self_consistency.png"))

    # particle filtering: the forks and prunes drawn are the ones the server counted
    Select(d.find_element(By.ID, "strategy")).select_by_value("particle_filter")
    _set(d, "n", "6")
    _set(d, "step-tokens", "8")
    _set(d, "max-tokens", "64")
    d.find_element(By.ID, "clear").click()
    _ask(d, wait, "Compute 23 * 17 step by step, one line per step.")
    stats = d.find_element(By.ID, "tree-stats")
    meta = d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")[-1]
    assert stats.get_attribute("data-forks") == meta.get_attribute("data-forks")
    assert stats.get_attribute("data-prunes") == meta.get_attribute("data-prunes")
    assert len(_nodes(d)) == 1 + int(meta.get_attribute("data-forks"))
    d.save_screenshot(str(shots / "particle_filter.png"))

    # the server's error, as it returned it, naming the field
    Select(d.find_element(By.ID, "strategy")).select_by_value("plain")
    _set(d, "n", "1")
    _set(d, "max-tokens", "100000")
    _ask(d, wait, "x")
    error = d.find_elements(By.CSS_SELECTOR, ".msg.error")[-1].text
    assert "400" in error and "max_tokens" in error
    assert (shots / "self_consistency.png").stat().st_size > 10_000
