"""A real headless Chromium driven by selenium, for the status page's tests and screenshot.

Debian's chromium and chromium-driver (.ci/run installs them). Selenium gets both paths
explicitly, so its own driver manager never tries to download one; the flags keep the
browser from reaching out to anything but the agent under test.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
QUIET_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-default-apps", "--disable-extensions", "--no-first-run",
               "--disable-features=Translate,OptimizationHints,MediaRouter",
               "--hide-scrollbars", "--force-device-scale-factor=1")


def browser_available() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


def chromium(profile: Path, width: int = 1280, height: int = 900,
             flags: tuple[str, ...] = ()) -> webdriver.Chrome:
    """A headless Chromium with its console log kept, in a profile of its own (`flags`:
    more command-line switches, e.g. a --host-resolver-rules that maps a name to 127.0.0.1)."""
    os.environ["SE_OFFLINE"] = "true"  # never let selenium's manager go online
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*QUIET_FLAGS, f"--user-data-dir={profile}", *flags):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_window_size(width, height)
    return driver


def console_errors(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """What the page wrote to the console at SEVERE level since the last call."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]  # selenium leaves it untyped
    return [entry for entry in entries if entry["level"] == "SEVERE"]
