"""IRE wrapper (regtune.optim.ire) and the IRE method records (regtune.families.ire).

References computed here: the mask from per-coordinate gradients checked
against float64 central differences and a stable numpy sort; the IRE step from
an independent copy of the base optimizer stepped on the same gradients.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regtune.families.ire import with_ire
from regtune.methods import Method, get_method, resolve_config
from regtune.optim import IRE, SAM, AdamCPR, cpr_param_groups
from regtune.optim.ire import exact_smallest_mask, sample_labels
from regtune.space import ConfigError
from regtune.step import StepContext, standard_step

torch.set_num_threads(1)


class TinyTask:
    """Fixed-data classification task obeying the TaskInstance contract (forward / criterion)."""

    num_classes = 4

    def forward(self, model, inputs):
        return model(inputs)

    def criterion(self, logits, targets):
        return F.cross_entropy(logits, targets)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 4))


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 5, generator=g), torch.randint(0, 4, (12,), generator=g)) for _ in range(n)]


BASES = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "sam": lambda m: SAM(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), rho=0.05, model=m),
    "adamcpr": lambda m: AdamCPR(cpr_param_groups(m)[0], lr=1e-2, kappa_init_method="dependent",
                                 kappa_init_param=0.9),
}


def run_steps(model, opt, data, generator, start: int = 0) -> None:
    ctx = StepContext(model, opt, TinyTask(), {"max_grad_norm": None}, torch.device("cpu"), generator=generator)
    for i, batch in enumerate(data):
        ctx.step = start + i
        standard_step(ctx, batch)


def inner_state(opt) -> list[dict]:
    """Per-parameter state of the innermost torch optimizer (through SAM's wrapper dict)."""
    sd = opt.state_dict()
    while "base" in sd:
        sd = sd["base"]
    return list(sd["state"].values())


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# ---------------------------------------------------------------------- mask
@pytest.mark.parametrize("rank", [0.0, 0.3, 0.55, 1.0])
def test_mask_is_the_k_smallest_fisher_scores(rank):
    model = tiny_model()
    x, _ = batches(1)[0]
    opt = IRE(torch.optim.SGD(model.parameters(), lr=0.1), ire_rank=rank, ire_prog=1.0)
    running = copy.deepcopy([b.clone() for b in model.buffers()])
    opt.refresh_mask(model, x, generator=torch.Generator().manual_seed(5))
    # the mask pass leaves BatchNorm statistics and .grad alone
    assert all(torch.equal(a, b) for a, b in zip(running, model.buffers()))
    assert all(p.grad is None for p in model.parameters())

    # reference: the same labels (documented contract), per-coordinate gradient by float64 central differences
    ref = copy.deepcopy(model).double()
    labels = sample_labels(copy.deepcopy(model)(x), torch.Generator().manual_seed(5))
    flat0 = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])

    def loss_at(flat):
        with torch.no_grad():
            offset = 0
            for p in ref.parameters():
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            return float(F.cross_entropy(ref(x.double()), labels))

    h = 1e-6
    grad = np.array([(loss_at(flat0 + h * e) - loss_at(flat0 - h * e)) / (2 * h)
                     for e in torch.eye(flat0.numel(), dtype=torch.float64)])
    loss_at(flat0)
    # float32 autograd scores (what IRE ranks), checked against the finite differences
    ref32 = copy.deepcopy(model)
    F.cross_entropy(ref32(x), labels).backward()
    g32 = torch.cat([p.grad.reshape(-1) for p in ref32.parameters()]).double().numpy()
    np.testing.assert_allclose(g32, grad, rtol=1e-3, atol=1e-6)
    scores = g32.astype(np.float32) ** 2

    n = scores.size
    k = round((1 - rank) * n)
    expected = np.zeros(n, dtype=bool)
    expected[np.argsort(scores, kind="stable")[:k]] = True
    got = torch.cat([m.reshape(-1) for m in opt.mask()]).numpy()
    assert got.sum() == k == opt.num_keep
    np.testing.assert_array_equal(got, expected)


def test_exact_smallest_mask_breaks_ties_by_index():
    scores = torch.tensor([0.0, 0.0, 1.0, 0.0, 2.0, 1.0, 0.0, float("nan")])
    assert exact_smallest_mask(scores, 3).tolist() == [True, True, False, True, False, False, False, False]
    assert exact_smallest_mask(scores, 5).tolist() == [True, True, True, True, False, False, True, False]
    assert exact_smallest_mask(scores, 8).all() and not exact_smallest_mask(scores, 0).any()
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (1000,), generator=g).float()
    for k in (1, 137, 500, 999):
        want = np.zeros(1000, dtype=bool)
        want[np.argsort(s.numpy(), kind="stable")[:k]] = True
        np.testing.assert_array_equal(exact_smallest_mask(s, k).numpy(), want)


def test_mask_starts_zero_and_refreshes_on_schedule():
    model = tiny_model()
    opt = IRE(torch.optim.SGD(model.parameters(), lr=0.1), ire_rank=0.5, ire_interval=3, ire_start=2)
    assert not any(m.any() for m in opt.mask())
    run_steps(model, opt, batches(9), torch.Generator().manual_seed(0))
    assert opt.num_refreshes == 3  # steps 2, 5, 8
    assert opt.constraint_summary()["ire/mask_share"] == pytest.approx(opt.num_keep / 88)


def test_one_extra_parameter_sized_buffer():
    model = tiny_model()
    opt = IRE(torch.optim.AdamW(model.parameters(), lr=1e-2), ire_rank=0.3)
    run_steps(model, opt, batches(2), torch.Generator().manual_seed(0))
    n = sum(p.numel() for p in model.parameters())
    assert sum(f.numel() for f in opt._flat) == n and all(f.dtype == torch.float32 for f in opt._flat)
    assert len(opt.state) == 0  # nothing else stored per parameter


# ---------------------------------------------------------------------- step
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("rank", [0.3, 1.0])
def test_prog_zero_or_empty_mask_follows_the_base_exactly(base, rank):
    data = batches(7)
    plain, wrapped = tiny_model(), tiny_model()
    run_steps(plain, BASES[base](plain), data, torch.Generator().manual_seed(0))
    prog = 0.0 if rank < 1.0 else 3.0  # rank 1: mask empty, so any kappa leaves the base trajectory
    opt = IRE(BASES[base](wrapped), ire_rank=rank, ire_prog=prog, ire_interval=2)
    run_steps(wrapped, opt, data, torch.Generator().manual_seed(0))
    assert opt.num_refreshes == 4
    assert params_equal(plain, wrapped)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("decay", [False, True])
def test_step_is_one_plus_prog_mask_times_the_base_step(base, decay):
    model = tiny_model()
    opt = IRE(BASES[base](model), ire_rank=0.4, ire_prog=2.5, ire_start=10**6, ire_prog_decay=decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
    g = torch.Generator().manual_seed(3)
    masks = [torch.rand(p.shape, generator=g) < 0.6 for p in model.parameters()]
    by_param = dict(zip(model.parameters(), masks))
    opt.set_mask([by_param[p] for p in opt.mask_params])
    task = TinyTask()
    for t, (x, y) in enumerate(batches(4)):
        ref_model = copy.deepcopy(model)
        ref_opt = BASES[base](ref_model)
        ref_opt.load_state_dict(copy.deepcopy(opt.base.state_dict()))  # with the scheduled lr of step t
        before = [p.detach().clone() for p in model.parameters()]
        for m, o in ((model, opt), (ref_model, ref_opt)):
            def closure(m=m, o=o, x=x, y=y):
                o.zero_grad()
                loss = task.criterion(m(x), y)
                loss.backward()
                return loss
            closure()
            o.step(closure) if getattr(o, "needs_closure", False) else o.step()
        kappa = 2.5 * (0.5 ** t if decay else 1.0)
        for p, q, old, mk in zip(model.parameters(), ref_model.parameters(), before, masks):
            want = old + (1 + kappa * mk.float()) * (q.detach() - old)
            torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)
        # the base optimizer's state is the one it would have without IRE
        for s_ire, s_ref in zip(inner_state(opt.base), inner_state(ref_opt)):
            for key, val in s_ref.items():
                if torch.is_tensor(val) and val.numel() > 1:
                    assert torch.equal(s_ire[key], val), key
        sched.step()


@pytest.mark.parametrize("base", sorted(BASES))
def test_state_dict_round_trips_mid_run(base):
    data = batches(12)
    model = tiny_model()
    opt = IRE(BASES[base](model), ire_rank=0.35, ire_prog=2.0, ire_interval=3, ire_start=1, ire_prog_decay=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    gen = torch.Generator().manual_seed(0)
    ctx = StepContext(model, opt, TinyTask(), {"max_grad_norm": None}, torch.device("cpu"), generator=gen)
    for i in range(5):
        ctx.step = i
        standard_step(ctx, data[i])
        sched.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "gen": gen.get_state()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    model2 = tiny_model(seed=99)
    opt2 = IRE(BASES[base](model2), ire_rank=0.35, ire_prog=2.0, ire_interval=3, ire_start=1, ire_prog_decay=True)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda t: 1.0 / (1 + t))
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    gen2 = torch.Generator()
    gen2.set_state(saved["gen"])
    assert [m.tolist() for m in opt2.mask()] == [m.tolist() for m in opt.mask()]
    ctx2 = StepContext(model2, opt2, TinyTask(), {"max_grad_norm": None}, torch.device("cpu"), generator=gen2)
    for i in range(5, 12):
        for c, s in ((ctx, sched), (ctx2, sched2)):
            c.step = i
            standard_step(c, data[i])
            s.step()
    assert opt.num_refreshes == opt2.num_refreshes == 4
    assert opt2.param_groups is opt2.base.param_groups
    assert params_equal(model, model2)


def test_ire_validates_its_arguments():
    model = tiny_model()
    for kwargs in ({"ire_rank": 1.5}, {"ire_prog": -1.0}, {"ire_interval": 0}, {"ire_start": -2}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            IRE(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


# ---------------------------------------------------------------------- registry
def test_ire_methods_and_hparams():
    for name in ("sgd_ire", "sam_ire", "adamw_ire", "adamcpr_ire"):
        method = get_method(name)
        assert {"ire_rank", "ire_prog", "ire_interval", "ire_start", "ire_prog_decay"} <= set(method.hparam_map)
        assert set(method.space) >= {"ire_rank", "ire_prog"}
    assert get_method("sam_ire").space["sam_rho"].high == 0.5
    with pytest.raises(ConfigError, match="ire_rank=1.5"):
        resolve_config("sgd_ire", {"task": "grokking", "ire_rank": 1.5})
    with pytest.raises(ConfigError, match="ire_rnk"):
        resolve_config("adamw_ire", {"task": "grokking", "ire_rnk": 0.5})
    with pytest.raises(ValueError, match="IRE-wrapped again"):
        with_ire("sgd_ire")


def test_with_ire_composes_a_user_method():
    sgd = get_method("sgd")
    mine = Method(name="my_sgd", build=sgd.build, hparams=sgd.hparams, space=sgd.space,
                  doc="user method", paper="none", family="user")
    composed = with_ire(mine)  # a record, ready for register_method (not registered: keep the registry clean)
    assert composed.name == "my_sgd_ire" and set(composed.space) == {"lr", "ire_rank", "ire_prog"}
    model = tiny_model()
    config = {h.name: h.default for h in composed.hparams}
    opt, summary = composed.build(model, config)
    assert isinstance(opt, IRE) and "IRE(" in summary


def test_run_adamcpr_ire_on_grokking_smoke():
    from regtune.loop import Run
    run = Run("adamcpr_ire", {"task": "grokking", "size": "smoke", "steps": 4, "eval_every": 2, "ire_interval": 2})
    reports = list(run.reports())
    assert all(math.isfinite(r["train/loss"]) for r in reports)
    assert reports[-1]["ire/mask_share"] == pytest.approx(0.8, abs=1e-3) and "cpr/lambda_mean" in reports[-1]
