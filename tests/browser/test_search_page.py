"""The Search tab in a real Chromium: index images from the page, search with one of them (by
upload and by indexed item) and see its neighbours with the right ids; API errors shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pages import patient_wait
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC

pytestmark = [pytest.mark.browser, pytest.mark.integration]

QUERY = 3  # digit-3.png is the query image


def result_ids(browser) -> list[str]:
    """Read in one script call: the page re-renders the list, so element handles can go stale."""
    return browser.execute_script(
        'return Array.from(document.querySelectorAll("#results li"), li => li.getAttribute("data-id"));'
    )


@pytest.mark.usefixtures("empty_store")
def test_index_then_search_by_image_and_by_item(web_stack, browser, digit_files: list[Path], screenshot) -> None:
    wait = patient_wait(browser, 30)
    browser.get(web_stack.base_url + "/#/search")

    # Index the ten digits through the page: ids default to the file stems; metadata per file.
    browser.find_element(By.ID, "add-files").send_keys("\n".join(str(p) for p in digit_files))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".add-id")) == len(digit_files))
    for i, meta in enumerate(browser.find_elements(By.CSS_SELECTOR, ".add-meta")):
        meta.send_keys(json.dumps({"label": str(i)}))
    browser.find_element(By.ID, "add-submit").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "notice"), f"Added {len(digit_files)} items"))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#items li")) == len(digit_files))
    stored = web_stack.http.get("/items", params={"limit": 100}).json()
    assert {i["id"]: i["metadata"] for i in stored["items"]} == {f"digit-{n}": {"label": str(n)} for n in range(10)}

    # Search by upload: the query's own item comes first, as the API itself answers.
    k_input = browser.find_element(By.ID, "search-k")
    k_input.clear()
    k_input.send_keys("4")
    browser.find_element(By.ID, "search-file").send_keys(str(digit_files[QUERY]))
    browser.find_element(By.ID, "search-submit").click()
    wait.until(lambda d: len(result_ids(d)) == 4)
    with open(digit_files[QUERY], "rb") as fh:
        expected = web_stack.http.post("/search", files={"file": ("q.png", fh, "image/png")}, data={"k": "4"}).json()
    assert result_ids(browser) == [hit["id"] for hit in expected["results"]]
    top = browser.find_element(By.CSS_SELECTOR, "#results li")
    assert top.get_attribute("data-id") == f"digit-{QUERY}"
    assert float(top.get_attribute("data-score")) == pytest.approx(1.0, abs=1e-4)
    assert "label" in top.text and f"\n{QUERY}" in top.text  # metadata shown
    # Thumbnails are the kept originals (16x16 PNGs), loaded.
    wait.until(
        lambda d: all(
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 16
            for img in d.find_elements(By.CSS_SELECTOR, "#results li img")
        )
    )
    screenshot("search")

    # Search by an indexed item: its "Find similar" button.
    browser.find_element(By.CSS_SELECTOR, '#items li[data-id="digit-7"] button').click()
    wait.until(lambda d: result_ids(d)[:1] == ["digit-7"])
    expected = web_stack.http.post("/search", json={"item_id": "digit-7", "k": 4}).json()
    assert result_ids(browser) == [hit["id"] for hit in expected["results"]]

    # A metadata filter restricts both searches to the matching items.
    browser.find_element(By.ID, "search-filter").send_keys(json.dumps({"label": {"in": ["2", "5"]}}))
    browser.find_element(By.ID, "search-submit").click()
    wait.until(lambda d: sorted(result_ids(d)) == ["digit-2", "digit-5"])
    browser.find_element(By.CSS_SELECTOR, '#items li[data-id="digit-7"] button').click()
    wait.until(lambda d: sorted(result_ids(d)) == ["digit-2", "digit-5"])


def test_api_error_message_is_shown(web_stack, browser, tmp_path: Path) -> None:
    """A file that is not an image: the page shows the API's own error message in the alert region."""
    bogus = tmp_path / "notes.png"
    bogus.write_bytes(b"these bytes are not an image")
    with open(bogus, "rb") as fh:
        answer = web_stack.http.post("/search", files={"file": ("notes.png", fh, "image/png")})
    assert answer.status_code == 415
    error = answer.json()["error"]

    browser.get(web_stack.base_url + "/#/search")
    browser.find_element(By.ID, "search-file").send_keys(str(bogus))
    browser.find_element(By.ID, "search-submit").click()
    alert = patient_wait(browser, 20).until(EC.visibility_of_element_located((By.CSS_SELECTOR, '#error[role="alert"]')))
    patient_wait(browser, 20).until(lambda d: alert.get_attribute("data-code") == error["code"])
    assert error["message"] in alert.text
