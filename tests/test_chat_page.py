"""The chat page at / in a real headless browser: Debian's chromium driven by Selenium through chromedriver.

Nothing downloads a browser: the test uses /usr/bin/chromium and /usr/bin/chromedriver (apt-get install
chromium chromium-driver; CI installs them). Without them it skips, unless MINILLM_REQUIRE_BROWSER=1
(set by CI) makes that a failure.
"""

import os
import shutil
import time

import httpx
import pytest
from conftest import LiveServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("MINILLM_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium and chromedriver are required (apt-get install -y chromium chromium-driver)")
    pytest.skip("needs chromium and chromedriver (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def slow_server(tiny_sft_dir):
    """A live server whose decode steps take >= 15 ms, so an answer streams for seconds (time to see it grow
    and to press Stop)."""
    with LiveServer(tiny_sft_dir) as live:
        step = live.scheduler.step
        live.scheduler.step = lambda: (time.sleep(0.015), step())
        yield live


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def bubbles(driver, role):
    return driver.find_elements(By.CSS_SELECTOR, f".msg.{role}")


def test_chat_page_streams_stops_and_starts_over(slow_server, browser):
    live = slow_server
    browser.set_window_size(640, 480)  # small enough that an answer scrolls the log
    browser.get(live.url + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.05)
    wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")  # /v1/models answered
    # The page carries its icon: the browser asks for no /favicon.ico, which the server would answer with 404.
    icon = browser.execute_script("const l = document.querySelector('link[rel=icon]'); return l && l.href;")
    assert icon and icon.startswith("data:image/svg+xml,")
    # Greedy, so that the page must show exactly the answer the API gives.
    browser.execute_script("const t = document.getElementById('temperature'); t.value = 0;"
                           "t.dispatchEvent(new Event('input'));")
    assert browser.find_element(By.ID, "temperature-value").text == "0.00"

    # 1. A question: the answer appears piece by piece, then the speed line.
    box = browser.find_element(By.ID, "input")
    box.send_keys("请以《浣溪沙》为词牌写一首词")
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: bubbles(d, "user") and bubbles(d, "user")[0].text == "请以《浣溪沙》为词牌写一首词")
    answer = bubbles(browser, "assistant")[0]
    wait.until(lambda d: len(answer.get_attribute("textContent")) > 0)
    seen = {len(answer.get_attribute("textContent"))}
    while answer.get_attribute("data-streaming") == "true":
        seen.add(len(answer.get_attribute("textContent")))
        time.sleep(0.05)
    assert len(seen) >= 3  # the text grew in several steps while streaming
    question = [{"role": "user", "content": "请以《浣溪沙》为词牌写一首词"}]
    expected = httpx.post(live.url + "/v1/chat/completions", timeout=60, json={
        "messages": question, "temperature": 0, "max_tokens": min(256, live.scheduler.context // 2)}).json()
    assert answer.get_attribute("textContent") == expected["choices"][0]["message"]["content"]
    stats = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".stats"))[0].text
    assert "tokens/s" in stats and "first token after" in stats
    # The speed line is scrolled into view, not left under the input bar.
    assert browser.execute_script("const s = document.querySelector('.stats').getBoundingClientRect();"
                                  "const l = document.getElementById('log').getBoundingClientRect();"
                                  "return l.height < document.getElementById('log').scrollHeight"
                                  " && s.top >= l.top && s.bottom <= l.bottom + 1;")

    # 2. A second question, stopped while it streams: the slot is freed and the text stops growing.
    cancelled = live.scheduler.finished["cancelled"]
    box.send_keys("再写一首")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(bubbles(d, "assistant")) == 2
               and len(bubbles(d, "assistant")[1].get_attribute("textContent")) > 0)
    stop = browser.find_element(By.ID, "stop")
    assert stop.is_enabled()
    stop.click()
    second = bubbles(browser, "assistant")[1]
    wait.until(lambda d: second.get_attribute("data-streaming") == "false")
    wait.until(lambda d: live.scheduler.finished["cancelled"] == cancelled + 1)
    frozen = second.get_attribute("textContent")
    time.sleep(0.3)
    assert second.get_attribute("textContent") == frozen
    assert "stopped" in browser.find_elements(By.CSS_SELECTOR, ".stats")[1].text
    assert not stop.is_enabled() and browser.find_element(By.ID, "send").is_enabled()

    # 3. New chat clears the conversation; the next question is sent without the old history.
    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#log > *") == []
    assert browser.execute_script("return messages.length") == 0
