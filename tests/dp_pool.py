"""A pool of gloo worker processes (one process group, started once per test module) for the data-parallel
equivalence tests: each worker imports the test module by name, calls its ``dp_setup()`` (registers the test's
task and methods in that process) and answers each case with the module's ``train(case, dp)``."""

from __future__ import annotations

import datetime
import importlib
import os
import queue
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch


def _worker(rank: int, world: int, init_file: str, module: str, jobs, results) -> None:
    import torch.distributed as dist

    from regtune.distributed import DataParallel

    torch.set_num_threads(1)
    mod = importlib.import_module(module)
    mod.dp_setup()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    dp = DataParallel.from_torch()
    try:
        while (case := jobs.get()) is not None:
            try:
                results.put((rank, case, mod.train(case, dp), None))
            except Exception:  # noqa: BLE001 - reported to the test
                results.put((rank, case, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


@contextmanager
def worker_pool(tmp_dir: Path, module: str, world: int, timeout_s: float) -> Iterator[Callable[[str], list[dict]]]:
    """Yield ``run_case(case) -> [rank 0's result, rank 1's ...]``; a hung collective fails after ``timeout_s``."""
    ctx = torch.multiprocessing.get_context("spawn")
    init_file = str(tmp_dir / "init")
    jobs = [ctx.Queue() for _ in range(world)]
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, init_file, module, jobs[r], results), daemon=True)
             for r in range(world)]
    env = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

    def run_case(case: str) -> list[dict]:
        for q in jobs:
            q.put(case)
        out: dict[int, dict] = {}
        while len(out) < world:
            try:
                rank, name, value, error = results.get(timeout=timeout_s)
            except queue.Empty:
                alive = [p.is_alive() for p in procs]
                pytest.fail(f"{case}: no result from the workers within {timeout_s} s (alive: {alive})")
            assert name == case
            assert error is None, f"rank {rank} failed on {case}:\n{error}"
            out[rank] = value
        return [out[r] for r in range(world)]

    try:
        yield run_case
    finally:
        for q in jobs:
            q.put(None)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
