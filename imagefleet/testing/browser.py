"""A real headless Chromium for tests of the web pages, driven by Selenium through chromedriver.

Debian's ``chromium`` and ``chromium-driver`` packages provide both binaries (``.ci/run``
installs them when missing). Without them the browser tests skip, unless
``IMAGEFLEET_REQUIRE_BROWSER`` is set (CI sets it): then they fail, so a missing browser never
turns into a quietly skipped suite.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

REQUIRE_ENV = "IMAGEFLEET_REQUIRE_BROWSER"
OUTPUT_ENV = "IMAGEFLEET_TEST_OUTPUT"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def binaries() -> tuple[str, str]:
    """(browser, chromedriver) paths; skips or fails when either is missing."""
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        message = "needs chromium and chromedriver (apt-get install chromium chromium-driver)"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(message + f"; {REQUIRE_ENV} is set")
        pytest.skip(message)
    return browser, driver


@contextlib.contextmanager
def chromium(width: int = 1000, height: int = 1000) -> Iterator[webdriver.Chrome]:
    """A headless Chromium that keeps the page's console log (read it with :func:`console`)."""
    browser, driver = binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def console(chrome: webdriver.Chrome) -> list[dict[str, Any]]:
    """The console entries since the last call (Chromium hands each entry out once)."""
    return list(chrome.get_log("browser"))  # type: ignore[no-untyped-call]


def errors(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("level") == "SEVERE"]


def output_dir(fallback: Path) -> Path:
    """Where screenshots go: ``$IMAGEFLEET_TEST_OUTPUT`` when set, else ``fallback``."""
    out = Path(os.environ.get(OUTPUT_ENV) or fallback)
    out.mkdir(parents=True, exist_ok=True)
    return out
