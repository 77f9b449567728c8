"""The chat page in a real headless browser (Debian's chromium + chromedriver, driven by
Selenium): type a prompt, see the streamed answer and the expert's name, start a new conversation.
Slow; skipped with the reason when the browser or Selenium is not installed."""

from __future__ import annotations

import shutil

import pytest

from dynlm.memory.embeddings import HashingEncoder
from dynlm.serve.app import ServeLimits, create_app
from dynlm.serve.deployment import Deployment
from test_serve import LiveServer, tiny_checkpoint

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("needs selenium (pip install selenium)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def test_chat_page_streams_an_answer_and_names_the_expert(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    path = tiny_checkpoint(tmp_path / "tiny")
    deployment = Deployment.single(path, name="tiny")
    deployment.attach_memory(tmp_path / "m.sqlite", 400, HashingEncoder())
    with LiveServer(create_app(deployment, ServeLimits(max_tokens=256))) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        browser.find_element(By.ID, "prompt").send_keys("Hello there\n")
        done = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]") or
                          d.find_elements(By.CSS_SELECTOR, ".msg.assistant .expert"))
        wait.until(lambda d: d.execute_script(
            "const s = JSON.parse(localStorage.getItem('dynlm-conversations'));"
            "return Object.values(s).some(m => m.some(x => x.role === 'assistant'));"))
        assert done
        log = browser.find_element(By.ID, "log").text
        assert log.startswith("You:") and "Hello there" in log and "(tiny)" in log
        # the page received the whole streamed answer: what the server stored for this conversation
        conversation = browser.execute_script("return localStorage.getItem('dynlm-current')")
        shown = browser.execute_script(
            "const s = JSON.parse(localStorage.getItem('dynlm-conversations'));"
            "return s[localStorage.getItem('dynlm-current')][1].content;")
        stored = deployment.memory.messages(conversation)
        assert [m["role"] for m in stored] == ["user", "assistant"]
        assert stored[1]["content"] == shown
        # a new conversation: the list grows, the log empties
        browser.find_element(By.ID, "new").click()
        assert len(browser.find_elements(By.CSS_SELECTOR, "#conversations li")) == 2
        assert browser.find_element(By.ID, "log").text == ""
