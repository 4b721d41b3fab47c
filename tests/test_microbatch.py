"""Micro-batch steps (regtune.microbatch): accumulation, BatchNorm per micro-batch, grafting, NGD,
the exter_graft reference contract, the method records, and short runs on the smoke CIFAR task."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regtune.data.cifar import write_fake_cifar
from regtune.loop import Run
from regtune.methods import get_method, resolve_config
from regtune.microbatch import (
    REFERENCE_KEY,
    microbatch_step,
    reference_norm,
    reference_norms_from_reports,
)
from regtune.space import ConfigError
from regtune.step import StepContext, standard_step
from studies._cifar import SMOKE_BATCH, SMOKE_SGD  # the implicit studies' smoke batches (a task names no method)

torch.set_num_threads(1)
C = 4
NEW_METHODS = ("pseudo_gd", "grad_norm", "fisher_trace", "avg_jacobian", "unit_jacobian",
               "iter_graft", "exter_graft", "ngd")


class BNNet(nn.Module):
    """BatchNorm first, so its running mean is a hand-computable function of the inputs."""

    def __init__(self, bn: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm1d(6) if bn else nn.Identity()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, C)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(self.bn(x))))


class StubTask:
    num_classes = C

    def forward(self, model, x):
        return model(x)

    def criterion(self, logits, y):
        return F.cross_entropy(logits, y)


def setup(n=12, bn=True, seed=0):
    torch.manual_seed(seed)
    model = BNNet(bn).double().train()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64) * 2 + 1
    y = torch.randint(0, C, (n,), generator=g)
    return model, x, y


def ctx_for(model, lr, m, step=0, seed=3, extras=None, lam=0.0):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return StepContext(model, opt, StubTask(), {"micro_batch_size": m, "reg_lambda": lam}, torch.device("cpu"),
                       step=step, generator=torch.Generator().manual_seed(seed), extras=extras or {})


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def micro_grads(model, x, y, m):
    params = list(model.parameters())
    out = []
    for k in range(math.ceil(x.shape[0] / m)):
        loss = F.cross_entropy(model(x[k * m:(k + 1) * m]), y[k * m:(k + 1) * m])
        out.append(flat(torch.autograd.grad(loss, params)))
    return out


def displacement(model, before):
    return flat([b - p.detach() for b, p in zip(before, model.parameters())])


# --------------------------------------------------------------------------
def test_pseudo_gd_with_one_micro_batch_is_one_sgd_step():
    model, x, y = setup()
    ref = copy.deepcopy(model)
    microbatch_step(ctx_for(model, 0.1, m=12), (x, y), penalty_kind=None)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    F.cross_entropy(ref(x), y).backward()
    opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert torch.allclose(model.bn.running_mean, ref.bn.running_mean, atol=1e-12)


def test_pseudo_gd_without_batchnorm_is_full_batch_sgd():
    """Equal micro-batches and no batch statistics: the mean of micro-batch mean gradients is the batch gradient."""
    model, x, y = setup(bn=False)
    ref = copy.deepcopy(model)
    metrics = microbatch_step(ctx_for(model, 0.1, m=3), (x, y), penalty_kind=None)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    F.cross_entropy(ref(x), y).backward()
    full = float(flat([p.grad for p in ref.parameters()]).norm())
    opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert metrics["grad/full_norm"] == pytest.approx(full, rel=1e-10)


def test_batchnorm_uses_per_micro_batch_statistics():
    model, x, y = setup(n=12)
    ref = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    m, lr = 4, 0.1
    microbatch_step(ctx_for(model, lr, m=m), (x, y), penalty_kind=None)
    # running mean: K sequential momentum updates with each micro-batch's own mean (hand-computed)
    running = torch.zeros(6, dtype=torch.float64)
    for k in range(3):
        running = 0.9 * running + 0.1 * x[k * m:(k + 1) * m].mean(0)
    assert torch.allclose(model.bn.running_mean, running, atol=1e-12)
    assert int(model.bn.num_batches_tracked) == 3
    # the direction is the mean of gradients computed with per-micro-batch normalization ...
    want = torch.stack(micro_grads(copy.deepcopy(ref), x, y, m)).mean(0)
    assert torch.allclose(displacement(model, before) / lr, want, atol=1e-10)
    # ... which is not the full-batch-normalized gradient
    params = list(ref.parameters())
    full = flat(torch.autograd.grad(F.cross_entropy(ref(x), y), params))
    assert (want - full).norm() > 1e-3 * full.norm()


def test_uneven_last_micro_batch_counts_as_one_of_k():
    model, x, y = setup(n=10)
    ref = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = microbatch_step(ctx_for(model, 0.1, m=4), (x, y), penalty_kind=None)
    grads = micro_grads(ref, x, y, 4)  # sizes 4, 4, 2
    want = torch.stack(grads).mean(0)
    assert torch.allclose(displacement(model, before) / 0.1, want, atol=1e-10)
    assert metrics["grad/micro_norm"] == pytest.approx(float(torch.stack([g.pow(2).sum() for g in grads]).mean()))
    losses = [float(F.cross_entropy(ref(x[k * 4:(k + 1) * 4]), y[k * 4:(k + 1) * 4]).detach()) for k in range(3)]
    assert metrics["train/loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_iter_graft_step_has_the_random_micro_batch_norm(seed):
    model, x, y = setup(n=16)
    ref = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    lr, m = 0.05, 4
    metrics = microbatch_step(ctx_for(model, lr, m=m, seed=seed), (x, y), transform="iter_graft")
    pick = int(torch.randint(4, (1,), generator=torch.Generator().manual_seed(seed)))
    grads = micro_grads(ref, x, y, m)
    g_b = torch.stack(grads).mean(0)
    step = displacement(model, before)
    assert float(step.norm()) == pytest.approx(lr * float(grads[pick].norm()), rel=1e-10)
    assert float(F.cosine_similarity(step, g_b, dim=0)) == pytest.approx(1.0, abs=1e-12)
    assert metrics["grad/graft_norm"] == pytest.approx(float(grads[pick].norm()), rel=1e-10)
    assert metrics["grad/full_norm"] == pytest.approx(float(g_b.norm()), rel=1e-10)


def test_ngd_step_has_norm_lr():
    model, x, y = setup(n=12)
    ref = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    microbatch_step(ctx_for(model, 0.3, m=4), (x, y), transform="ngd")
    g_b = torch.stack(micro_grads(ref, x, y, 4)).mean(0)
    step = displacement(model, before)
    assert torch.allclose(step, 0.3 * g_b / g_b.norm(), atol=1e-12)


@pytest.mark.parametrize("step,want", [(0, 2.5), (19, 2.5), (20, 7.0), (39, 7.0), (45, 7.0), (60, 1.5)])
@pytest.mark.parametrize("as_pairs", [False, True])
def test_exter_graft_uses_the_reference_norm(step, want, as_pairs):
    reference = {0: 2.5, 20: 7.0, 60: 1.5}  # sparse: 40 missing, 20's value held
    if as_pairs:
        reference = sorted(reference.items(), reverse=True)
    model, x, y = setup(n=12)
    ref = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = microbatch_step(ctx_for(model, 0.1, m=4, step=step, extras={REFERENCE_KEY: reference}), (x, y),
                              transform="exter_graft")
    g_b = torch.stack(micro_grads(ref, x, y, 4)).mean(0)
    assert torch.allclose(displacement(model, before), 0.1 * want * g_b / g_b.norm(), atol=1e-12)
    assert metrics["grad/graft_norm"] == want


def test_exter_graft_holds_per_step_records_over_20_step_blocks():
    reference = {s: float(s) for s in range(100)}
    assert reference_norm(reference, 37) == 20.0
    assert reference_norm(reference, 40) == 40.0
    assert reference_norm({"0": 1.0, "20": 2.0}, 21) == 2.0  # keys as JSON writes them


def test_exter_graft_without_reference_is_a_clear_error():
    model, x, y = setup()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"exter_graft needs ctx.extras\['reference_grad_norms'\].*sgd"):
        microbatch_step(ctx_for(model, 0.1, m=4), (x, y), transform="exter_graft")
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="no norm at or before step 0"):
        reference_norm({20: 1.0}, 5)
    with pytest.raises(ValueError, match="empty"):
        reference_norm({}, 5)


def test_reference_norms_from_reports_keys_by_interval_start():
    reports = [{"step": 40, "grad/full_norm": 2.0}, {"step": 20, "grad/full_norm": 1.0},
               {"step": 50, "grad/full_norm": 3.0}]
    assert reference_norms_from_reports(reports) == {0: 1.0, 20: 2.0, 40: 3.0}


def test_standard_step_logs_the_global_gradient_norm():
    model, x, y = setup(bn=False)
    ref = copy.deepcopy(model)
    metrics = standard_step(ctx_for(model, 0.1, m=12), (x, y))
    F.cross_entropy(ref(x), y).backward()
    want = float(flat([p.grad for p in ref.parameters()]).norm())
    assert metrics["grad/full_norm"] == pytest.approx(want, rel=1e-10)


# --------------------------------------------------------------------------
# method records and runs through the loop
@pytest.mark.parametrize("name", NEW_METHODS)
def test_method_records(name):
    method = get_method(name)
    assert method.family == "implicit"
    assert "2211.15853" in method.paper
    hp = method.hparam_map
    assert hp["batch_size"].default == 5120 and hp["micro_batch_size"].default == 128
    assert ("reg_lambda" in hp) == (name in ("grad_norm", "fisher_trace", "avg_jacobian", "unit_jacobian"))
    assert method.space["lr"].low == 1e-3 and method.space["lr"].high == 1.0
    if "reg_lambda" in hp:
        assert (method.space["reg_lambda"].low, method.space["reg_lambda"].high) == (1e-5, 1.0)
    opt, _ = method.build(nn.Linear(2, 2), resolve_config(name, {"task": "cifar10_resnet18"}))
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0 and opt.param_groups[0]["weight_decay"] == 0


def test_micro_batch_larger_than_batch_is_rejected():
    with pytest.raises(ConfigError, match="micro_batch_size=256"):
        resolve_config("grad_norm", {"task": "cifar10_resnet18", "batch_size": 128, "micro_batch_size": 256})


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", n_train=400, n_test=128, seed=0)
    return str(root)


@pytest.mark.parametrize("name", [n for n in NEW_METHODS if n != "exter_graft"])
def test_short_run_on_smoke_cifar(name, smoke_dir):
    run = Run(name, {"task": "cifar10_resnet18", "size": "smoke", "data_dir": smoke_dir, "steps": 3,
                     "eval_every": 3, **SMOKE_BATCH})
    assert (run.config["batch_size"], run.config["micro_batch_size"]) == (32, 8)
    (report,) = list(run.reports())
    assert report["diverged"] == 0.0 and math.isfinite(report["train/loss"])
    assert math.isfinite(report["test/accuracy"]) and "test/accuracy_best" in report


def test_exter_graft_run_reads_a_reference_sgd_run(smoke_dir):
    sgd = Run("sgd", {"task": "cifar10_resnet18", "size": "smoke", "data_dir": smoke_dir, "steps": 4, **SMOKE_SGD})
    assert sgd.config["batch_size"] == 8  # the small batch = the smoke micro-batch size
    reference = reference_norms_from_reports(list(sgd.reports()))
    assert sorted(reference) == [0, 2]
    run = Run("exter_graft", {"task": "cifar10_resnet18", "size": "smoke", "data_dir": smoke_dir, "steps": 2,
                              **SMOKE_BATCH})
    with pytest.raises(ValueError, match="reference_grad_norms"):
        next(iter(run.reports()))
    run = Run("exter_graft", {"task": "cifar10_resnet18", "size": "smoke", "data_dir": smoke_dir, "steps": 2,
                              **SMOKE_BATCH})
    run.ctx.extras[REFERENCE_KEY] = reference
    (report,) = list(run.reports())
    assert report["grad/graft_norm"] == pytest.approx(reference[0])
    assert math.isfinite(report["train/loss"])


@pytest.mark.parametrize("name", ["fisher_trace", "iter_graft"])
def test_resumed_run_matches_an_uninterrupted_one(name, smoke_dir):
    """Method randomness comes from the run's generator, data from (seed, step): a resume is bit-for-bit."""
    config = {"task": "cifar10_resnet18", "size": "smoke", "data_dir": smoke_dir, "steps": 4, "eval_every": 2,
              **SMOKE_BATCH}
    straight = Run(name, config)
    list(straight.reports())
    first = Run(name, config)
    it = first.reports()
    next(it)
    state = copy.deepcopy(first.state_dict())
    resumed = Run(name, config)
    resumed.load_state_dict(state)
    list(resumed.reports())
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
