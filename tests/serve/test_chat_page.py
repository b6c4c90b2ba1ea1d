"""The chat page of `hybridmoe serve` (`serve/static/`), in a real headless Chromium driven by Selenium.

A live server over test_server's ScriptedEngine (its output forced token by token) requires an API key. The page
loads without the key and says it is missing, takes it, shows a refused request's error, streams a scripted turn of
reasoning then answer, shows a tool call and sends its result back, shows an error that arrives mid-stream, and stops
a long generation (the engine cancels the request). What the engine received is recorded, so the parameters set in
the page are checked where they arrive. A screenshot is saved to $HYBRIDMOE_SCREENSHOT_DIR (default: tmp_path).

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); without them the browser test is skipped.
"""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from test_server import MODEL, TOOLS, _wait_idle, make_checkpoint, make_serving, tokens

from hybridmoe.serve.chat import ReasoningBudget
from hybridmoe.serve.server import ServerThread

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
KEY = "page-test-key"
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    # max_model_len leaves room for the long generation that the test stops
    server = ServerThread(make_serving(make_checkpoint(tmp_path_factory.mktemp("ckpt")), max_model_len=4096),
                          api_key=KEY)  # fmt: skip
    engine = server.server.serving.engine
    engine.received = []  # (prompt text, SamplingParams) of every request, as the server made them
    engine.fail_at = None  # a number of generated tokens at which the request fails (a mid-stream error)
    add_request = engine.add_request

    def recording_add_request(prompt_token_ids, params=None, request_id=None):
        engine.received.append((server.server.serving.tokenizer.decode(prompt_token_ids), params))
        if engine.fail_at is not None:
            params.logits_processors.append(_FailAt(engine.fail_at))
        return add_request(prompt_token_ids, params, request_id)

    engine.add_request = recording_add_request
    yield server
    server.stop(grace_s=1)


@pytest.fixture(autouse=True)
def _reset_engine(live):
    engine = live.server.serving.engine
    yield
    engine.script, engine.fail_at = None, None


class _FailAt:
    def __init__(self, n: int):
        self.n = n

    def __call__(self, output_ids, logits):
        if len(output_ids) >= self.n:
            raise RuntimeError("the test's processor failed on purpose")
        return logits


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
                    "`apt-get install chromium chromium-driver` (.ci/run does)")  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,860", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def test_page_and_its_files_are_public_and_locked_down(live):
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp
    assert '<script src="/static/chat.js"' in page.text and "<script>" not in page.text  # no inline script
    for name, kind in (("chat.js", "javascript"), ("chat.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        r = httpx.get(f"{live.url}/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"], name
    assert httpx.get(live.url + "/static/nothing.js").json()["error"]["code"] == "not_found"
    assert httpx.get(live.url + "/v1/models").status_code == 401  # the API still needs the key
    # A path that only begins with /static/ stays inside the static files (httpx would normalise the dots away).
    conn = http.client.HTTPConnection(*live.sock.getsockname()[:2], timeout=10)
    conn.request("GET", "/static/../v1/models")
    r = conn.getresponse()
    assert r.status == 404 and MODEL not in r.read().decode()
    conn.close()


def test_chat_page_in_a_browser(live, driver, tmp_path):
    engine = live.server.serving.engine
    wait = WebDriverWait(driver, 20, poll_frequency=0.05)
    find = driver.find_element

    def texts(css: str) -> list[str]:
        return [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]

    def fill(element_id: str, value: str) -> None:
        field = find(By.ID, element_id)
        field.clear()
        field.send_keys(value, Keys.TAB)  # TAB: the field's change event fires

    def ask(text: str) -> None:
        find(By.ID, "input").send_keys(text, Keys.ENTER)

    def answered(n: int) -> None:
        """Wait until the page holds n assistant turns and is no longer generating."""
        wait.until(lambda d: len(texts(".message.assistant")) == n and not find(By.ID, "send").get_attribute("hidden"))

    def console_errors() -> list[str]:
        return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]

    # Without the key the page loads (its files are public) and says what is missing; with it, the model's name.
    driver.get(live.url + "/")
    wait.until(lambda d: any("API key is missing" in t for t in texts(".error.models")))
    fill("api-key", KEY)
    wait.until(lambda d: find(By.ID, "model").text == MODEL and not texts(".error"))
    assert all("401" in m for m in console_errors())

    # Reasoning then answer, with the parameters of the panel.
    fill("temperature", "0.3")
    fill("max-tokens", "200")
    fill("reasoning-budget", "50")
    fill("system-prompt", "Answer in one sentence.")
    engine.script = tokens(live, "Paris is in France.\n</think>\nIt is sunny.")
    engine.received.clear()
    ask("What is the weather in Paris?")
    answered(1)
    assert texts(".message.user") == ["What is the weather in Paris?"]
    assert texts(".message.assistant > .text") == ["It is sunny."]
    reasoning = find(By.CSS_SELECTOR, ".message.assistant details.reasoning")
    assert reasoning.get_attribute("open") is None and reasoning.text == "Reasoning"  # collapsed once answered
    reasoning.find_element(By.TAG_NAME, "summary").click()
    assert reasoning.find_element(By.CSS_SELECTOR, ".text").text == "Paris is in France."
    ((prompt, params),) = engine.received
    assert params.temperature == 0.3 and params.max_tokens == 200
    assert [p.budget for p in params.logits_processors if isinstance(p, ReasoningBudget)] == [50]
    assert "Answer in one sentence." in prompt and "What is the weather in Paris?" in prompt
    assert prompt.endswith("<think>\n")  # reasoning on

    # A tool call: shown with its arguments; the next message is its result, and the answer follows.
    fill("tools", json.dumps(TOOLS))
    engine.script = tokens(live, f"I need the weather.\n</think>\n{CALL}")
    engine.received.clear()
    ask("And tomorrow?")
    answered(2)
    assert texts(".tool-call .name") == ["get_weather"]
    assert json.loads(find(By.CSS_SELECTOR, ".tool-call .arguments").text) == {"city": "Paris"}
    assert find(By.ID, "input").get_attribute("placeholder").startswith("Result of get_weather")
    ((prompt, _),) = engine.received
    assert "It is sunny." in prompt and "get_weather" in prompt  # the first answer and the tools went back
    engine.script = tokens(live, "The tool says so.\n</think>\nIt stays sunny tomorrow.")
    engine.received.clear()
    ask('{"sky": "sunny"}')
    answered(3)
    assert texts(".message.tool .text") == ['{"sky": "sunny"}']
    assert texts(".message.assistant > .text")[-1] == "It stays sunny tomorrow."
    ((prompt, _),) = engine.received
    assert '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in prompt and "I need the weather" in prompt
    screenshot_dir = Path(os.environ.get("HYBRIDMOE_SCREENSHOT_DIR") or tmp_path)
    screenshot_dir.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(screenshot_dir / "chat-page.png"))

    # A request the server refuses: its error is shown and the message goes back into the box.
    find(By.ID, "new-chat").click()
    assert not texts(".message")
    fill("tools", "")
    fill("reasoning-budget", "")
    find(By.ID, "reasoning").click()  # reasoning off
    fill("temperature", "5")
    find(By.ID, "input").send_keys("Count", Keys.SHIFT, Keys.ENTER, Keys.NULL, "to seven.", Keys.ENTER)
    wait.until(lambda d: any("temperature" in t for t in texts(".error")))
    assert find(By.ID, "input").get_attribute("value") == "Count\nto seven."  # Shift+Enter: a new line
    assert not texts(".message") and all("400" in m for m in console_errors())

    # An error after the stream began: what arrived stays, the error is shown under it.
    fill("temperature", "0")
    engine.script, engine.fail_at = tokens(live, "one two three four five six seven"), 3
    engine.received.clear()
    find(By.ID, "input").send_keys(Keys.ENTER)  # the text put back after the refusal
    answered(1)
    engine.fail_at = None
    assert "the test's processor failed on purpose" in find(By.CSS_SELECTOR, ".message.assistant .error").text
    assert find(By.CSS_SELECTOR, ".message.assistant > .text").text  # the tokens before the failure
    ((prompt, params),) = engine.received
    assert prompt.endswith("<think></think>")  # reasoning off, so no budget either
    assert not any(isinstance(p, ReasoningBudget) for p in params.logits_processors)

    # Stop: the reasoning streams into an open block; the stop button ends the request in the engine.
    find(By.ID, "new-chat").click()
    find(By.ID, "reasoning").click()  # reasoning on again
    fill("max-tokens", "3000")
    engine.script = tokens(live, "<b>word</b> " * 1000, end=False)  # model text is shown as text, never as HTML
    engine.steps_seen.clear()
    ask("Think for long.")
    block = wait.until(lambda d: find(By.CSS_SELECTOR, ".message.assistant details.reasoning"))
    wait.until(lambda d: block.text.count("<b>word</b>") >= 5)
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages b")
    assert block.get_attribute("open") is not None and find(By.ID, "send").get_attribute("hidden")  # still streaming
    find(By.ID, "stop").click()
    answered(1)
    assert texts(".message.assistant .note") == ["stopped"] and block.get_attribute("open") is None
    assert _wait_idle(engine) and max(engine.steps_seen) < 1000, max(engine.steps_seen)  # long before max_tokens
    assert not live.server.serving.worker.num_open
    assert console_errors() == []
