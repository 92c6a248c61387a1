"""The Classify tab in a real Chromium: a classifier from a metadata field and one from labels
typed on the page, their cross-validated accuracy and confusion matrix as the API reports them,
an image classified as the API classifies it, and the API's error shown."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pages import patient_wait
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select

pytestmark = [pytest.mark.browser, pytest.mark.integration]

DIGITS, PER_CLASS = (0, 1, 7), 5


@pytest.fixture(scope="module")
def labeled_digits(digits_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Five real scans each of 0, 1 and 7: uint8 [15, 16, 16, 3] (upscaled 2x, as RGB), labels [15]."""
    with np.load(digits_path) as data:
        x, y = data["x_train"], data["y_train"]
    picks = np.concatenate([np.flatnonzero(y == d)[:PER_CLASS] for d in DIGITS])
    return np.repeat(x[picks].repeat(2, axis=1).repeat(2, axis=2), 3, axis=-1), y[picks]


def png_bytes(image: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def table_cells(browser) -> list[list[int]]:
    return browser.execute_script(
        'return Array.from(document.querySelectorAll("#confusion tbody tr"),'
        ' tr => Array.from(tr.querySelectorAll("td"), td => Number(td.textContent)));'
    )


@pytest.mark.usefixtures("empty_store")
def test_create_see_cv_and_classify_an_image(web_stack, browser, labeled_digits, tmp_path: Path, screenshot) -> None:
    images, labels = labeled_digits
    ids = [f"scan-{i}" for i in range(len(images))]
    files = [("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in zip(ids, images, strict=True)]
    meta = [json.dumps({"digit": str(int(d))}) for d in labels]
    assert web_stack.http.post("/items", files=files, data={"ids": ids, "metadata": meta}).status_code == 201

    wait = patient_wait(browser, 60)
    browser.get(web_stack.base_url + "/#/classify")
    browser.find_element(By.ID, "classifier-name").send_keys("digits-page")
    browser.find_element(By.ID, "classifier-label-key").send_keys("digit")
    browser.find_element(By.ID, "classifier-submit").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "notice"), "Created classifier digits-page"))

    made = next(c for c in web_stack.http.get("/classifiers").json()["classifiers"] if c["name"] == "digits-page")
    accuracy = wait.until(EC.presence_of_element_located((By.ID, "cv-accuracy")))
    assert float(accuracy.get_attribute("data-value")) == pytest.approx(made["cv"]["accuracy"])
    assert f"{100 * made['cv']['accuracy']:.1f}%" in accuracy.text
    assert table_cells(browser) == made["cv"]["confusion"]
    assert [c["label"] for c in made["classes"]] == [str(d) for d in DIGITS]

    # Classify a scan that is not an example: the page shows what the API answers for the file.
    with np.load(web_stack.data_dir / "datasets" / "digits.npz") as data:
        x, y = data["x_test"], data["y_test"]
    query = np.repeat(x[np.flatnonzero(y == 7)[0]].repeat(2, axis=0).repeat(2, axis=1), 3, axis=-1)
    query_path = tmp_path / "query-7.png"
    query_path.write_bytes(png_bytes(query))
    browser.find_element(By.ID, "classify-file").send_keys(str(query_path))
    browser.find_element(By.ID, "predict-submit").click()
    shown = wait.until(EC.presence_of_element_located((By.ID, "predicted-label")))
    with open(query_path, "rb") as fh:
        answer = web_stack.http.post(f"/classifiers/{made['id']}/predict", files={"files": ("q.png", fh, "image/png")})
    expected = answer.json()["predictions"][0]
    assert shown.text == expected["label"]
    top = browser.execute_script(
        'return Array.from(document.querySelectorAll("#prediction-top li"), li => li.dataset.label);'
    )
    assert top == [t["label"] for t in expected["top_k"]]
    screenshot("classify")

    # Labels given on the page ("item id, label" lines; integer labels stay integers).
    browser.find_element(By.ID, "source-labels").click()
    browser.find_element(By.ID, "classifier-name").clear()
    browser.find_element(By.ID, "classifier-name").send_keys("typed")
    Select(browser.find_element(By.ID, "classifier-method")).select_by_value("knn")
    lines = "\n".join(f"{i}, {int(d)}" for i, d in zip(ids, labels, strict=True))
    browser.find_element(By.ID, "classifier-labels").send_keys(lines)
    browser.find_element(By.ID, "classifier-submit").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "notice"), "Created classifier typed"))
    typed = next(c for c in web_stack.http.get("/classifiers").json()["classifiers"] if c["name"] == "typed")
    assert typed["method"] == "knn" and [c["label"] for c in typed["classes"]] == list(DIGITS)
    assert (
        Select(browser.find_element(By.ID, "classifier-select")).first_selected_option.get_attribute("value")
        == typed["id"]
    )
    wait.until(lambda d: table_cells(d) == typed["cv"]["confusion"])

    # An API error is shown with its code: one class only.
    browser.find_element(By.ID, "classifier-name").clear()
    browser.find_element(By.ID, "classifier-name").send_keys("single")
    browser.find_element(By.ID, "classifier-labels").clear()
    browser.find_element(By.ID, "classifier-labels").send_keys(f"{ids[0]}, a\n{ids[1]}, a")
    browser.find_element(By.ID, "classifier-submit").click()
    alert = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, '#error[role="alert"]')))
    wait.until(lambda d: alert.get_attribute("data-code") == "one_class")
