"""The Models tab in a real Chromium: the registry's cards, the active one marked, activation."""

from __future__ import annotations

import pytest
from pages import patient_wait
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC

pytestmark = [pytest.mark.browser, pytest.mark.integration]


def card(browser, model_id: str):
    return browser.find_element(By.CSS_SELECTOR, f'#models article[data-id="{model_id}"]')


def test_cards_and_activate_the_other_model(web_stack, browser, model_ids, screenshot) -> None:
    wait = patient_wait(browser, 30)
    served = web_stack.http.get("/models").json()["active"]
    assert served in model_ids
    other = model_ids[1] if served == model_ids[0] else model_ids[0]

    # Reach the tab by keyboard: focus the selected tab, End to the last tab (Classify), then
    # one arrow back to "Models" (tabs pattern).
    browser.get(web_stack.base_url + "/")
    search_tab = browser.find_element(By.ID, "tab-search")
    assert search_tab.get_attribute("aria-selected") == "true"
    search_tab.send_keys(Keys.END)
    wait.until(lambda d: d.current_url.endswith("#/classify"))
    browser.switch_to.active_element.send_keys(Keys.ARROW_LEFT)
    wait.until(lambda d: d.current_url.endswith("#/models"))
    assert browser.switch_to.active_element == browser.find_element(By.ID, "tab-models")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models article")) >= 2)

    registry = {m["model_id"]: m for m in web_stack.http.get("/models").json()["models"]}
    for model_id in model_ids:
        text = card(browser, model_id).text
        m = registry[model_id]
        for shown in (
            m["method"],
            m["backbone"],
            f"{m['input_size']} px",
            f"{m['embedding_dim']} dims",
            m["dataset_fingerprint"][:12],
            f"knn_top1: {m['metrics']['knn_top1']}",
        ):
            assert shown in text, (model_id, shown, text)
    assert card(browser, served).get_attribute("data-active") == "true"
    assert card(browser, other).get_attribute("data-active") == "false"

    button = card(browser, other).find_element(By.CSS_SELECTOR, "button.activate")
    assert button.accessible_name == f"Activate {other}"
    button.click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "notice"), f"Model {other} is now active"))
    wait.until(lambda d: card(d, other).get_attribute("data-active") == "true")
    assert card(browser, served).find_element(By.CSS_SELECTOR, "button.activate").is_enabled()
    answer = web_stack.http.get("/models").json()
    assert answer["active"] == other
    assert [m["model_id"] for m in answer["models"] if m["active"]] == [other]
    screenshot("models")
