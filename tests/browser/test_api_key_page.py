"""API keys in a real Chromium: with keys required (reads too), the page asks for one on a 401,
keeps it in sessionStorage and retries; a wrong key asks again; cancelling shows the API's error."""

from __future__ import annotations

import pytest
from pages import patient_wait
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC

pytestmark = [pytest.mark.browser, pytest.mark.integration]


def dialog_open(browser) -> bool:
    return browser.execute_script('return document.getElementById("key-dialog").open')


def test_key_prompt_retry_and_session(keyed_stack, api_key: str, browser, model_ids, screenshot) -> None:
    wait = patient_wait(browser, 30)
    auth = {"Authorization": f"Bearer {api_key}"}
    missing = keyed_stack.http.get("/models").json()["error"]
    invalid = keyed_stack.http.get("/models", headers={"Authorization": "Bearer wrong"}).json()["error"]
    assert (missing["code"], invalid["code"]) == ("missing_api_key", "invalid_api_key")

    browser.get(keyed_stack.base_url + "/#/models")
    wait.until(dialog_open)
    key_input = browser.find_element(By.ID, "key-input")
    assert key_input.accessible_name == "API key"
    assert browser.switch_to.active_element == key_input
    assert missing["message"] in browser.find_element(By.ID, "key-reason").text
    screenshot("api-key")

    key_input.send_keys("wrong", Keys.ENTER)  # the retry answers 401 invalid_api_key: asked again
    wait.until(EC.text_to_be_present_in_element((By.ID, "key-reason"), invalid["message"]))
    assert dialog_open(browser)
    browser.find_element(By.ID, "key-input").send_keys(api_key, Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models article")) >= 2)
    assert browser.execute_script('return sessionStorage.getItem("simclr-embed.api-key")') == api_key

    # A mutation carries the kept key.
    served = keyed_stack.http.get("/models", headers=auth).json()["active"]
    other = model_ids[1] if served == model_ids[0] else model_ids[0]
    browser.find_element(By.CSS_SELECTOR, f'#models article[data-id="{other}"] button.activate').click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "notice"), f"Model {other} is now active"))
    assert keyed_stack.http.get("/models", headers=auth).json()["active"] == other

    # The key survives a reload of the tab: no prompt.
    browser.refresh()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models article")) >= 2)
    assert not dialog_open(browser)

    # Without a key, cancelling the prompt shows the API's own message.
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait.until(dialog_open)
    browser.find_element(By.ID, "key-cancel").click()
    alert = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, '#error[role="alert"]')))
    wait.until(lambda d: alert.get_attribute("data-code") == "missing_api_key")
    assert missing["message"] in alert.text
