"""Search efficiency on grokking: how much compute grid, random, TPE, ASHA + random and ASHA + TPE need to find
the grid's best configuration, and how often ASHA stops a trial that would have grokked (issue 12).

Method: a tabular benchmark. A finite pool of AdamCPR configurations (``search_pool``: 7 lr x 6 kappa on the
``cpr_grokking`` study's log ranges, a small grokking task) is trained once, each to the full budget, with
its validation curve recorded at every evaluation (every ASHA rung step). Every strategy is then replayed on
those curves (``search_replay``), over several search seeds, at equal total compute (training steps summed
over trials; the budget is the paper-style grid's: 12 configurations at full budget):

  (a) grid: every other lr and kappa value of the pool (4 x 3), full budget, in a shuffled order;
  (b) random search over the pool;  (c) Optuna TPE (real ``TPESampler``, ask/tell over the pool's indices);
  (d) ASHA + random;  (e) ASHA + TPE (the studies' default).

ASHA is Ray's own ``AsyncHyperBandScheduler`` configured as ``studies.engine.driver`` configures a grokking cell at
the study's default scale: time_attr = step, max_t = budget, metric val/accuracy (max), the scale's grace
period (a fraction of the budget, rounded to the evaluation interval) and reduction factor (3); two trials at a
time. Under the rule before issue 12 (grace 1/8), 12-19% of the trials ASHA stopped would have reached 95%
(about half of all trials that would); the study now uses grace 1/3. Other rung rules (grace 1/2, training
loss, validation loss) are replayed on the same curves for comparison. The studies also try the published point first (Optuna's
``points_to_evaluate``); the replay does not, so every strategy starts from nothing.

Because every stopped trial's full curve is known, the false-stop rate is exact: of the trials ASHA stopped,
how many reach 95% validation accuracy by the full budget. The replay is checked against one real Ray Tune
run (real training, real ASHA, one trial at a time) on a few pool configurations: same stop decisions.

    python benchmarks/bench_search.py [--reps 5] [--validate 5] [--pool benchmarks/results/search_pool.json]
    python benchmarks/bench_search.py --replay-only   # the recorded pool only: seconds
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import search_pool as sp  # noqa: E402
from search_replay import GRID, ListSearch, Pool, RandomSearch, Rung, TPESearch, false_stops, replay  # noqa: E402

from studies.cpr_grokking import STUDY  # noqa: E402

_SCALE = STUDY.scales[STUDY.default_scale]
DEFAULT_RUNG = Rung(f"val/accuracy, grace {Fraction(_SCALE.grace_fraction).limit_denominator(64)} (study default)",
                    grace_fraction=_SCALE.grace_fraction, reduction_factor=_SCALE.reduction_factor)
OLD_RUNG = Rung("val/accuracy, grace 1/8 (old laptop default)")
RUNGS = (
    DEFAULT_RUNG,
    OLD_RUNG,
    Rung("val/accuracy, grace 1/2", grace_fraction=1 / 2),
    Rung("train/loss, grace 1/8", metric="train/loss", mode="min"),
    Rung("train/loss, grace 1/3", metric="train/loss", mode="min", grace_fraction=1 / 3),
    Rung("val/loss, grace 1/8", metric="val/loss", mode="min"),
)


def strategies(pool: Pool, rungs):
    """name -> (make searcher from seed, rung or None)."""
    def grid(seed):
        rng = np.random.default_rng(seed)
        return ListSearch([GRID[i] for i in rng.permutation(len(GRID))])

    out = {"grid (paper-style)": (grid, None), "random": (lambda s: RandomSearch(pool, s), None),
           "TPE": (TPESearch, None)}
    for r in rungs:
        tag = f" [{r.name}]"
        out[f"ASHA + random{tag}"] = (lambda s: RandomSearch(pool, s), r)
        out[f"ASHA + TPE{tag}"] = (TPESearch, r)
    return out


def fmt(x: float, scale: float) -> str:
    return "never" if math.isinf(x) else f"{x / scale:.2f}"


def pool_table(pool: Pool) -> None:
    print("pool: final val accuracy / steps to 95% (- = never) at the full budget; rows lr, columns kappa "
          "(* = in the grid)")
    print(f"{'lr':>10s} " + " ".join(f"{k:>13.3g}" for k in sp.KAPPAS))
    for i, lr in enumerate(sp.LRS):
        cells = []
        for j in range(len(sp.KAPPAS)):
            s = sp.steps_to(pool.curve((i, j)))
            star = "*" if (i, j) in GRID else " "
            cells.append(f"{pool.final((i, j)):.3f}/{'-' if s is None else s:>4}{star}".rjust(13))
        print(f"{lr:>10.3g} " + " ".join(cells))
    reach = [sp.steps_to(pool.curve(c)) for c in pool.coords if pool.reaches(c)]
    print(f"{len(reach)} of {len(pool.coords)} reach 95%; after the old first rung ({OLD_RUNG.grace()} steps): "
          f"{sum(s > OLD_RUNG.grace() for s in reach)}; after the new one ({DEFAULT_RUNG.grace()} steps): "
          f"{sum(s > DEFAULT_RUNG.grace() for s in reach)}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", type=Path, default=HERE / "results" / "search_pool.json")
    ap.add_argument("--reps", type=int, default=5, help="search seeds per strategy (>= 3)")
    ap.add_argument("--workers", type=int, default=2, help="trials at a time in the replay")
    ap.add_argument("--processes", type=int, default=2, help="processes training the pool")
    ap.add_argument("--validate", type=int, default=5, help="pool configs in the real Tune check (0: skip)")
    ap.add_argument("--plot", type=Path, default=HERE / "results" / "bench_search.png")
    ap.add_argument("--replay-only", action="store_true", help="never train: the pool file must be complete")
    args = ap.parse_args()
    t_start, load0 = time.monotonic(), os.getloadavg()
    args.pool.parent.mkdir(parents=True, exist_ok=True)
    if args.replay_only:
        cache = sp.load(args.pool)
        missing = sp.missing(cache)
        if missing:
            sys.exit(f"--replay-only: {len(missing)} pool configurations are not in {args.pool} (e.g. {missing[0]})")
    else:
        cache = sp.build(args.pool, processes=args.processes, log=lambda m: print(m, flush=True))
    t_pool = time.monotonic() - t_start
    runs = cache["runs"]
    train_s = sum(r["train_seconds"] for r in runs.values())
    print(f"\npool of {len(runs)} runs x {sp.BUDGET} steps: {train_s:.0f} s of optimizer steps (as recorded), "
          f"{t_pool:.0f} s wall in this invocation\n")

    pub = runs[sp.key(sp.PUBLISHED["lr"], sp.PUBLISHED["kappa_init_param"])]["curve"]
    s95 = sp.steps_to(pub)
    print(f"published AdamCPR point (lr 1e-3, dependent kappa 0.8) on this task: steps to 95% val acc = {s95}, "
          f"final val acc {pub['val/accuracy'][-1]:.3f} -> {'groks' if s95 else 'DOES NOT reach 95%'}\n")

    pool = Pool(cache)
    pool_table(pool)
    best = pool.grid_best()
    target = best - 0.01
    budget = len(GRID) * sp.BUDGET
    print(f"grid best final val accuracy {best:.4f}; target {target:.4f} (within 1 point); compute budget = the "
          f"grid's {len(GRID)} x {sp.BUDGET} = {budget} steps; {args.reps} search seeds; {args.workers} trials at a "
          f"time\n")

    outcomes = {}
    for name, (make, rung) in strategies(pool, RUNGS).items():
        outcomes[name] = [replay(pool, make(seed), rung, budget, args.workers) for seed in range(args.reps)]

    unit = sp.BUDGET
    print(f"compute to reach the target, in full-trial units ({unit} steps; 'never' = not within the budget of "
          f"{budget // unit}); median [min, max] over {args.reps} seeds")
    print(f"{'strategy':60s} {'median':>7s} {'min':>6s} {'max':>6s} {'reached':>8s} {'trials':>7s} {'full':>5s}")
    for name, outs in outcomes.items():
        xs = [o.compute_to(target) for o in outs]
        med = statistics.median(xs)
        ok = sum(not math.isinf(x) for x in xs)
        n_trials = statistics.mean(len(o.trials) for o in outs)
        n_full = statistics.mean(sum(f for _, _, f in o.trials) for o in outs)
        print(f"{name:60s} {fmt(med, unit):>7s} {fmt(min(xs), unit):>6s} {fmt(max(xs), unit):>6s} "
              f"{ok:>4d}/{len(xs):<3d} {n_trials:7.1f} {n_full:5.1f}")

    print(f"\nfalse stops: trials ASHA stopped early, continued to the full budget on the recorded curves, that reach "
          f"{sp.THRESHOLD:.0%} val accuracy (and that end within 1 point of the grid's best); sums over "
          f"{args.reps} seeds")
    print("(rate = reach 95% / stopped; grokkers lost = stopped trials that reach 95% / all trials whose "
          "configuration reaches 95%)")
    print(f"{'strategy':60s} {'stopped':>8s} {'reach 95%':>10s} {'rate':>6s} {'reach target':>13s} "
          f"{'grokkers lost':>14s}")
    for name, outs in outcomes.items():
        if not name.startswith("ASHA"):
            continue
        n, late, tgt, reach = (sum(x) for x in zip(*(false_stops(pool, o, target) for o in outs)))
        lost = f"{late}/{reach}"
        print(f"{name:60s} {n:8d} {late:10d} {late / max(n, 1):6.1%} {tgt:13d} {lost:>14s}")

    plot(outcomes, budget, target, args.plot)
    print(f"\nplot: {args.plot}")
    if args.validate:
        validate_with_tune(pool, args.validate)
    print(f"\nwall {time.monotonic() - t_start:.0f} s (pool training {t_pool:.0f} s); load average at start "
          f"{load0[0]:.1f}, at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def plot(outcomes, budget: int, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.linspace(0, budget, 241)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, outs in outcomes.items():
        if "[" in name and OLD_RUNG.name not in name:
            continue  # the other rung rules stay in the tables
        ys = np.stack([o.best_at(xs) for o in outs])
        line, = ax.plot(xs / sp.BUDGET, np.median(ys, 0), label=name)
        ax.fill_between(xs / sp.BUDGET, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
    ax.axhline(target, color="k", ls=":", lw=1, label="grid best - 1 point")
    ax.set_xlabel(f"compute (full trials of {sp.BUDGET} steps, summed over trials)")
    ax.set_ylabel("best final val accuracy so far (full-budget trials)")
    ax.set_title("grokking (mod 23), AdamCPR lr x kappa: median and range over search seeds")
    ax.set_ylim(max(0.0, target - 0.3), 1.005)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tune_trainable(cfg):
    import torch
    from ray import tune

    from regtune.loop import Run

    torch.set_num_threads(1)
    for rep in Run("adamcpr", cfg["run"]).reports():
        tune.report({k: rep[k] for k in ("step", "val/accuracy", "val/loss", "train/loss")})


def pick_validation(pool: Pool, n: int) -> list:
    """n pool configs in an order under which the default ASHA (one trial at a time) both stops and keeps some."""
    for seed in range(100):
        order = [pool.coords[i] for i in np.random.default_rng(seed).permutation(len(pool.coords))[:n]]
        out = replay(pool, ListSearch(order), DEFAULT_RUNG, 10**9, workers=1)
        fulls = sum(f for _, _, f in out.trials)
        if 0 < fulls < len(order):
            return order
    return order


def validate_with_tune(pool: Pool, n: int) -> None:
    """One real Tune run (real training, Ray's ASHA, one trial at a time) against the replay: same stops."""
    import ray
    from ray import tune

    order = pick_validation(pool, n)
    expected = replay(pool, ListSearch(order), DEFAULT_RUNG, 10**9, workers=1)
    cfgs = [sp.config(sp.LRS[i], sp.KAPPAS[j]) for i, j in order]
    t0 = time.monotonic()
    from trial_overhead import start_ray

    start_ray()
    try:
        with tempfile.TemporaryDirectory() as d:
            tuner = tune.Tuner(
                tune_trainable, param_space={"run": tune.grid_search(cfgs)},
                tune_config=tune.TuneConfig(metric=DEFAULT_RUNG.metric, mode=DEFAULT_RUNG.mode,
                                            scheduler=DEFAULT_RUNG.scheduler(with_metric=False),
                                            max_concurrent_trials=1),
                run_config=tune.RunConfig(storage_path=d, name="validate", verbose=0))
            grid = tuner.fit()
            got = {}
            for r in grid:
                df = r.metrics_dataframe
                c = (sp.LRS.index(r.config["run"]["lr"]), sp.KAPPAS.index(r.config["run"]["kappa_init_param"]))
                rec = pool.curve(c)
                diff = max(abs(a - b) for a, b in zip(df["val/accuracy"], rec["val/accuracy"]))
                got[c] = (int(df["step"].iloc[-1]), diff)
    finally:
        ray.shutdown()
    print(f"\nreplay vs one real Ray Tune run (ASHA {DEFAULT_RUNG.name}, {n} pool configs, one at a time, "
          f"{time.monotonic() - t0:.0f} s):")
    print(f"{'config':28s} {'replay stop':>12s} {'Tune stop':>10s} {'max |val acc diff|':>19s}")
    same = True
    for c, step, _ in expected.trials:
        tstep, diff = got.get(c, (None, math.nan))
        same &= tstep == step
        print(f"{sp.key(sp.LRS[c[0]], sp.KAPPAS[c[1]]):28s} {step:12d} {tstep!s:>10s} {diff:19.2g}")
    print("same stop decisions" if same else "STOP DECISIONS DIFFER")


if __name__ == "__main__":
    main()
