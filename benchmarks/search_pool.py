"""The recorded pool of the search benchmark (``bench_search.py``): a log grid of AdamCPR configurations on a
small grokking task, every one trained once to the full budget with its validation curve at every evaluation.

The task is the grokking task (``regtune.tasks.grokking``) shrunk so that dozens of full trials fit on two
CPU cores: (x + y) mod 23, 70% of the pairs for training (full batch), a one-block transformer of width 64.
The method and its search space are the ``cpr_grokking`` study's ``adamcpr`` cell: lr log-uniform 1e-4..1e-2,
``kappa_init_method = dependent`` and ``kappa_init_param`` log-uniform 0.5..256. The pool discretizes that
space: 7 lr values (log-spaced, both ends included) x 6 kappa values. At this budget (600 steps) the bound
only binds for kappa below about 1.7 (the weights never grow past 1.7x their initial norm): a first pool with
kappa log-spaced over 0.5..256 gave, at every lr, the same curve for every kappa from 1.74 to 256. So the
kappa axis is the study's range narrowed to where it acts, 0.5..1.6, log-spaced (0.5 x 10^(k/10), rounded),
and it holds the published point (lr 1e-3, kappa 0.8), which is also checked to grok on this small task.

Curves are cached in a JSON file keyed by the configuration, so a rerun only trains what is missing.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

TASK = {"task": "grokking", "modulus": 23, "train_fraction": 0.7, "d_model": 64, "n_heads": 4, "d_mlp": 128,
        "batch_size": 512, "seed": 0}
METHOD = "adamcpr"
BUDGET = 600  # steps of a full trial (ASHA's max_t)
EVERY = 20  # steps between evaluations (the trainable's report interval)
LRS = tuple(1e-4 * 10 ** (k / 3) for k in range(7))  # 1e-4 .. 1e-2
KAPPAS = (0.5, 0.63, 0.8, 1.0, 1.26, 1.6)  # about 0.5 * 10 ** (k / 10): where the bound binds at this budget
PUBLISHED = {"lr": 1e-3, "kappa_init_param": 0.8}
THRESHOLD = 0.95  # the study's threshold: steps to 95% validation accuracy
KEYS = ("val/accuracy", "val/loss", "train/loss", "train/accuracy")


def config(lr: float, kappa: float, budget: int = BUDGET) -> dict[str, Any]:
    return {**TASK, "lr": lr, "kappa_init_method": "dependent", "kappa_init_param": kappa,
            "steps": budget, "eval_every": EVERY}


def key(lr: float, kappa: float) -> str:
    return f"lr={lr:.4g},kappa={kappa:.4g}"


def train_curve(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration to its budget; the curve as lists (one entry per evaluation)."""
    import torch

    from regtune.loop import Run

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run = Run(METHOD, cfg)
    curve: dict[str, list] = {"step": [], **{k: [] for k in KEYS}}
    for rep in run.reports():
        curve["step"].append(int(rep["step"]))
        for k in KEYS:
            v = float(rep.get(k, math.nan))
            curve[k].append(v if math.isfinite(v) else None)
    return {"lr": cfg["lr"], "kappa": cfg["kappa_init_param"], "curve": curve, "seconds": time.perf_counter() - t0,
            "train_seconds": run.train_seconds}


def steps_to(curve: dict[str, list], threshold: float = THRESHOLD) -> int | None:
    for s, v in zip(curve["step"], curve["val/accuracy"]):
        if v is not None and v >= threshold:
            return s
    return None


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def missing(cache: dict[str, Any]) -> list[str]:
    """Pool configurations (and the published point) that ``cache`` lacks."""
    names = [key(PUBLISHED["lr"], PUBLISHED["kappa_init_param"])] + [key(lr, k) for lr in LRS for k in KAPPAS]
    return [n for n in names if n not in cache.get("runs", {}) or cache.get("task") != TASK]


def build(path: Path, processes: int = 2, budget: int = BUDGET, log=print) -> dict[str, Any]:
    """Train every pool configuration (and the published point) not yet in ``path``; return all curves."""
    cache = load(path)
    if cache.get("task") != TASK or cache.get("budget") != budget:
        cache = {"task": TASK, "budget": budget, "every": EVERY, "runs": {}}
    wanted = {key(lr, k) for lr in LRS for k in KAPPAS} | {key(PUBLISHED["lr"], PUBLISHED["kappa_init_param"])}
    cache["runs"] = {n: r for n, r in cache["runs"].items() if n in wanted}
    todo = {key(lr, k): config(lr, k, budget) for lr, k in
            [(PUBLISHED["lr"], PUBLISHED["kappa_init_param"])] + [(lr, k) for lr in LRS for k in KAPPAS]}
    todo = [(name, cfg) for name, cfg in todo.items() if name not in cache["runs"]]
    if todo:
        log(f"training {len(todo)} configurations ({budget} steps each) on {processes} processes")
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(processes) as pool:
        for i, res in enumerate(pool.imap(train_curve, [cfg for _, cfg in todo])):
            name = key(res["lr"], res["kappa"])
            cache["runs"][name] = res
            path.write_text(json.dumps(cache))
            log(f"  [{i + 1}/{len(todo)}] {name}: final val acc {res['curve']['val/accuracy'][-1]:.3f}, steps to "
                f"{THRESHOLD:.0%} {steps_to(res['curve'])}, {res['seconds']:.1f} s ({time.perf_counter() - t0:.0f} s)")
    return cache
