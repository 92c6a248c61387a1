"""Waiting on a page that re-renders: element handles found in one poll can be stale by the next
read, so waits retry on a stale reference as they do on a missing element."""

from __future__ import annotations

from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait


def patient_wait(browser: WebDriver, timeout: float = 30) -> WebDriverWait:
    return WebDriverWait(browser, timeout, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
