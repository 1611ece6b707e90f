"""`chattune ui` in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium at
/usr/bin/chromedriver; nothing is downloaded): the page of a `chattune ui` process starts a short run on
builtin:tiny-qwen2 from the form (a bad field first, its error shown by the field), shows at least 3 loss
points, re-attaches after a reload, stops the run and shows it interrupted; a run started from the shell
is listed like it, and its Chat tab streams answers; the page follows the browser's language and the
toggle switches English / Chinese. Screenshots go to test-artifacts/ui/ (or $CHATTUNE_UI_SCREENSHOTS).
Skipped where Chromium is missing, except under CI=true, where that is a failure."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, write_huanhuan_slice
from ui_runs import child_env, form_values, shell_run, wait_for

from chattune.ui.launch import cli_argv

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SHOTS = Path(os.environ.get("CHATTUNE_UI_SCREENSHOTS") or REPO / "test-artifacts" / "ui")


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file():
            return f"{path} not found (apt-get install -y chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    why = _missing()
    if why and os.environ.get("CI") == "true":
        pytest.fail(f"the browser tests must run in CI: {why}")
    if why:
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1100",
        "--lang=en-US",
    ):
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {"intl.accept_languages": "en-US,en"})
    # An explicit driver path: Selenium Manager (which downloads drivers) is never started.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A real `chattune ui` process on a free loopback port, and its runs directory."""
    work = tmp_path_factory.mktemp("ui")
    runs_dir = work / "runs"
    runs_dir.mkdir()
    port = _free_port()
    log = work / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cli_argv("ui", "--port", str(port), "--runs-dir", str(runs_dir)),
            env=child_env(),
            cwd=work,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: _answers(port), 60, "chattune ui to listen")
        assert f"http://127.0.0.1:{port}/" in log.read_text(), log.read_text()  # the printed URL
        yield f"http://127.0.0.1:{port}", runs_dir, work
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shot(driver, name: str, *, whole_page: bool = False) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    size = driver.get_window_size()
    if whole_page:  # the window as tall as the page, for one picture of all of it
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(size["width"], min(height + 140, 6000))
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    driver.set_window_size(size["width"], size["height"])


def _css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def _type(driver, key: str, text: str) -> None:
    box = _css(driver, f'[id="f-{key}"]')
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
    box.clear()
    box.send_keys(text)


def _points(driver) -> int:
    found = driver.find_elements("css selector", '[data-chart="train/loss"]')
    return int(found[0].get_attribute("data-points") or 0) if found else 0


def test_the_whole_job_in_a_real_browser(browser, ui, one_torch_thread):
    url, runs_dir, work = ui
    driver = browser
    shell_run(runs_dir, "from-shell")  # a finished run started from the shell, for Runs and Chat
    driver.get(url + "/#/runs")
    wait_for(
        lambda: driver.find_elements("css selector", 'tr[data-run="from-shell"] [data-state="finished"]'),
        30,
        "the shell run listed",
    )
    assert _css(driver, 'nav a[data-tab="runs"]').text == "Runs"  # the browser's language: English

    # New run: a bad field is refused next to the field, by the config's own check.
    driver.get(url + "/#/new")
    wait_for(lambda: driver.find_elements("css selector", '[id="f-train.lr"]'), 30, "the form")
    fields = driver.find_elements("css selector", "#config-form .field")
    assert len(fields) == len(driver.execute_script("return SCHEMA.flatMap(s => s.fields)"))  # every key
    assert "Training data" in _css(driver, '[data-key="data.train_path"] .doc').text
    data = write_huanhuan_slice(work, 20)
    for key, text in form_values(data, runs_dir / "from-form", max_steps=500).items():
        _type(driver, key, text)
    # The data file goes through the page's upload: data.train_path becomes the uploaded copy.
    _css(driver, "#data-upload").send_keys(str(data))
    uploaded = str(runs_dir / ".chattune-ui" / "uploads" / data.name)
    wait_for(
        lambda: _css(driver, '[id="f-data.train_path"]').get_attribute("value") == uploaded, 30, "the upload"
    )
    _type(driver, "train.lr", "abc")
    _css(driver, "#check").click()
    error = _css(driver, '[data-error-for="train.lr"]')
    wait_for(error.is_displayed, 20, "the train.lr error")
    assert "train.lr" in error.text and "float" in error.text
    _shot(driver, "form-error")
    _type(driver, "train.lr", "2e-4")
    _css(driver, "#check").click()
    wait_for(lambda: _css(driver, "#preview").is_displayed(), 20, "the YAML preview")
    assert _css(driver, "#preview-command").text.startswith("chattune train ")
    assert "lr: 2e-4" in _css(driver, "#preview-yaml").text
    # Data: `chattune data preview` on the form's config, the trained tokens (end of turn too) marked.
    _css(driver, 'button[data-command="preview"]').click()
    wait_for(
        lambda: _css(driver, "#data-output").get_attribute("data-done") == "preview", 120, "the data preview"
    )
    marks = driver.find_elements("css selector", "#data-output mark")
    assert len(marks) == 5 and all(m.text.endswith("<|im_end|>") for m in marks)
    _css(driver, "#start").click()

    # Live: loss points arrive over server-sent events while `chattune train` runs.
    wait_for(lambda: driver.current_url.endswith("#/run/from-form"), 20, "the run page")
    wait_for(lambda: _points(driver) >= 3, 240, "3 loss points on the chart")
    assert _css(driver, "#run-state").get_attribute("data-state") == "running"
    assert not _css(driver, "#run-error").is_displayed()
    _shot(driver, "run-live", whole_page=True)
    # A reload re-attaches: the same run, the points so far, still live.
    before = _points(driver)
    driver.refresh()
    wait_for(lambda: _points(driver) >= before, 60, "the chart after a reload")
    wait_for(lambda: _points(driver) > before, 120, "new points after the reload")
    assert _css(driver, "#run-state").get_attribute("data-state") == "running"
    assert "baseline" in _css(driver, "#samples-table").text
    _css(driver, "#run-stop").click()
    wait_for(
        lambda: _css(driver, "#run-state").get_attribute("data-state") == "interrupted", 120, "interrupted"
    )
    _shot(driver, "run-interrupted")
    assert (runs_dir / "from-form" / "run_state.json").read_text().count("interrupted") == 1

    # Chat: the shell run's fine-tune and its base, streamed.
    driver.get(url + "/#/chat/from-shell")
    wait_for(lambda: _css(driver, "#chat-run").get_attribute("value") == "from-shell", 30, "the chat run")
    _css(driver, "#chat-input").send_keys("你是谁？")
    _css(driver, "#chat-send").click()
    wait_for(lambda: _css(driver, "#chat-tuned").get_attribute("data-done"), 180, "the streamed answer")
    assert not _css(driver, "#chat-error").is_displayed(), (work / "ui.log").read_text()
    for pane in ("#chat-base", "#chat-tuned"):
        assert _css(driver, pane).text.strip() and int(_css(driver, pane).get_attribute("data-pieces")) >= 1
    _shot(driver, "chat")

    # Languages: the toggle, then the browser's own language on a fresh visit.
    _css(driver, "#lang-toggle").click()
    assert _css(driver, 'nav a[data-tab="runs"]').text == "运行"
    assert _css(driver, "#view-chat h1").text == "对话"
    assert _css(driver, "#chat-system").text.startswith(
        "训练时没有系统提示词"
    )  # drawn from data, redrawn too
    _shot(driver, "chat-zh")
    driver.execute_script("localStorage.clear()")
    driver.execute_cdp_cmd("Emulation.setLocaleOverride", {"locale": "zh-CN"})
    driver.get(url + "/#/runs")
    wait_for(lambda: _css(driver, 'nav a[data-tab="runs"]').text == "运行", 20, "Chinese from the browser")
    wait_for(lambda: "已完成" in _css(driver, "#runs-table").text, 20, "the states in Chinese")
    driver.execute_cdp_cmd("Emulation.setLocaleOverride", {"locale": ""})
