"""The README's screenshots (docs/screenshots/*.png), taken from what a user sees after `make up`.

Runs `simclr-embed up` over a fresh temporary data folder on free ports, so that it trains the
demo encoder (SimCLR on scikit-learn's digits, a few minutes on a CPU) and indexes its digits
as items; waits until the demo job has succeeded and the items are indexed; then drives the
page in Debian's headless Chromium (the page tests' driver, tests/browser/pages.py) and saves:

* api-key.png: the page's prompt on its first 401 (the stack runs with an API key required
  for reads, `SIMCLR_EMBED_API_KEYS` and `SIMCLR_EMBED_REQUIRE_KEY_FOR_READS`);
* search.png: an upload of a demo digit that is not in the index, its nearest indexed digits;
* jobs.png: the demo job's page (its loss curve over all its steps);
* models.png: the registry with the demo model active.

    PYTHONPATH=. .venv/bin/python tools/readme_screenshots.py            # into docs/screenshots
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python tools/readme_screenshots.py --out /tmp/shots

Needs chromium and chromium-driver (`make browser`). `OMP_NUM_THREADS` (and the other
environment) passes through to the stack: one thread trains more slowly but shares the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "browser")]  # the page tests' helpers

from _procs import free_port, wait_until  # noqa: E402
from pages import chromium_installed, patient_wait, save_screenshot, start_chromium  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from service.up import DEMO_DATASET, DEMO_JOB  # noqa: E402

T = TypeVar("T")
API_KEY = "readme-screenshots-key"
DEMO_ITEMS = 300  # `up` indexes the first 300 demo digits (service/up.py, run_demo)
QUERY_LABEL = 3  # the query: the first demo digit of this label after the indexed ones
K = 5
TRAIN_TIMEOUT_S = 1800.0


def start_up(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """`simclr-embed up` on 127.0.0.1:`port` over `data_dir`, with a free embedded-broker port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMCLR_EMBED_")}
    env.update(
        SIMCLR_EMBED_DATA_DIR=str(data_dir),
        SIMCLR_EMBED_HOST="127.0.0.1",
        SIMCLR_EMBED_PORT=str(port),
        SIMCLR_EMBED_EMBEDDED_BROKER_PORT="0",
        SIMCLR_EMBED_API_KEYS=API_KEY,
        SIMCLR_EMBED_REQUIRE_KEY_FOR_READS="true",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )


def demo_job(http: httpx.Client) -> dict | None:
    """The demo job's record once it has succeeded (raises if it failed or was cancelled)."""
    try:
        jobs = http.get("/train-jobs").json().get("items", [])
    except httpx.TransportError:
        return None
    for job in jobs:
        if job.get("name") == DEMO_JOB["name"]:
            if job["state"] in ("failed", "cancelled"):
                raise RuntimeError(f"the demo job ended {job['state']}: {job.get('error')}")
            return job if job["state"] == "succeeded" else None
    return None


def demo_indexed(http: httpx.Client) -> bool:
    answer = http.get("/items", params={"limit": 1})
    return answer.status_code == 200 and answer.json()["total"] >= DEMO_ITEMS


def query_png(data_dir: Path, out: Path) -> Path:
    """The first demo digit of QUERY_LABEL that is not indexed, as the 8x8 PNG a user would upload."""
    with np.load(data_dir / "datasets" / DEMO_DATASET) as data:
        images, labels = data["x_train"], data["y_train"]
    index = DEMO_ITEMS + int(np.flatnonzero(labels[DEMO_ITEMS:] == QUERY_LABEL)[0])
    path = out / f"digit-{index}.png"
    Image.fromarray(images[index][..., 0]).save(path, format="PNG")
    return path


def take_screenshots(base_url: str, job_id: str, query: Path, out: Path) -> None:
    browser = start_chromium()
    wait = patient_wait(browser, 60)
    try:
        # First visit: reads need a key, so the page asks for one.
        browser.get(base_url + "/#/models")
        wait.until(lambda d: d.execute_script('return document.getElementById("key-dialog").open'))
        save_screenshot(browser, out / "api-key.png")
        browser.find_element(By.ID, "key-input").send_keys(API_KEY, Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#models article[data-active="true"]'))
        save_screenshot(browser, out / "models.png")

        browser.get(base_url + "/#/search")
        k_input = wait.until(lambda d: d.find_element(By.ID, "search-k"))
        k_input.clear()
        k_input.send_keys(str(K))
        browser.find_element(By.ID, "search-file").send_keys(str(query))
        browser.find_element(By.ID, "search-submit").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li img")) == K)
        wait.until(
            lambda d: all(
                d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                for img in d.find_elements(By.CSS_SELECTOR, "#results li img, #items li img")
            )
        )
        save_screenshot(browser, out / "search.png")

        browser.get(f"{base_url}/#/jobs/{job_id}")
        wait.until(lambda d: d.execute_script('return document.getElementById("job-view").dataset.state'))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#job-view svg.chart path.line"))
        save_screenshot(browser, out / "jobs.png")
    finally:
        for entry in browser.get_log("browser"):
            print("console:", entry["level"], entry["message"], file=sys.stderr)
        browser.quit()


def stop(proc: subprocess.Popen[bytes], grace_s: float = 120.0) -> None:
    """SIGINT, as Ctrl-C in `make up`; `up` stops its API, worker and broker in turn."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"`simclr-embed up` did not stop within {grace_s:.0f} s of SIGINT") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots", help="where the PNGs go")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data folder (path printed)")
    args = parser.parse_args(argv)
    if not chromium_installed():
        parser.error("Debian's chromium and chromium-driver are not installed (make browser)")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="simclr-embed-screenshots-"))
    data_dir, port = work / "data", free_port()
    base_url = f"http://127.0.0.1:{port}"
    up = start_up(data_dir, port, work / "up.log")
    print(f"simclr-embed up at {base_url}, log {work / 'up.log'}", file=sys.stderr)
    try:
        with httpx.Client(base_url=base_url, headers={"X-API-Key": API_KEY}, timeout=30) as http:

            def ready(check: Callable[[httpx.Client], T]) -> T | None:
                if up.poll() is not None:
                    raise RuntimeError(f"`simclr-embed up` exited with {up.returncode}; see {work / 'up.log'}")
                try:
                    return check(http)
                except httpx.TransportError:
                    return None

            job = wait_until(lambda: ready(demo_job), TRAIN_TIMEOUT_S, "the demo job to succeed", every_s=5)
            wait_until(lambda: ready(demo_indexed), 300, f"the {DEMO_ITEMS} demo items to be indexed", every_s=2)
        print(f"demo job {job['id']} succeeded: model {job.get('model_id')}", file=sys.stderr)
        take_screenshots(base_url, job["id"], query_png(data_dir, work), args.out)
    finally:
        stop(up)
        if args.keep:
            print(f"data kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"saved {', '.join(sorted(p.name for p in args.out.glob('*.png')))} in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
