"""SAM (regtune.optim.sam) against a hand computation of the perturbed gradient, plain and adaptive."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from regtune.optim import SAM

torch.set_num_threads(1)


def model_and_data(bn: bool = False):
    torch.manual_seed(0)
    layers = [nn.Linear(3, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh(), nn.Linear(6, 2)]
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(10, 3, generator=g), torch.randint(0, 2, (10,), generator=g)


def closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def hand_sam_gradient(model, x, y, rho: float, adaptive: bool) -> dict[str, torch.Tensor]:
    """grad L(w + e) with e = rho T^2 g / ||T g||, by torch.func on a float64 copy."""
    ref = copy.deepcopy(model).double()
    w = {k: v.detach() for k, v in ref.named_parameters()}

    def loss(params):
        return F.cross_entropy(functional_call(ref, params, (x.double(),)), y)

    g = grad(loss)(w)
    t = {k: (v.abs() if adaptive else torch.ones_like(v)) for k, v in w.items()}
    norm = math.sqrt(sum(float(((t[k] * g[k]) ** 2).sum()) for k in w))
    e = {k: rho * t[k] ** 2 * g[k] / norm for k in w}
    return grad(loss)({k: w[k] + e[k] for k in w})


@pytest.mark.parametrize("adaptive,rho", [(False, 0.05), (False, 0.3), (True, 0.5)])
def test_one_sgd_step_matches_hand_computation(adaptive, rho):
    model, x, y = model_and_data()
    w0 = {k: v.detach().clone().double() for k, v in model.named_parameters()}
    g_sam = hand_sam_gradient(model, x, y, rho, adaptive)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=rho, adaptive=adaptive, model=model)
    closure = closure_for(model, opt, x, y)
    closure()
    opt.step(closure)
    for k, p in model.named_parameters():
        want = w0[k] - 0.1 * g_sam[k]
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)


def test_adamw_base_sees_the_perturbed_gradient_at_w():
    model, x, y = model_and_data()
    ref = copy.deepcopy(model)
    g_sam = hand_sam_gradient(model, x, y, 0.1, False)
    opt = SAM(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), rho=0.1, model=model)
    closure = closure_for(model, opt, x, y)
    closure()
    opt.step(closure)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for k, p in ref.named_parameters():
        p.grad = g_sam[k].float()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("second_pass", [False, True])
def test_batchnorm_statistics_and_the_second_pass(second_pass):
    model, x, y = model_and_data(bn=True)
    single = copy.deepcopy(model)
    F.cross_entropy(single(x), y)  # the statistics after one training forward
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, model=model, bn_second_pass=second_pass)
    closure = closure_for(model, opt, x, y)
    closure()
    opt.step(closure)
    bn, ref_bn = model[1], single[1]
    assert int(bn.num_batches_tracked) == (2 if second_pass else 1)
    assert torch.equal(bn.running_mean, ref_bn.running_mean) is (not second_pass)
    assert torch.equal(bn.running_var, ref_bn.running_var) is (not second_pass)


def test_needs_closure_and_round_trip():
    model, x, y = model_and_data()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05, model=model)
    assert opt.needs_closure
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    closure = closure_for(model, opt, x, y)
    for _ in range(2):
        closure()
        opt.step(closure)
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = copy.deepcopy(model)
    opt2 = SAM(torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.9), rho=0.05, model=model2)
    model2.load_state_dict(saved["m"])
    opt2.load_state_dict(saved["o"])
    assert opt2.param_groups[0]["lr"] == 0.1
    for m, o in ((model, opt), (model2, opt2)):
        c = closure_for(m, o, x, y)
        for _ in range(3):
            c()
            o.step(c)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_rho_zero_is_the_base_optimizer():
    model, x, y = model_and_data()
    ref = copy.deepcopy(model)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.0, model=model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        c = closure_for(model, opt, x, y)
        c()
        opt.step(c)
        closure_for(ref, ref_opt, x, y)()
        ref_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_sam_method_on_a_smoke_task(tmp_path):
    from regtune.data.cifar import write_fake_cifar
    from regtune.loop import Run
    write_fake_cifar(tmp_path, "cifar10", 384, 128)
    run = Run("sam", {"task": "cifar10_resnet56", "size": "smoke", "data_dir": str(tmp_path), "sam_adaptive": True,
                      "sam_rho": 0.5})
    reports = list(run.reports())
    assert run.optimizer.adaptive and run.optimizer.rho == 0.5
    assert all(math.isfinite(r["train/loss"]) for r in reports)
