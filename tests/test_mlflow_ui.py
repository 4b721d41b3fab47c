"""The dashboard link opens on the runs table: headless Chromium (Debian's package, driven by selenium and
chromedriver) against a real `python -m studies mlflow` server over a study store shows the study run and,
expanded, its nested trial runs. Skips where Chromium or chromedriver is not installed (.ci/run installs them)."""

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from regtune.results import curve_rows, trial_row, write_tables
from studies.engine.mlflow_sync import backfill
from studies.engine.tracking import EXPERIMENT_KIND, StudyTracker, default_tracking_uri
from tests.conftest import ROOT, cli_env
from tests.test_preflight import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium + chromedriver not installed (Debian: apt-get install chromium chromium-driver)",
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1600,1000"]


def make_store(sdir):
    """A study store as `studies run` leaves it: a study run with one nested run per trial (two cells)."""
    trials, curves = [], []
    for i, (cell, method) in enumerate([("adamw", "adamw"), ("adamcpr", "adamcpr")]):
        for k in range(2):
            meta = {"study": "cpr_grokking", "scale": "smoke", "cell": cell, "cell_index": i, "task": "grokking",
                    "method": method, "trial_id": f"{cell[:4]}{k:04d}", "budget": 20, "metric": "val/accuracy",
                    "mode": "max", "row": method, "col": "grokking"}
            reports = [{"step": s, "val/accuracy": 0.1 * s / 20 + k, "train/loss": 3.0 - s / 10} for s in (10, 20)]
            trials.append(trial_row(meta, {"lr": 1e-3 * (k + 1)}, reports, errored=False))
            curves += curve_rows(meta, reports)
    write_tables(trials, curves, sdir)
    tracker = StudyTracker(default_tracking_uri(sdir), "regtune/cpr_grokking", sdir,
                           tags={"study": "cpr_grokking", "scale": "smoke", "study_run": "cpr_grokking-smoke"})
    assert backfill(tracker, sdir) == (4, 0)
    tracker.finish()
    return tracker


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    storage = tmp_path_factory.mktemp("ui")
    tracker = make_store(storage / "cpr_grokking-smoke")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "studies", "mlflow", "--storage", str(storage), "--study",
                             "cpr_grokking", "--scale", "smoke", "--port", str(port)],
                            cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    try:
        link, seen, deadline = None, [], time.monotonic() + 300
        while link is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(line)
            if line.strip().startswith("regtune/cpr_grokking: http"):
                link = line.split(": ", 1)[1].strip()
        assert link, "no dashboard link printed:\n" + "".join(seen)
        yield link, tracker, storage
    finally:
        proc.send_signal(signal.SIGTERM)  # `studies mlflow` stops its servers on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_link_asks_for_the_model_training_view(dashboard):
    link, tracker, _ = dashboard
    assert link.endswith(f"/#/experiments/{tracker.experiment_id}?workflowType=machine_learning")
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert exp.tags.get(EXPERIMENT_KIND[0]) == EXPERIMENT_KIND[1]


def test_browser_shows_the_study_run_and_its_nested_trials(dashboard, tmp_path):
    pytest.importorskip("selenium", reason="selenium (the test extra) drives Chromium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    link, tracker, storage = dashboard
    children = [r.info.run_name for r in tracker.runs()]
    assert len(children) == 4
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:  # a new, empty profile: no stored view
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(link)
        body = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
        WebDriverWait(driver, 120).until(lambda d: "cpr_grokking-smoke" in body())
        assert "5 matching runs" in body()  # the study run and its 4 trials, in the runs table
        assert not any(name in body() for name in children)  # collapsed under the study run
        row = driver.find_element(By.XPATH, "//a[normalize-space()='cpr_grokking-smoke']/ancestor::*[@role='row'][1]")
        row.find_element(By.XPATH, ".//button[contains(@data-component-id, 'runnamecellrenderer')]").click()
        WebDriverWait(driver, 60).until(lambda d: all(name in body() for name in children))
        shot = tmp_path / "runs.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        if os.environ.get("REGTUNE_UI_SHOT"):  # keep a copy to look at
            shutil.copy(shot, os.environ["REGTUNE_UI_SHOT"])
    finally:
        driver.quit()
