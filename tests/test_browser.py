"""The chat page in a real browser (headless Chromium driven by Selenium): upload a demo picture, ask,
and the answer that streams in is the greedy reference `chat.reply`; a second question continues the
conversation about the same picture; an example picked from the list starts a new one.

Needs the Debian packages `chromium` and `chromium-driver` (CI installs them) and `pip install selenium`.
MINIMIND_V_DEMO=DIR runs it against a demo folder written by `minimind-v demo --out DIR` instead of a
quick one, and MINIMIND_V_SCREENSHOT=FILE saves the page after two turns there (docs/serve.png comes from both).
"""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from minimind_v.chat import load_pixels, reply, user_message
from minimind_v.demo import run as run_demo
from minimind_v.serve import Engine, Server, checkpoint_name, find_examples, load

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or not CHROMEDRIVER.is_file(),
    reason="needs headless Chromium: apt-get install -y chromium chromium-driver (/usr/bin/chromedriver)")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

QUESTIONS = ("What colour is the triangle?", "Where is the yellow shape?", "What is at the center?")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if os.environ.get("MINIMIND_V_DEMO"):
        return Path(os.environ["MINIMIND_V_DEMO"])
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("browser") / "demo"
    run_demo(out, seed=0, quick=True, threads=1, log=lambda m: None, sft_steps=300)
    torch.set_num_threads(n)
    return out


@pytest.fixture(scope="module")
def served(demo):
    model, tok, info = load(demo / "sft")
    server = Server(Engine(model, tok, checkpoint_name(demo / "sft"), info["stage"]), "127.0.0.1", 0,
                    find_examples(demo / "sft"), log=lambda m: None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, model, tok
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,800", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def last_answer(driver) -> str:
    """The newest assistant bubble's text once the page is idle again."""
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    bubbles = driver.find_elements(By.CSS_SELECTOR, "#transcript .msg.assistant")
    return bubbles[-1].get_attribute("textContent")


def ask(driver, question: str) -> str:
    n = len(driver.find_elements(By.CSS_SELECTOR, "#transcript .msg.assistant"))
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 60).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#transcript .msg.assistant")) == n + 1)
    return last_answer(driver)


def test_upload_ask_and_the_streamed_answer_is_the_greedy_reference(served, demo, browser, tmp_path):
    server, model, tok = served
    browser.get(server.url)
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in browser.find_element(By.ID, "model").text
    size = model.cfg.vision.image_size
    max_tokens = int(browser.find_element(By.ID, "max-tokens").get_attribute("value"))

    # upload a held-out picture and ask about it
    image = demo / "data" / "images" / "test_000002.png"
    browser.find_element(By.ID, "file").send_keys(str(image))
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:"))
    pixels = load_pixels([image], size)
    first = ask(browser, QUESTIONS[0])
    assert first == reply(model, tok, [user_message(QUESTIONS[0], 1)], pixels, max_tokens) != ""
    assert "tokens/s" in browser.find_elements(By.CSS_SELECTOR, "#transcript .meta")[-1].text

    # a second turn about the same picture
    second = ask(browser, QUESTIONS[1])
    history = [user_message(QUESTIONS[0], 1), {"role": "assistant", "content": first},
               {"role": "user", "content": QUESTIONS[1]}]
    assert second == reply(model, tok, history, pixels, max_tokens)
    shot = tmp_path / "serve.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("MINIMIND_V_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["MINIMIND_V_SCREENSHOT"])

    # an example from the list: a new conversation about that picture
    examples = browser.find_elements(By.CSS_SELECTOR, "#examples img")
    assert [e.get_attribute("title") for e in examples] == list(server.examples)
    examples[5].click()
    WebDriverWait(browser, 10).until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#transcript .msg"))
    third = ask(browser, QUESTIONS[2])
    pixels = load_pixels([server.examples[examples[5].get_attribute("title")]], size)
    assert third == reply(model, tok, [user_message(QUESTIONS[2], 1)], pixels, max_tokens)
    # the pieces add up: at least one of the answers came in several pieces
    counts = [len(tok.encode(a)) for a in (first, second, third)]
    assert max(counts) >= 2, counts


def test_a_bad_file_shows_the_servers_message(served, browser, tmp_path):
    server, *_ = served
    browser.get(server.url)
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    browser.find_element(By.ID, "file").send_keys(str(fake))
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:"))
    browser.find_element(By.ID, "question").send_keys("What is this?")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#transcript .msg.error"))
    assert "cannot be read as a picture" in browser.find_element(By.CSS_SELECTOR, "#transcript .msg.error").text
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"
