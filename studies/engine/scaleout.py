"""Resources of multi-worker trials (``workers`` > 1: a Ray Train job per trial, ``trainables.train_dp``).

The Tune trial itself asks for ~0 CPU (``TRIAL_CPU``; 0 is refused): its workers' placement group asks
for ``workers`` x the task's per-trial request (one GPU each on a GPU cluster) outside Tune's accounting.
So the driver sizes the default concurrency to what the cluster can place (``default_concurrency``): a
placement group that cannot be placed makes Ray Train wait and retry forever.

On a small machine (a laptop's local Ray) the per-worker CPU request is lowered to a fraction so that
``workers`` x CPU + the trial's own share fit its CPUs (2 workers on 2 cores: 0.99 CPU each); on a
cluster that cannot hold a trial's workers yet (an autoscaling cluster) the request is left as it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

TRIAL_CPU = 0.01  # the Tune trial's own request when its workers run through Ray Train


def worker_request(res: Mapping[str, float], workers: int, cluster: Mapping[str, float]) -> dict[str, float]:
    """Per-worker {"cpu", "gpu"} for ``workers`` workers of a trial whose single-process request is ``res``."""
    cpu, gpu = float(res.get("cpu", 1)), float(res.get("gpu", 0))
    total = float(cluster.get("CPU", 0))
    if workers * cpu + TRIAL_CPU > total:
        fit = (total - TRIAL_CPU) / workers
        if fit >= 1:
            cpu = float(math.floor(fit))
        elif fit >= 0.5:  # a small machine: a fractional share (Ray's precision is 1e-4)
            cpu = math.floor(fit * 100) / 100
    return {"cpu": cpu, "gpu": gpu}


def trial_request(res: Mapping[str, float], workers: int, cluster: Mapping[str, float]):
    """(the Tune trial's request, the per-worker spec for ``trainables.train_dp`` or None for one process)."""
    if workers <= 1:
        return dict(res), None
    per = worker_request(res, workers, cluster)
    return {"cpu": TRIAL_CPU, "gpu": 0}, {"num": int(workers), **per}


def default_concurrency(footprints: Iterable[tuple[int, Mapping[str, float]]], cluster: Mapping[str, Any]) -> int:
    """How many trials may run at once: ``footprints`` = (workers, per-worker request) of every cell.

    With one-process cells only this is the cluster's CPU count (the driver's rule before workers existed);
    with multi-worker cells, the number of the largest cell's worker groups the cluster holds now (>= 1).
    """
    footprints = list(footprints)
    cpus, gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    if all(w <= 1 for w, _ in footprints):
        return max(1, int(cpus))
    need_cpu = max(w * float(r.get("cpu", 1)) for w, r in footprints)
    need_gpu = max(w * float(r.get("gpu", 0)) for w, r in footprints)
    fits = [int((cpus - 0) // (need_cpu + TRIAL_CPU))] if need_cpu > 0 else []
    if need_gpu > 0 and gpus > 0:
        fits.append(int(gpus // need_gpu))
    return max(1, min(fits, default=1))


def study_footprints(study, scale: str, overrides, resources_fn, cluster: Mapping[str, Any]):
    """(workers, per-worker request) of every cell of ``study`` at ``scale`` (``resources_fn``: the driver's
    per-trial request of a cell, ``studies.engine.driver._resources``)."""
    from studies.spec import cell_configs

    out = []
    for cell in study.cells:
        workers = int(cell_configs(study, cell, scale, None, overrides)[0].get("workers", 1))
        out.append((workers, worker_request(resources_fn(study, cell, scale), workers, cluster)))
    return out
