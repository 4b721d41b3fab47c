"""Compositions under data parallelism: two gloo workers match one process (float64 task of
``tests.test_data_parallel``), including SAM's closure over a micro-batch estimator and IRE on top of both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regtune.compose import compose
from regtune.distributed import DataParallel
from regtune.loop import Run
from regtune.methods import _METHODS, ensure_registered
from regtune.parts import ire, microbatch, plain_sgd, sam
from tests.dp_pool import worker_pool
from tests.test_data_parallel import IRE, MICRO, SGD, STEPS, TIMEOUT_S, _register

WORLD = 2
ADAM = {"lr": 1e-2}
CPR = {"kappa_init_method": "dependent", "kappa_init_param": 0.8}
CASES = {
    "adamw_gn": {**MICRO, **ADAM, "weight_decay": 0.1, "reg_lambda": 0.5},
    "adamcpr_gn": {**MICRO, **ADAM, **CPR, "reg_lambda": 0.5},
    "sam_adamcpr": {**ADAM, **CPR, "sam_rho": 0.1},
    "sgdm_ire": {**SGD, **IRE},
    "dp_sam_micro_ire": {**MICRO, "sam_rho": 0.1, **IRE},
}


def sam_micro_ire():
    """Not a registered method: SAM over micro-batch accumulation, with IRE (registered per process by the test)."""
    return compose("dp_sam_micro_ire", base=plain_sgd(), estimator=microbatch(), wrappers=[sam(), ire()])


def train(case: str, dp: DataParallel) -> dict:
    config = {"task": "dp_tiny", "seed": 3, "workers": dp.world_size, **CASES[case]}
    run = Run(case, config, dp=dp)
    metrics = run.train_steps(STEPS)
    out = {"params": [p.detach().numpy().copy() for p in run.model.parameters()], "metrics": metrics}
    if hasattr(run.optimizer, "mask"):
        out["mask"] = [m.numpy().copy() for m in run.optimizer.mask()]
    return out


# ---------------------------------------------------------------------- the worker pool (one process group)
def dp_setup() -> None:
    """Run in each worker process before its first case (tests.dp_pool)."""
    _register()
    ensure_registered(sam_micro_ire())


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    with worker_pool(tmp_path_factory.mktemp("dp"), __name__, WORLD, TIMEOUT_S) as run_case:
        yield run_case


@pytest.fixture
def registered():
    """The unregistered composition, registered in this process for the test only."""
    record = sam_micro_ire()
    added = record.name not in _METHODS
    ensure_registered(record)
    yield
    if added:
        _METHODS.pop(record.name, None)


@pytest.mark.parametrize("case", list(CASES))
def test_two_workers_match_one_process(pool, registered, case):
    torch.set_num_threads(1)
    ranks = pool(case)
    single = train(case, DataParallel())
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        np.testing.assert_array_equal(a, b)
    moved = max(float(np.abs(p).max()) for p in single["params"])
    for a, b in zip(ranks[0]["params"], single["params"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-11 * max(1.0, moved))
    for key, value in single["metrics"].items():
        assert ranks[0]["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    if "mask" in single:
        for m0, m in zip(ranks[0]["mask"], single["mask"]):
            np.testing.assert_array_equal(m0, m)
