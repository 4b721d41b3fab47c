"""Where the wall time of a smoke study goes: training vs everything around it, on local Ray.

Runs the real CLI (``python -m studies run cpr_grokking --scale smoke``, by default one trial at a time so the
trials' training times add up to a share of the wall time) and times every output line as it arrives. The
table splits the wall time with those timestamps and with each trial's ``result.json`` (Tune's
``time_total_s``: the trial function's own clock) and ``trials.parquet`` (``seconds``: optimizer steps only):

* CLI start: interpreter, imports, config checks, until "starting local Ray";
* Ray start: until the first stage's log line (the cells of a stage run in one Tune experiment);
* Tuner setup per stage: from the stage's line to its first "Trial ... started";
* trial start/stop in Tune: a trial's wall time between Tune's "started" and "completed" lines minus its
  time_total_s (a new worker process and its imports for the first trials, actor reuse after that);
* training: the ``seconds`` column (the figure the target is relative to);
* in the trial but not training: building the task and model, evaluation, checkpoints, reports
  (time_total_s - seconds);
* between trials and after the last one: Tune's bookkeeping, MLflow logging in callbacks, experiment-state
  snapshots, Parquet export after each stage;
* report + MLflow artifacts + shutdown: from the last trial's end to process exit.

MLflow logging and checkpoint writes are also timed in isolation (the same calls, in this process) and
multiplied by the number of reports, since they hide inside the rows above.

    python benchmarks/bench_study_overhead.py [--max-concurrent 1] [--num-samples 2] [--set steps=3000]
    python benchmarks/bench_study_overhead.py --scale laptop --num-samples 0   # the README's main job

Then, per trial (``--trial-overhead N``, ``benchmarks/trial_overhead.py``): on a running local Ray, N grokking smoke
trials one at a time, with and without ``reuse_actors``: a trial's launch to its first step, and the previous
trial's last report to the next trial's first step.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from regtune.results import read_jsonl  # noqa: E402

STARTED = re.compile(r"^Trial (\S+) started with configuration")
FINISHED = re.compile(r"^Trial (\S+) (completed|errored) after")
STAGE = re.compile(r"^\[(stage\w+)\] \d+ cells, \d+ trials in one Tune experiment")  # stage_confirm too


def run_study(storage: Path, max_concurrent: int, num_samples: int, sets: list[str] = (),
              scale: str = "smoke") -> tuple[float, list[tuple[float, str]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
                "OMP_NUM_THREADS": "1"})
    cmd = [sys.executable, "-m", "studies", "run", "cpr_grokking", "--scale", scale, "--storage", str(storage)]
    cmd += ["--max-concurrent", str(max_concurrent)] if max_concurrent else []
    cmd += ["--num-samples", str(num_samples)] if num_samples else []
    cmd += [a for kv in sets for a in ("--set", kv)]
    t0 = time.monotonic()
    lines = []
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:
            lines.append((time.monotonic() - t0, line.rstrip("\n")))
    wall = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit("the study failed:\n" + "\n".join(text for _, text in lines[-40:]))
    return wall, lines


def first(lines, pred) -> float:
    return next(t for t, text in lines if pred(text))


def mlflow_cost(reports: int, trials: int) -> float:
    """Seconds the driver's MLflow callback spends: one run per trial, one log_metrics batch per report."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as d:
        client = MlflowClient(f"sqlite:///{d}/mlflow.db")
        exp = client.create_experiment("bench", Path(d, "art").as_uri())
        client.search_experiments()  # schema creation outside the clock
        t0 = time.perf_counter()
        for i in range(trials):
            run = client.create_run(exp, tags={"trial_id": str(i)})
            client.log_batch(run.info.run_id, params=[])
            for s in range(reports // trials):
                from mlflow.entities import Metric

                client.log_batch(run.info.run_id, metrics=[Metric(f"m/{k}", 0.5, 0, s) for k in range(30)])
            client.set_terminated(run.info.run_id)
        return time.perf_counter() - t0


def checkpoint_cost(reports: int) -> float:
    """Seconds to write the grokking smoke model's full training state ``reports`` times (torch.save)."""
    import torch

    from regtune.loop import Run

    run = Run("adamcpr", {"task": "grokking", "size": "smoke", "steps": 2, "eval_every": 1})
    for _ in run.reports():
        pass
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        for _ in range(reports):
            torch.save(run.state_dict(), Path(d) / "state.pt")
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-concurrent", type=int, default=1, help="0: as many as the CPUs allow")
    ap.add_argument("--num-samples", type=int, default=2, help="0: the scale's own")
    ap.add_argument("--scale", default="smoke")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to `studies run`, e.g. --set steps=3000 for a longer budget")
    ap.add_argument("--trial-overhead", type=int, default=4, metavar="N",
                    help="then time N trials one at a time on a running local Ray (benchmarks/trial_overhead.py); 0: skip")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        storage = Path(d)
        wall, lines = run_study(storage, args.max_concurrent, args.num_samples, args.sets, args.scale)
        sdir = storage / f"cpr_grokking-{args.scale}"
        trials = pd.read_parquet(sdir / "trials.parquet")
        totals, reports = {}, 0
        for f in (sdir / "tune").glob("stage*/*/result.json"):
            rows = read_jsonl(f)
            totals[rows[-1]["trial_id"]] = rows[-1]["time_total_s"]
            reports += len(rows)
    t_ray = first(lines, lambda s: s.startswith("starting local Ray"))
    t_stage0 = first(lines, lambda s: STAGE.match(s) is not None)
    # Tune prints trials as <trainable>_<trial id>
    starts = {m.group(1).rsplit("_", 1)[-1]: t for t, s in lines if (m := STARTED.match(s))}
    ends = {m.group(1).rsplit("_", 1)[-1]: t for t, s in lines if (m := FINISHED.match(s))}
    stages = [t for t, s in lines if STAGE.match(s)]
    bounds = stages[1:] + [float("inf")]
    setup = sum(min(starts[n] for n in starts if t <= starts[n] < end) - t for t, end in zip(stages, bounds))
    in_tune = sum(ends[n] - starts[n] for n in starts if n in ends)
    startup = sum(ends[n] - starts[n] - totals.get(n, 0.0) for n in starts if n in ends)
    train = float(trials["seconds"].sum())
    in_trial = sum(totals.values()) - train
    t_done = first(lines, lambda s: "done" in s and s.startswith("study "))
    last_end = max(ends.values())
    tail = wall - last_end
    between = (last_end - t_stage0) - setup - in_tune
    if args.max_concurrent != 1:
        between = max(0.0, between)  # overlapping trials: the sums above exceed the elapsed time
    rows = [
        ("CLI start (imports, checks)", t_ray),
        ("Ray start, MLflow store, searchers", t_stage0 - t_ray),
        (f"Tuner setup ({len(stages)} stage experiments)", setup),
        (f"trial start/stop in Tune ({len(starts)} trials: actor start or reuse, until its clock starts)", startup),
        ("training (trials.parquet `seconds`)", train),
        (f"in-trial task build + eval + checkpoints + reports ({reports} reports)", in_trial),
        ("between trials (Tune bookkeeping, MLflow callback, state snapshots, Parquet export)", between),
        ("Parquet/report/MLflow artifacts + Ray shutdown", tail),
    ]
    print(f"cpr_grokking {args.scale} study {' '.join(args.sets)}, {len(trials)} trials, "
          f"--max-concurrent {args.max_concurrent or 'auto'}, "
          f"{os.cpu_count()} CPUs; wall {wall:.1f} s (report written at {t_done:.1f} s)\n")
    print(f"{'where the wall time goes':88s} {'seconds':>8s} {'share':>6s}")
    for name, sec in rows:
        print(f"{name:88s} {sec:8.2f} {sec / wall:6.1%}")
    print(f"{'trial':10s} {'cell':14s} {'started':>8s} {'ended':>8s} {'in Tune':>8s} {'clock':>8s} {'training':>8s}")
    for _, t in trials.sort_values("trial_id").iterrows():
        tid = t["trial_id"]
        if tid in starts and tid in ends:
            print(f"{tid:10s} {t['cell']:14s} {starts[tid]:8.1f} {ends[tid]:8.1f} {ends[tid] - starts[tid]:8.1f} "
                  f"{totals.get(tid, float('nan')):8.1f} {t['seconds']:8.1f}")
    print()
    accounted = sum(s for _, s in rows)
    print(f"{'(sum of rows; differs from wall when trials overlap)':88s} {accounted:8.2f}")
    print(f"\nwall / training = {wall / train:.2f}  ->  overhead {wall / train - 1:.0%} of training time "
          f"(target < 25%)")
    slots = args.max_concurrent or os.cpu_count()
    if slots > 1:  # trials ran side by side: also per slot, as if each slot's trials had run one after another
        print(f"per trial slot ({slots} at a time): wall x {slots} / training = {wall * slots / train:.2f}  ->  "
              f"overhead {wall * slots / train - 1:.0%}")
    print("\ninside the rows above, timed in isolation here:")
    print(f"  MLflow logging, sqlite store ({len(trials)} runs, {reports} metric batches): "
          f"{mlflow_cost(reports, len(trials)):.2f} s")
    print(f"  checkpoint writes (torch.save of the full state, {reports} times): {checkpoint_cost(reports):.2f} s")
    if args.trial_overhead:  # per-trial costs beside the per-study ones above (Ray already up, not counted)
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from trial_overhead import run as trial_overhead

        print("\n" + trial_overhead(args.trial_overhead))


if __name__ == "__main__":
    main()
