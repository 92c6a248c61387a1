"""Driving the page: Debian's headless Chromium at a fixed viewport, palette screenshots, and
waits that survive re-renders (element handles found in one poll can be stale by the next read,
so waits retry on a stale reference as they do on a missing element).

Shared by the page tests (tests/browser/conftest.py) and tools/readme_screenshots.py."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WINDOW = (1200, 800)


def chromium_installed() -> bool:
    return CHROMIUM.exists() and CHROMEDRIVER.exists()


def start_chromium() -> WebDriver:
    """A fresh headless Chromium (fresh sessionStorage) whose viewport is WINDOW, console logged."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    # The viewport itself is WINDOW (the window size would include the browser's frame).
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False},
    )
    return driver


def save_screenshot(browser: WebDriver, path: Path) -> Path:
    """The viewport as a palette PNG at `path` (small enough to commit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def patient_wait(browser: WebDriver, timeout: float = 30) -> WebDriverWait:
    return WebDriverWait(browser, timeout, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
