"""Data parallelism keeps every method's meaning: 2 gloo workers == 1 process with the same global batch.

Two worker processes (one gloo process group, started once for the module) run ``regtune.loop.Run`` with
``DataParallel.from_torch()`` for several steps; the test runs the same config in this process and compares
the parameters (float64 model: round-off is ~1e-16, far below any real difference), the training metrics, and
for IRE the mask (identical on both workers and equal to the one-process mask). Batches are chosen so that the
shares are uneven (13 examples: 7 + 6; 3 micro-batches of 8, 8, 4: 2 + 1), which exercises the weighting.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regtune.distributed import DataParallel
from regtune.loop import Run
from regtune.space import ConfigError, HParam
from regtune.tasks.base import Task, evaluate_batches, get_task, register_task
from tests.dp_pool import worker_pool

WORLD = 2
STEPS = 5
TIMEOUT_S = 120  # a hung collective fails the test after this long (gloo's own timeout is 60 s)


# ---------------------------------------------------------------------- a tiny float64 task (no BatchNorm, no dropout)
class TinyInstance:
    num_classes = 5

    def __init__(self, config, device):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(256, 6, generator=g, dtype=torch.float64)
        w = torch.randn(6, self.num_classes, generator=g, dtype=torch.float64)
        self.y = (self.x @ w + 0.5 * torch.randn(256, self.num_classes, generator=g, dtype=torch.float64)).argmax(1)
        self.batch_size = config["batch_size"]
        self.seed = config["seed"]
        self.model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                   nn.Linear(16, self.num_classes)).double()

    def train_batch(self, step):
        idx = torch.randperm(256, generator=torch.Generator().manual_seed(self.seed * 100_003 + step))[:self.batch_size]
        return self.x[idx], self.y[idx]

    def forward(self, model, inputs):
        return model(inputs)

    def criterion(self, logits, targets):
        return F.cross_entropy(logits, targets)

    def evaluate(self, model, split):
        return evaluate_batches(self, model, [(self.x[:64], self.y[:64])], split)


def _register() -> None:
    try:
        get_task("dp_tiny")
    except ConfigError:
        register_task(Task(name="dp_tiny", build=TinyInstance,
                           hparams=(HParam("batch_size", 13, "examples per step", kind=int, low=1),),
                           doc="data-parallel test task", sizes={"paper": {}},
                           loop_defaults={"steps": STEPS, "eval_every": STEPS}))


_register()

MICRO = {"batch_size": 20, "micro_batch_size": 8, "lr": 0.2}  # K = 3 micro-batches (8, 8, 4): 2 on rank 0, 1 on rank 1
IRE = {"ire_rank": 0.5, "ire_prog": 2.0, "ire_interval": 2, "ire_start": 0}
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
CASES = {
    "adamw": {"lr": 1e-2, "weight_decay": 0.1, "max_grad_norm": 0.5},
    "adamcpr": {"lr": 1e-2, "kappa_init_method": "dependent", "kappa_init_param": 0.8},
    "adamcpr_ip": {"lr": 1e-2, "kappa_init_method": "inflection_point", "reg_step_size": 1},
    "pseudo_gd": dict(MICRO),
    "grad_norm": {**MICRO, "reg_lambda": 0.5},
    "fisher_trace": {**MICRO, "reg_lambda": 0.5},
    "unit_jacobian": {**MICRO, "reg_lambda": 0.5},
    "iter_graft": dict(MICRO),
    "ngd": dict(MICRO),
    "sgd_ire": {**SGD, **IRE},
    "adamw_ire": {"lr": 1e-2, "weight_decay": 0.1, **IRE},
    "sam": {**SGD, "sam_rho": 0.1},
    "sam_adaptive": {**SGD, "sam_rho": 0.5, "sam_adaptive": True},
    "sam_ire": {**SGD, "sam_rho": 0.1, **IRE},
}


def _method(case: str) -> str:
    return {"adamcpr_ip": "adamcpr", "sam_adaptive": "sam", "sam_half": "sam"}.get(case, case)


def train(case: str, dp: DataParallel) -> dict:
    """Run STEPS steps of a case; the parameters, metrics and (IRE) mask as numpy arrays."""
    config = {"task": "dp_tiny", "seed": 3, "workers": dp.world_size, **CASES[case]}
    run = Run(_method(case), config, dp=dp)
    metrics = run.train_steps(STEPS)
    out = {"params": [p.detach().numpy().copy() for p in run.model.parameters()], "metrics": metrics}
    if hasattr(run.optimizer, "mask"):
        out["mask"] = [m.numpy().copy() for m in run.optimizer.mask()]
        out["refreshes"] = run.optimizer.num_refreshes
    return out


# ---------------------------------------------------------------------- the worker pool (one process group)
def dp_setup() -> None:
    """Run in each worker process before its first case (tests.dp_pool)."""
    _register()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    with worker_pool(tmp_path_factory.mktemp("dp"), __name__, WORLD, TIMEOUT_S) as run_case:
        yield run_case


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", list(CASES))
def test_two_workers_match_one_process(pool, case):
    torch.set_num_threads(1)
    ranks = pool(case)
    single = train(case, DataParallel())
    # both workers hold the same parameters, bit for bit (rank 0's broadcast + identical all-reduced updates)
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        np.testing.assert_array_equal(a, b)
    # ... and they are the one-process parameters to float64 round-off
    moved = max(float(np.abs(p).max()) for p in single["params"])
    for a, b in zip(ranks[0]["params"], single["params"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-11 * max(1.0, moved))
    for key, value in single["metrics"].items():
        assert ranks[0]["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-12), key  # float32 loss sums
        assert ranks[1]["metrics"][key] == ranks[0]["metrics"][key], key
    if "mask" in single:
        assert single["refreshes"] == ranks[0]["refreshes"] == ranks[1]["refreshes"] >= 2
        for m0, m1, m in zip(ranks[0]["mask"], ranks[1]["mask"], single["mask"]):
            np.testing.assert_array_equal(m0, m1)  # one global mask on every worker
            np.testing.assert_array_equal(m0, m)  # ... the one-process mask
        share = sum(int(m.sum()) for m in single["mask"]) / sum(m.size for m in single["mask"])
        assert share == pytest.approx(0.5, abs=0.01)


def test_the_comparison_can_fail(pool):
    """The tolerance separates real differences: a worker that trained on its share alone (no all-reduce:
    rank 0's 7 of the 13 examples) ends far from the one-process parameters; the 2 workers do not."""
    ranks = pool("sam")
    single = train("sam", DataParallel())
    CASES["sam_half"] = {**CASES["sam"], "batch_size": 7}  # rank 0's share only, one process
    try:
        half = train("sam_half", DataParallel())
    finally:
        CASES.pop("sam_half")
    diff = max(float(np.abs(a - b).max()) for a, b in zip(half["params"], single["params"]))
    assert diff > 1e-4
    same = max(float(np.abs(a - b).max()) for a, b in zip(ranks[0]["params"], single["params"]))
    assert same < 1e-11


def test_workers_key_must_match_the_process_group():
    with pytest.raises(ConfigError, match="workers=2"):
        Run("adamw", {"task": "dp_tiny", "workers": 2})


def test_shares_are_contiguous_and_cover_the_batch():
    for n in (1, 7, 13, 20):
        for world in (1, 2, 3, 4):
            parts = [DataParallel(r, world).share(n) for r in range(world)]
            covered = [i for s in parts for i in range(n)[s]]
            assert covered == list(range(n))
            sizes = [s.stop - s.start for s in parts]
            assert max(sizes) - min(sizes) <= 1
