"""The Jobs tab in a real Chromium, with a real Celery worker: submit a tiny job from the form,
watch its progress bar move and its state reach succeeded, with a loss curve and throughput."""

from __future__ import annotations

import json
import time

import pytest
from pages import patient_wait
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

STEPS = 12
FORM = {
    "job-dataset": "digits.npz",
    "job-name": "web-tiny",
    "job-image-size": "16",
    "job-epochs": "1",
    "job-batch-size": "16",
    "job-base-lr": "0.3",
    "job-temperature": "0.5",
}
# What the form has no field for: the tiny-run settings of the job tests (tests/integration/jobstack.py).
EXTRA = {
    "max_steps": STEPS,
    "small_stem": True,
    "warmup_epochs": 0.0,
    "num_workers": 0,
    "log_every_steps": 1,
    "checkpoint_every_steps": 100,
    "precision": "fp32",
    "channels_last": False,
}

READ_VIEW = """const view = document.getElementById("job-view"), bar = view.querySelector("progress");
return [view.dataset.state || null, bar ? bar.dataset.step : null];"""


def test_submit_job_and_watch_it_succeed(web_stack, browser, screenshot) -> None:
    if not web_stack.live_workers():
        web_stack.start_worker()
    active_before = web_stack.http.get("/models").json()["active"]
    browser.get(web_stack.base_url + "/#/jobs")
    for field_id, value in FORM.items():
        box = browser.find_element(By.ID, field_id)
        box.clear()
        box.send_keys(value)
    Select(browser.find_element(By.ID, "job-method")).select_by_value("simclr")
    Select(browser.find_element(By.ID, "job-backbone")).select_by_value("resnet18")
    browser.find_element(By.ID, "job-activate").click()  # untick: keep the served model
    browser.find_element(By.ID, "job-extra").send_keys(json.dumps(EXTRA))
    browser.find_element(By.ID, "job-submit").click()

    patient_wait(browser, 30).until(lambda d: d.current_url.split("#/jobs/")[-1] not in ("", d.current_url))
    job_id = browser.current_url.split("#/jobs/")[-1]
    request = web_stack.job(job_id)["request"]
    assert {k: request[k] for k in ("image_size", "epochs", "batch_size", "max_steps", "activate", "temperature")} == {
        "image_size": 16,
        "epochs": 1,
        "batch_size": 16,
        "max_steps": STEPS,
        "activate": False,
        "temperature": 0.5,
    }

    # Read the page (not the API) about twice a second until the job is over.
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        state, step = browser.execute_script(READ_VIEW)  # one read: the view is re-rendered every second
        if state:
            seen.append((state, int(step)))
        if state in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert seen and seen[-1] == ("succeeded", STEPS), (seen[-5:], web_stack.job(job_id).get("error"))
    moving = [step for state, step in seen if state == "running" and 0 < step < STEPS]
    assert moving, f"the bar never showed a step between 0 and {STEPS} while running: {seen}"
    assert [s for _, s in seen] == sorted(s for _, s in seen), "the bar went backwards"

    view = browser.find_element(By.ID, "job-view")
    bar = view.find_element(By.TAG_NAME, "progress")
    assert bar.get_attribute("value") == bar.get_attribute("max") == str(STEPS)
    assert "images/s" in view.text and f"{STEPS} of {STEPS}" in view.text
    # The loss curve: one point per logged step, the last at the last step.
    history = web_stack.job(job_id)["loss_history"]
    path = view.find_element(By.CSS_SELECTOR, "svg.chart path.line").get_attribute("d")
    assert path.count("L") == len(history) - 1 and len(history) >= STEPS - 1
    assert f"at step {history[-1][0]}" in view.find_element(By.CSS_SELECTOR, "svg.chart desc").get_attribute(
        "textContent"
    )
    model_id = f"job-{job_id}"
    assert view.find_element(By.LINK_TEXT, model_id)
    screenshot("jobs")

    models = web_stack.http.get("/models").json()
    assert model_id in [m["model_id"] for m in models["models"]]
    assert models["active"] == active_before  # "activate" was unticked

    browser.find_element(By.LINK_TEXT, "← All jobs").click()
    row = patient_wait(browser, 20).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f'#jobs-body tr[data-id="{job_id}"]')
    )
    assert row.get_attribute("data-state") == "succeeded" and "web-tiny" in row.text
