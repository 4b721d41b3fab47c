"""AdamCPR against the reference package, the inflection-point rule on a hand case,
Adam + rescaling's norm invariant, and state_dict round trips."""

import copy

import pytest
import torch
from torch import nn

from regtune.optim import AdamCPR, AdamRescale, cpr_param_groups

pytorch_cpr = pytest.importorskip("pytorch_cpr")


def small_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(20, 16), nn.Flatten(), nn.Linear(48, 32), nn.Tanh(), nn.LayerNorm(32),
                          nn.Linear(32, 5))
    nn.init.normal_(model[0].weight, std=0.1)
    return model


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 20, (32, 3), generator=g), torch.randint(0, 5, (32,), generator=g)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def flagged_groups(model):
    groups, _ = cpr_param_groups(model, regularize_embedding=True)
    return groups


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("method,param", [("uniform", 2.0), ("dependent", 0.8), ("warm_start", 20)])
def test_matches_reference_package(method, param, foreach):
    data = batches(120)
    ours, ref = small_model(), small_model()
    kw = dict(lr=3e-3, betas=(0.9, 0.98), kappa_init_method=method, kappa_init_param=param, reg_function="l2",
              kappa_update=1.0)
    opt = AdamCPR(flagged_groups(ours), foreach=foreach, **kw)
    train(ours, opt, data)
    train(ref, pytorch_cpr.AdamCPR(flagged_groups(ref), foreach=foreach, **kw), data)
    # the constraint did work during the run: plain Adam ends elsewhere
    adam = small_model()
    train(adam, torch.optim.Adam(adam.parameters(), lr=3e-3, betas=(0.9, 0.98)), data)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(ours.parameters(), adam.parameters()))
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=f"{method} {name}")


def test_constraint_is_active_against_plain_adam():
    """The same run without the constraint differs: the comparison above can fail."""
    data = batches(100)
    cpr, adam = small_model(), small_model()
    train(cpr, AdamCPR(flagged_groups(cpr), lr=3e-3, kappa_init_method="dependent", kappa_init_param=0.5), data)
    train(adam, torch.optim.Adam(adam.parameters(), lr=3e-3), data)
    w_cpr, w_adam = cpr[2].weight, adam[2].weight
    assert w_cpr.square().sum() < 0.8 * w_adam.square().sum()


def test_bare_parameter_list_is_refused():
    with pytest.raises(ValueError, match="regularize"):
        AdamCPR(small_model().parameters())


@pytest.mark.parametrize("method,param", [("uniform", 0.05), ("dependent", 0.8), ("warm_start", 20)])
def test_std_matches_reference_package(method, param):
    data = batches(100)
    ours, ref = small_model(), small_model()
    kw = dict(lr=3e-3, betas=(0.9, 0.98), kappa_init_method=method, kappa_init_param=param, reg_function="std")
    opt = AdamCPR(flagged_groups(ours), **kw)
    train(ours, opt, data)
    train(ref, pytorch_cpr.AdamCPR(flagged_groups(ref), **kw), data)
    assert any(float(s["cpr_lagmul"]) > 0 for s in opt.state.values() if "cpr_lagmul" in s)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=f"{method} {name}")


def test_inflection_point_fires_at_expected_step():
    """Constant gradient -1 for 50 steps (W grows linearly, R convex), then 0.

    With reg_step_size 10, R is sampled at 0, 10, ..., 50 with a positive second
    difference; after step 50 Adam's steps shrink, so the growth of the sample at
    step 60 is smaller than at 50: the first negative second difference is at 60.
    Before that the trajectory is plain Adam.
    """
    w = nn.Parameter(torch.full((4, 4), 0.5))
    ref = nn.Parameter(w.detach().clone())
    opt = AdamCPR([{"params": [w], "regularize": True}], lr=0.01, kappa_init_method="inflection_point",
                  reg_step_size=10)
    adam = torch.optim.Adam([ref], lr=0.01)
    r_at_60 = None
    for step in range(1, 81):
        g = torch.full_like(w, -1.0 if step <= 50 else 0.0)
        w.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        adam.step()
        state = opt.state[w]
        if step < 60:
            assert not state["cpr_active"], step
            assert torch.equal(w, ref), step
        if step == 60:
            r_at_60 = float(w.detach().square().sum())
            assert state["cpr_active"] and state["cpr_kappa_step"] == 60
    assert float(opt.state[w]["cpr_kappa"]) == pytest.approx(r_at_60, rel=1e-6)


def test_warm_start_sets_kappa_after_update_at_step_s():
    model = small_model()
    opt = AdamCPR(flagged_groups(model), lr=1e-2, kappa_init_method="warm_start", kappa_init_param=5)
    data = batches(6)
    train(model, opt, data[:5])
    w = model[2].weight
    assert opt.state[w]["cpr_active"]
    assert float(opt.state[w]["cpr_kappa"]) == pytest.approx(float(w.detach().square().sum()), rel=1e-6)
    assert float(opt.state[w]["cpr_lagmul"]) == 0.0


@pytest.mark.parametrize("method", ["dependent", "inflection_point", "warm_start"])
def test_state_dict_round_trip_mid_run(method):
    data = batches(60)
    kw = dict(lr=3e-3, kappa_init_method=method, kappa_init_param=10 if method == "warm_start" else 0.7,
              reg_step_size=5)
    a = small_model()
    opt_a = AdamCPR(flagged_groups(a), **kw)
    train(a, opt_a, data[:30])
    b = copy.deepcopy(a)
    opt_b = AdamCPR(flagged_groups(b), **kw)
    saved = copy.deepcopy(opt_a.state_dict())
    torch.save(saved, "/dev/null")
    opt_b.load_state_dict(saved)
    train(a, opt_a, data[30:])
    train(b, opt_b, data[30:])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_rescale_holds_joint_norm():
    model = small_model()
    reg = [p for g in flagged_groups(model) if g["regularize"] for p in g["params"]]
    n_init = float(torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in reg])))
    opt = AdamRescale(flagged_groups(model), lr=1e-2, rescale_alpha=0.8)
    train(model, opt, batches(50))
    n_now = float(torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in reg])))
    assert n_now == pytest.approx(0.8 * n_init, rel=1e-5)
    assert opt.joint_norm() == pytest.approx(0.8 * n_init, rel=1e-5)


def test_rescale_rejects_bad_alpha():
    with pytest.raises(ValueError, match="rescale_alpha"):
        AdamRescale(flagged_groups(small_model()), rescale_alpha=0.0)
