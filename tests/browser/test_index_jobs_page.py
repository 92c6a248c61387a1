"""The Jobs tab's indexing jobs in a real Chromium, with a real Celery worker: a job queued
while no worker runs shows as queued and waiting; once a worker takes it the row reaches
succeeded with its bar full and its tallies; the items are then in the store."""

from __future__ import annotations

import io

import numpy as np
import pytest
from _procs import wait_until
from pages import patient_wait
from PIL import Image
from selenium.webdriver.common.by import By

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

IMAGES = 24
READ_ROW = """const row = document.querySelector(`#index-jobs-body tr[data-id="${arguments[0]}"]`);
if (!row) return null;
const bar = row.querySelector("progress");
return [row.dataset.state, bar.dataset.step, bar.dataset.total, row.querySelector(".tallies").textContent];"""


def test_index_job_shows_its_state_and_progress(web_stack, browser, screenshot, empty_store) -> None:
    folder = web_stack.data_dir / "datasets" / "web-photos"
    rng = np.random.default_rng(11)
    for i in range(IMAGES):
        (folder / f"set{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"set{i % 2}" / f"{i}.png")
    for worker in web_stack.live_workers():  # the job must wait in the queue first
        worker.terminate()
        worker.wait(60)

    answer = web_stack.http.post("/index-jobs", json={"dataset": "web-photos", "folders_as": "set", "batch_size": 4})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    browser.get(web_stack.base_url + "/#/jobs")
    queued = patient_wait(browser, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f'#index-jobs-body tr[data-id="{job_id}"]')
    )
    assert queued.get_attribute("data-state") == "queued" and "waiting" in queued.text
    assert queued.find_element(By.TAG_NAME, "button").text == "Cancel"

    web_stack.start_worker()
    seen: list[tuple] = []

    def finished(driver) -> bool:
        row = driver.execute_script(READ_ROW, job_id)
        if row:
            seen.append(tuple(row))
        return bool(row) and row[0] in ("succeeded", "failed", "cancelled")

    patient_wait(browser, 120).until(finished)
    state, step, total, counts = seen[-1]
    assert (state, step, total) == ("succeeded", str(IMAGES), str(IMAGES)), (
        seen[-3:],
        web_stack.http.get(answer.json()["url"]).text,
    )
    assert counts == f"{IMAGES} added, 0 replaced, 0 unchanged"
    row = browser.find_element(By.CSS_SELECTOR, f'#index-jobs-body tr[data-id="{job_id}"]')
    assert f"{IMAGES} / {IMAGES} images (100%)" in row.text and "web-photos" in row.text
    assert not row.find_elements(By.TAG_NAME, "button")  # a finished job has nothing to cancel
    assert browser.find_element(By.ID, "index-jobs-empty").get_attribute("hidden") is not None
    screenshot("index-jobs")
    assert web_stack.http.get("/items/set1/1.png").json()["metadata"] == {"set": "set1"}


READ_REEMBEDDING = """const row = document.querySelector('#index-jobs-body tr[data-id="reembedding"]');
if (!row) return null;
const bar = row.querySelector("progress");
return [row.dataset.state, bar.dataset.step, bar.dataset.total, row.textContent];"""


def test_the_re_embedding_an_activation_starts_shows_as_a_job(web_stack, browser, model_ids, empty_store) -> None:
    rng = np.random.default_rng(12)
    files = []
    for i in range(9):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
        files.append(("files", (f"r{i}.png", buf.getvalue(), "image/png")))
    ids = [f"r{i}" for i in range(9)]
    assert web_stack.http.post("/items", files=files, data={"ids": ids}).status_code == 201
    served = web_stack.http.get("/models").json()["active"]
    other = model_ids[1] if served == model_ids[0] else model_ids[0]
    assert web_stack.http.post(f"/models/{other}/activate").status_code == 200

    # The page polls while a re-embedding runs; one that has not claimed its work yet is not shown.
    def started() -> bool:
        job = web_stack.http.get("/models").json()["reembedding"]
        return bool(job) and job["space"].startswith(other)

    wait_until(started, 60, f"the re-embedding for {other} to start")

    browser.get(web_stack.base_url + "/#/jobs")
    seen: list[tuple] = []

    def finished(driver) -> bool:
        row = driver.execute_script(READ_REEMBEDDING)
        if row:
            seen.append(tuple(row))
        return bool(row) and row[0] in ("succeeded", "failed")

    patient_wait(browser, 120).until(finished)  # the list polls while the re-embedding runs
    state, step, total, text = seen[-1]
    assert (state, step, total) == ("succeeded", "9", "9"), seen[-3:]
    assert f"Re-embedding for {other}" in text and "9 of 9 items embedded" in text and "9 / 9 items (100%)" in text
    stored = web_stack.http.get("/items", params={"limit": 100}).json()["items"]
    assert all(other in item["models"] for item in stored), stored
