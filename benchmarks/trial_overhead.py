"""Per-trial overhead on a running local Ray (issue 12, part 3), printed by ``bench_study_overhead.py``.

Ray is started first (its start-up is a per-study fixed cost, measured separately); then one Tune
experiment runs ``n`` short grokking smoke trials one at a time, with and without ``reuse_actors``.
Timestamps (one clock: driver and trials share the machine):

* launch: Tune's ``on_trial_start`` callback on the driver (the trial's actor is up, new or reused);
* entry: the trial function starts; first step: the task, model and optimizer are built, the first
  optimizer step begins; last report: just before the trial's last ``tune.report``.

Per trial: launch -> first step, and (from the second trial) the previous trial's last report -> this
trial's first step: the gap a trial slot sits idle between two trials.

    python benchmarks/trial_overhead.py [--trials 6]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import tempfile
import time


def _trainable(cfg):
    t_enter = time.time()
    import torch
    from ray import tune

    from regtune.loop import Run

    torch.set_num_threads(1)
    run = Run("adamcpr", {"task": "grokking", "size": "smoke", "steps": cfg["steps"], "eval_every": cfg["steps"] // 2,
                          "seed": cfg["seed"]})
    t_first = time.time()
    reports = list(run.reports())
    for i, rep in enumerate(reports):
        tune.report({"step": rep["step"], "val/accuracy": rep["val/accuracy"], "t_enter": t_enter,
                     "t_first": t_first, "t_report": time.time(), "last": float(i == len(reports) - 1)})


def measure(trials: int = 6, reuse_actors: bool = True, steps: int = 20) -> dict[str, list[float]]:
    """Run ``trials`` trials one at a time on the current Ray; per-trial gaps in seconds."""
    from ray import tune
    from ray.tune import Callback

    class Launches(Callback):
        def __init__(self):
            self.at: dict[str, float] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.at[trial.trial_id] = time.time()

    cb = Launches()
    with tempfile.TemporaryDirectory() as d:
        tuner = tune.Tuner(
            _trainable, param_space={"seed": tune.grid_search(list(range(trials))), "steps": steps},
            tune_config=tune.TuneConfig(metric="val/accuracy", mode="max", max_concurrent_trials=1,
                                        reuse_actors=reuse_actors),
            run_config=tune.RunConfig(storage_path=d, name="overhead", verbose=0, callbacks=[cb]))
        grid = tuner.fit()
        rows = []
        for r in grid:
            df = r.metrics_dataframe
            rows.append((float(df["t_first"].iloc[0]), float(df["t_enter"].iloc[0]),
                         float(df["t_report"].iloc[-1]), cb.at.get(r.metrics["trial_id"], float("nan"))))
    rows.sort()
    out = {"launch -> entry": [e - launch for _, e, _, launch in rows],
           "entry -> first step (task, model build)": [f - e for f, e, _, _ in rows],
           "launch -> first step": [f - launch for f, _, _, launch in rows],
           "last report -> next trial's first step": [rows[i + 1][0] - rows[i][2] for i in range(len(rows) - 1)]}
    return out


def table(results: dict[str, dict[str, list[float]]]) -> str:
    lines = [f"{'per-trial overhead (s), trials one at a time':52s} {'first':>6s} {'median':>7s} {'min':>6s} "
             f"{'max':>6s}"]
    for label, res in results.items():
        lines.append(f"  {label}")
        for name, xs in res.items():
            rest = xs[1:] if not name.startswith("last") and len(xs) > 1 else xs  # the first trial starts the worker
            lines.append(f"    {name:48s} {xs[0]:6.2f} {statistics.median(rest):7.2f} {min(rest):6.2f} "
                         f"{max(rest):6.2f}")
    lines.append("  (median/min/max leave out the first trial, which starts the worker process and imports torch; "
                 "the last row has no first trial)")
    return "\n".join(lines)


def _children() -> set[int]:
    me = str(os.getpid())
    out = set()
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                if d.isdigit() and f.read().rsplit(")", 1)[1].split()[1] == me:
                    out.add(int(d))
        except (OSError, IndexError):
            pass
    return out


def _stop(pids: set[int], wait_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is left after ``wait_s``; reap them (they are this process's children)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            for pid in list(pids):
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        pids.discard(pid)
                        continue
                if not os.path.exists(f"/proc/{pid}"):
                    pids.discard(pid)
            time.sleep(0.2)


def start_ray(num_cpus: int = 1, tries: int = 3) -> None:
    """A new local Ray of its own (never another session's). Ray waits 30 s, hard-coded, for its raylet: on a
    loaded machine that can run out, so try again, after stopping what the failed try started (``ray.shutdown``
    leaves the failed node's GCS, monitor and dashboard processes running)."""
    import ray

    for i in range(tries):
        before = _children()
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for the raylet timeout
            ray.shutdown()
            _stop(_children() - before)
            if i == tries - 1 or "timed out during startup" not in str(e):
                raise
            print(f"Ray start timed out ({e}); trying again", flush=True)


def run(trials: int = 6) -> str:
    import ray

    start_ray()
    try:
        results = {f"reuse_actors={flag}": measure(trials, flag) for flag in (True, False)}
    finally:
        ray.shutdown()
    return table(results)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=6)
    print(run(ap.parse_args().trials))
