"""The status page in a real headless Chromium, against a real agent with fake GPUs.

What is asserted is what a person would see: every service and GPU with its status and
VRAM, changes appearing without a reload, the token prompt, no console errors, no
horizontal scroll on a phone, nothing loaded from another host. Screenshots go to the
test's temporary directory.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests.agent_process import AgentProcess, AgentProcesses, post_json
from tests.browser import browser_available, chromium, console_errors
from tests.conftest import TEST_IMAGE

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(not browser_available() and os.environ.get("CI") != "true",
                       reason="needs chromium and chromium-driver (.ci/run installs them)"),
]


@pytest.fixture
def agents(agent_processes: AgentProcesses) -> Callable[..., AgentProcess]:
    return functools.partial(agent_processes.start, "--fake-gpus", "RTX 4090:24,RTX 4090:24")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    driver = chromium(tmp_path / "chromium")
    try:
        yield driver
    finally:
        driver.quit()


def deploy(agent: AgentProcess, name: str, **body: Any) -> dict[str, Any]:
    status, answer = post_json(agent.url + "/deploy", {"name": name, "image": TEST_IMAGE, **body})
    assert status == 200, answer
    return dict(answer)


def eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """check()'s first truthy result; fails after timeout (a bound for a loaded machine, not a
    timing: the page's own period is what makes it come at all)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, "not seen in time"
        time.sleep(0.1)


def rows(browser: webdriver.Chrome) -> dict[str, dict[str, str]]:
    """The services table as a person reads it: name -> {column: text}, read in one go (the
    page redraws it every second)."""
    table = browser.execute_script("""
        const text = (cell) => cell.textContent.trim();
        return {headers: [...document.querySelectorAll('#services thead th')].map(text),
                rows: [...document.querySelectorAll('#services tbody tr')].map(
                    (tr) => [tr.dataset.service, [...tr.querySelectorAll('th, td')].map(text)])};""")
    return {name: dict(zip(table["headers"], cells, strict=True)) for name, cells in table["rows"]}


def resources(browser: webdriver.Chrome) -> list[str]:
    return list(browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"))


class TestWhatAPersonSees:
    """Services, GPUs, events, the agent's state; kept current without a reload."""

    def test_services_gpus_and_changes(self, agents: Any, browser: webdriver.Chrome,
                                       tmp_path: Path) -> None:
        agent = agents()
        deploy(agent, "t-page-a", gpu=True, vram_gb=8)
        deploy(agent, "t-page-b", gpu=True, vram_gb=12)
        deploy(agent, "t-page-c", lease_s=600)
        browser.get(agent.url + "/")
        table = eventually(lambda: len(rows(browser)) == 3 and rows(browser))
        assert {name: row["Status"] for name, row in table.items()} == {
            "t-page-a": "healthy", "t-page-b": "healthy", "t-page-c": "healthy"}
        assert (table["t-page-a"]["VRAM declared"], table["t-page-b"]["VRAM declared"]) == ("8 GB", "12 GB")
        assert table["t-page-c"]["URL"].startswith("http://127.0.0.1:")
        assert table["t-page-c"]["Leases"].startswith("1 until")
        assert "VRAM used" not in table["t-page-a"]  # fake GPUs observe nothing: no column
        link = browser.find_element(By.CSS_SELECTOR, "tr[data-service='t-page-a'] a")
        assert (link.get_attribute("href") or "").rstrip("/") == table["t-page-a"]["URL"]

        gpus = browser.find_elements(By.CSS_SELECTOR, "#gpus .gpu")
        assert [g.find_element(By.TAG_NAME, "h3").text for g in gpus] == ["GPU 0 · RTX 4090",
                                                                          "GPU 1 · RTX 4090"]
        legends = " | ".join(g.find_element(By.CLASS_NAME, "legend").text for g in gpus)
        assert "t-page-a: declared 8 GB" in legends and "t-page-b: declared 12 GB" in legends
        assert "free: 12 GB" in legends and "free: 16 GB" in legends
        header = browser.find_element(By.TAG_NAME, "header").text
        assert "reachable" in header and "off" in header and "0.1.0" in header
        events = browser.find_element(By.ID, "events").text
        assert events.count("deployed") == 3
        browser.save_screenshot(str(tmp_path / "page.png"))

        browser.execute_script("window.notReloaded = true")
        deploy(agent, "t-page-d")
        eventually(lambda: "t-page-d" in rows(browser))
        assert post_json(agent.url + "/stop", {"name": "t-page-b"})[0] == 200
        eventually(lambda: "t-page-b" not in rows(browser))
        assert "stopped" in browser.find_element(By.ID, "events").text
        assert browser.execute_script("return window.notReloaded") is True

        origin = agent.url + "/"
        assert all(name.startswith(origin) for name in resources(browser)), resources(browser)
        assert console_errors(browser) == []

    def test_logs_tail_then_follow(self, agents: Any, browser: webdriver.Chrome) -> None:
        agent = agents()
        deploy(agent, "t-page-logs")
        browser.get(agent.url + "/")
        eventually(lambda: "t-page-logs" in rows(browser))
        browser.find_element(By.CSS_SELECTOR, "tr[data-service='t-page-logs'] button").click()
        logs = browser.find_element(By.ID, "logs")
        eventually(lambda: "listening on 8000" in logs.text)
        before = logs.text.count("response:200")
        # httpd logs each request: the agent's health probes (every 0.5 s) keep it talking.
        eventually(lambda: logs.text.count("response:200") > before + 2)
        browser.find_element(By.ID, "logs-close").click()
        assert not browser.find_element(By.ID, "logs-section").is_displayed()
        assert console_errors(browser) == []

    def test_hidden_tab_stops_polling(self, agents: Any, browser: webdriver.Chrome) -> None:
        agent = agents()
        browser.get(agent.url + "/")
        eventually(lambda: browser.find_element(By.ID, "updated").text)
        calls = ("return performance.getEntriesByType('resource')"
                 ".filter(e => e.name.endsWith('/services')).length")
        browser.execute_script("""
            Object.defineProperty(document, 'visibilityState', {value: 'hidden', configurable: true});
            document.dispatchEvent(new Event('visibilitychange'));""")
        hidden_at = browser.execute_script(calls)
        for _ in range(10):  # until a call already out has landed: the count holds for 1.5 s
            time.sleep(1.5)
            landed = browser.execute_script(calls)
            if landed == hidden_at:
                break
            hidden_at = landed
        time.sleep(3)
        assert browser.execute_script(calls) == hidden_at  # nothing while hidden
        browser.execute_script("""
            Object.defineProperty(document, 'visibilityState', {value: 'visible', configurable: true});
            document.dispatchEvent(new Event('visibilitychange'));""")
        eventually(lambda: browser.execute_script(calls) > hidden_at)


class TestPhone:
    """Legible at 390 px: no horizontal scrolling, every service still there."""

    def test_no_horizontal_scroll(self, agents: Any, tmp_path: Path) -> None:
        agent = agents()
        deploy(agent, "t-page-phone-with-a-long-name", gpu=True, vram_gb=20, lease_s=600)
        deploy(agent, "t-page-phone-2")
        driver = chromium(tmp_path / "phone", width=390, height=844)
        try:
            driver.get(agent.url + "/")
            eventually(lambda: len(rows(driver)) == 2)
            time.sleep(1.2)  # a refresh or two, with everything rendered
            assert driver.execute_script("return window.innerWidth") == 390
            width = driver.execute_script("return document.documentElement.scrollWidth")
            assert width <= 390, width
            assert driver.find_element(By.CSS_SELECTOR, "tr[data-service='t-page-phone-2']").is_displayed()
            driver.save_screenshot(str(tmp_path / "phone.png"))
            assert console_errors(driver) == []
        finally:
            driver.quit()


class TestReadable:
    """Dark when the system is, and usable from the keyboard alone."""

    def test_dark_follows_the_system(self, agents: Any, browser: webdriver.Chrome) -> None:
        agent = agents()
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
            "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        browser.get(agent.url + "/")
        background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(13, 17, 23)"
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
            "features": [{"name": "prefers-color-scheme", "value": "light"}]})
        background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(255, 255, 255)"

    def test_keyboard_reaches_and_opens_the_logs(self, agents: Any, browser: webdriver.Chrome) -> None:
        agent = agents()
        deploy(agent, "t-page-keys")
        browser.get(agent.url + "/")
        eventually(lambda: "t-page-keys" in rows(browser))
        focused = ""
        for _ in range(30):
            ActionChains(browser).send_keys(Keys.TAB).perform()
            focused = browser.execute_script("return document.activeElement.getAttribute('aria-label')")
            if focused == "Logs of t-page-keys":
                break
        assert focused == "Logs of t-page-keys"
        time.sleep(2.5)  # the table is redrawn every second: the focus must stay put
        assert browser.execute_script("return document.activeElement.getAttribute('aria-label')") == focused
        ActionChains(browser).send_keys(Keys.ENTER).perform()
        eventually(lambda: browser.find_element(By.ID, "logs-section").is_displayed())
        assert browser.execute_script("return document.activeElement.id") == "logs"


class TestWithAuth:
    """The page asks for the token, makes no call that would fail, and keeps it out of URLs."""

    def test_token_prompt(self, agents: Any, browser: webdriver.Chrome, tmp_path: Path) -> None:
        agent = agents("--host", "0.0.0.0")
        token = (agent.state_dir / "token").read_text().strip()
        deploy_with = {"Authorization": f"Bearer {token}"}
        assert post_json(agent.url + "/deploy", {"name": "t-page-auth", "image": TEST_IMAGE},
                         headers=deploy_with)[0] == 200
        browser.get(agent.url + "/")
        prompt = eventually(lambda: browser.find_element(By.ID, "token-section").is_displayed()
                            and browser.find_element(By.ID, "token-section"))
        assert "deploy-agent token" in prompt.text
        assert not browser.find_element(By.ID, "services-section").is_displayed()
        time.sleep(1.5)
        assert not [r for r in resources(browser) if "/services" in r or "/gpus" in r or "/events" in r]
        assert console_errors(browser) == []  # no call that would fail
        browser.save_screenshot(str(tmp_path / "token.png"))

        field = browser.find_element(By.ID, "token")
        field.send_keys(token)
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        eventually(lambda: "t-page-auth" in rows(browser))
        assert browser.find_element(By.ID, "auth").text == "token required"
        assert browser.execute_script("return sessionStorage.getItem('deploy-agent-token')") == token
        assert token not in browser.current_url
        assert all(token not in name for name in resources(browser))
        assert token not in agent.log.read_text()
        assert console_errors(browser) == []


class TestQueue:
    def test_waiting_deploys_are_shown_until_placed(self, agents: Any, browser: webdriver.Chrome) -> None:
        agent = agents()
        deploy(agent, "t-page-full0", gpu=True, vram_gb=20, lease_s=600)  # pinned: never room
        deploy(agent, "t-page-full1", gpu=True, vram_gb=20)
        waiting = agent.deploy_in_background({"name": "t-page-wait", "image": TEST_IMAGE, "gpu": True,
                                              "vram_gb": 8, "wait_s": 60})
        browser.get(agent.url + "/")
        item = eventually(lambda: browser.find_elements(By.CSS_SELECTOR,
                                                        "#queue li[data-name='t-page-wait']"))
        assert "needs 8 GB" in item[0].text and browser.find_element(By.ID, "queue-section").is_displayed()
        assert post_json(agent.url + "/stop", {"name": "t-page-full0"})[0] == 200
        eventually(lambda: not browser.find_element(By.ID, "queue-section").is_displayed())
        waiting["thread"].join(30)
        assert waiting["status"] == 200
        assert console_errors(browser) == []
