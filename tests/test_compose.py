"""Methods composed from parts (regtune.compose, regtune.parts) against independent references.

Each composition's steps are compared with a hand-written computation: the
micro-batch gradient-norm penalty written out with double backward, SAM's
ascent written out, the reference ``pytorch_cpr.AdamCPR`` (or the SGD / CPR /
IRE update rules written out) taking the step. The hyperparameters of a
composition are checked to be exactly the union of its parts'.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regtune.compose import compose, extend
from regtune.methods import get_method, resolve_config
from regtune.optim import cpr_param_groups
from regtune.parts import adam, adamw, cpr, gn_penalty, ire, microbatch, ngd, plain_sgd, rescale, sam, sgd
from regtune.space import ConfigError
from regtune.step import StepContext

pytorch_cpr = pytest.importorskip("pytorch_cpr")
torch.set_num_threads(1)

C = 3


class StubTask:
    num_classes = C

    def forward(self, model, x):
        return model(x)

    def criterion(self, logits, y):
        return F.cross_entropy(logits, y)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, C))


def batches(n_batches: int, n: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g), torch.randint(0, C, (n,), generator=g)) for _ in range(n_batches)]


def config(method, **overrides):
    c = {h.name: h.default for h in method.hparams}
    c.update({"max_grad_norm": None, "steps": 100, **overrides})
    return c


def run_method(method, model, data, **overrides):
    """``method``'s optimizer and step function, driven over ``data`` as the training loop drives them."""
    c = config(method, **overrides)
    opt, summary = method.build(model, c)
    ctx = StepContext(model, opt, StubTask(), c, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    metrics = []
    for t, batch in enumerate(data):
        ctx.step = t
        metrics.append(method.step(ctx, batch))
    return opt, summary, metrics


def gn_direction(model, x, y, m, lam):
    """(1/K) sum_k grad[L_k + lam ||grad L_k||^2], written out with double backward."""
    params = list(model.parameters())
    k_count = math.ceil(x.shape[0] / m)
    total = [torch.zeros_like(p) for p in params]
    for k in range(k_count):
        loss = F.cross_entropy(model(x[k * m:(k + 1) * m]), y[k * m:(k + 1) * m])
        g = torch.autograd.grad(loss, params, create_graph=True)
        r = sum((t ** 2).sum() for t in g)
        for acc, t in zip(total, torch.autograd.grad(loss + lam * r, params)):
            acc += t
    return [t / k_count for t in total]


def batch_grad(model, x, y):
    params = list(model.parameters())
    return list(torch.autograd.grad(F.cross_entropy(model(x), y), params))


def set_grads(model, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


def assert_same(a: nn.Module, b: nn.Module, rtol=1e-5, atol=1e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol, msg=name)


def differs(a: nn.Module, b: nn.Module, tol=1e-4) -> bool:
    return any(not torch.allclose(p, q, atol=tol) for p, q in zip(a.parameters(), b.parameters()))


CPR_KW = dict(lr=1e-2, betas=(0.9, 0.98), kappa_init_method="dependent", kappa_init_param=0.7)
CPR_CONFIG = {"lr": 1e-2, "betas": (0.9, 0.98), "kappa_init_method": "dependent", "kappa_init_param": 0.7}


# ------------------------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("name,parts", [
    ("sam_adamcpr", (adam(), cpr(), sam())),
    ("adamcpr_gn", (adam(), gn_penalty(), cpr())),
    ("adamw_gn", (adamw(), gn_penalty())),
    ("sgdm_ire", (sgd(), ire())),
    ("adamcpr_ire", (adam(), cpr(), ire())),
    ("sam", (sgd(), sam())),
    ("sam_adamw", (adamw(), sam())),
    ("grad_norm", (plain_sgd(), gn_penalty())),
])
def test_hparams_and_space_are_the_union_of_the_parts(name, parts):
    method = get_method(name)
    assert set(method.hparam_map) == {h.name for p in parts for h in p.hparams}
    assert set(method.space) == {k for p in parts for k in p.space}
    assert method.parts == tuple(p.name for p in parts)


def test_sgdm_ire_is_sgd_ire_with_momentum_by_default():
    assert set(get_method("sgdm_ire").hparam_map) == set(get_method("sgd_ire").hparam_map)
    assert get_method("sgdm_ire").hparam_map["momentum"].default == 0.9
    assert get_method("sgd_ire").hparam_map["momentum"].default == 0.0


@pytest.mark.parametrize("method,key", [
    ("sam", "betas"), ("sam_adamw", "momentum"), ("sam_adamcpr", "weight_decay"), ("adamw_gn", "momentum"),
    ("adamcpr_gn", "weight_decay"), ("sgdm_ire", "betas"), ("sam", "sam_base"),
])
def test_a_key_of_another_part_is_rejected_as_unknown(method, key):
    with pytest.raises(ConfigError, match=f"unknown hyperparameter '{key}'"):
        resolve_config(method, {"task": "grokking", key: 0.5})


def test_compose_refuses_misplaced_parts():
    with pytest.raises(ValueError, match="needs a micro-batch estimator"):
        compose("x", base=sgd(), transform=ngd())
    with pytest.raises(ValueError, match="appears twice"):
        compose("x", base=sgd(), wrappers=[ire(), ire()])
    with pytest.raises(ValueError, match="takes wrapper parts"):
        compose("x", base=sgd(), wrappers=[adamw()])
    with pytest.raises(ValueError, match="takes base parts"):
        compose("x", base=sam())
    with pytest.raises(ValueError, match="no hyperparameter 'betas'"):
        sgd(betas=(0.9, 0.9))
    with pytest.raises(ValueError, match="IRE-wrapped again"):
        extend("sgdm_ire", ire())


# ------------------------------------------------------------------------------------------------ numerics
def test_adamcpr_gn_is_adamcpr_on_the_brute_force_penalized_gradient():
    data, m, lam = batches(4), 5, 0.3  # K = 3 micro-batches (5, 5, 2)
    ours, ref, unpenalized = make_model(), make_model(), make_model()
    opt, _, _ = run_method(get_method("adamcpr_gn"), ours, data, batch_size=12, micro_batch_size=m, reg_lambda=lam,
                           **CPR_CONFIG)
    ref_opt = pytorch_cpr.AdamCPR(cpr_param_groups(ref)[0], **CPR_KW)
    plain_opt = pytorch_cpr.AdamCPR(cpr_param_groups(unpenalized)[0], **CPR_KW)
    for x, y in data:
        set_grads(ref, gn_direction(ref, x, y, m, lam))
        ref_opt.step()
        set_grads(unpenalized, batch_grad(unpenalized, x, y))
        plain_opt.step()
    assert_same(ours, ref)
    assert differs(ours, unpenalized)  # the penalty changed the run: the comparison can fail
    assert any(float(s["cpr_lagmul"]) > 0 for s in opt.state.values() if "cpr_lagmul" in s)  # the constraint acted


def test_adamw_gn_is_adamw_on_the_brute_force_penalized_gradient():
    data, m, lam = batches(4), 4, 0.5
    ours, ref = make_model(), make_model()
    run_method(get_method("adamw_gn"), ours, data, batch_size=12, micro_batch_size=m, reg_lambda=lam, lr=1e-2,
               weight_decay=0.1)
    decay = [p for p in ref.parameters() if p.ndim >= 2]
    free = [p for p in ref.parameters() if p.ndim < 2]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": free, "weight_decay": 0.0}],
                                lr=1e-2)
    for x, y in data:
        set_grads(ref, gn_direction(ref, x, y, m, lam))
        ref_opt.step()
    assert_same(ours, ref)
    no_penalty = make_model()
    run_method(get_method("adamw_gn"), no_penalty, data, batch_size=12, micro_batch_size=m, reg_lambda=0.0, lr=1e-2,
               weight_decay=0.1)
    assert differs(ours, no_penalty)


def sam_gradient(model, x, y, rho):
    """The gradient at w + rho g / (||g|| + 1e-12), written out; the weights are left at w."""
    g = batch_grad(model, x, y)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for p, t in zip(probe.parameters(), g):
            p.add_(rho * t / (norm + 1e-12))
    return batch_grad(probe, x, y)


def test_sam_adamcpr_is_a_sam_ascent_then_an_adamcpr_step():
    data, rho = batches(5), 0.2
    ours, ref, no_sam = make_model(), make_model(), make_model()
    from regtune.step import standard_step

    method = get_method("sam_adamcpr")
    assert method.step is standard_step
    run_method(method, ours, data, sam_rho=rho, **CPR_CONFIG)
    ref_opt = pytorch_cpr.AdamCPR(cpr_param_groups(ref)[0], **CPR_KW)
    plain_opt = pytorch_cpr.AdamCPR(cpr_param_groups(no_sam)[0], **CPR_KW)
    for x, y in data:
        set_grads(ref, sam_gradient(ref, x, y, rho))
        ref_opt.step()
        set_grads(no_sam, batch_grad(no_sam, x, y))
        plain_opt.step()
    assert_same(ours, ref)
    assert differs(ours, no_sam)


def sgd_momentum_step(model, grads, bufs, lr, momentum, wd):
    """One torch-style SGD step written out: L2 decay on matrices only, heavy-ball buffer; returns Delta."""
    deltas = []
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(model.parameters(), grads)):
            d = g + (wd * p if p.ndim >= 2 else 0.0)
            bufs[i] = d.clone() if bufs[i] is None else momentum * bufs[i] + d
            deltas.append(-lr * bufs[i])
    return deltas


@pytest.mark.parametrize("start", [0, 2])
def test_sgdm_ire_with_a_full_mask_amplifies_the_momentum_step(start):
    """ire_rank 0: every coordinate is flat, so from ire_start on theta <- theta + (1 + kappa) Delta_sgdm."""
    data, lr, wd, kappa = batches(5), 0.1, 5e-4, 1.5
    ours, ref = make_model(), make_model()
    run_method(get_method("sgdm_ire"), ours, data, lr=lr, weight_decay=wd, ire_rank=0.0, ire_prog=kappa,
               ire_start=start, ire_interval=2)
    bufs = [None] * len(list(ref.parameters()))
    for t, (x, y) in enumerate(data):
        deltas = sgd_momentum_step(ref, batch_grad(ref, x, y), bufs, lr, 0.9, wd)  # momentum: the default 0.9
        with torch.no_grad():
            for p, d in zip(ref.parameters(), deltas):
                p.add_((1 + (kappa if t >= start else 0.0)) * d)
    assert_same(ours, ref, rtol=1e-6, atol=1e-7)
    plain = make_model()
    run_method(get_method("sgdm_ire"), plain, data, lr=lr, weight_decay=wd, ire_rank=1.0, ire_prog=kappa)
    assert differs(ours, plain)


def test_cpr_wraps_sgd_with_momentum():
    """CPR is not tied to Adam: SGD-momentum's step, then lambda <- max(0, lambda + (R - kappa) / n), W *= 1 - 2 lambda."""
    data, lr = batches(6), 0.2
    ours, ref = make_model(), make_model()
    method = compose("sgdm_cpr", base=sgd(momentum=0.9), wrappers=[cpr()])
    run_method(method, ours, data, lr=lr, kappa_init_method="dependent", kappa_init_param=0.9)
    params = list(ref.parameters())
    kappa = {i: 0.9 * float(p.detach().square().sum()) for i, p in enumerate(params) if p.ndim >= 2}
    lam = dict.fromkeys(kappa, 0.0)
    bufs = [None] * len(params)
    for x, y in data:
        deltas = sgd_momentum_step(ref, batch_grad(ref, x, y), bufs, lr, 0.9, 0.0)
        with torch.no_grad():
            for i, (p, d) in enumerate(zip(params, deltas)):
                p.add_(d)
                if i in kappa:
                    lam[i] = max(0.0, lam[i] + (float(p.square().sum()) - kappa[i]) / p.numel())
                    p.mul_(1 - 2 * lam[i])
    assert max(lam.values()) > 0
    assert_same(ours, ref)


def test_rescale_wraps_sgd():
    data, lr, alpha = batches(4), 0.3, 0.7
    ours, ref = make_model(), make_model()
    method = compose("sgd_rescale", base=sgd(), wrappers=[rescale()])
    run_method(method, ours, data, lr=lr, rescale_alpha=alpha)
    mats = [p for p in ref.parameters() if p.ndim >= 2]
    with torch.no_grad():
        for p in mats:
            p.mul_(alpha)
    n0 = float(torch.sqrt(sum(p.detach().square().sum() for p in mats)))
    for x, y in data:
        g = batch_grad(ref, x, y)
        with torch.no_grad():
            for p, t in zip(ref.parameters(), g):
                p.sub_(lr * t)
            nt = float(torch.sqrt(sum(p.square().sum() for p in mats)))
            for p in mats:
                p.mul_(n0 / nt)
    assert_same(ours, ref)


def test_a_penalty_combines_with_a_transform():
    """GN penalty + NGD: theta <- theta - lr d / |d|, d the brute-force penalized direction."""
    data, m, lam, lr = batches(3), 4, 0.4, 0.05
    ours, ref = make_model(), make_model()
    method = compose("gn_ngd", base=plain_sgd(), estimator=gn_penalty(), transform=ngd())
    run_method(method, ours, data, lr=lr, batch_size=12, micro_batch_size=m, reg_lambda=lam)
    for x, y in data:
        d = gn_direction(ref, x, y, m, lam)
        norm = torch.sqrt(sum((t ** 2).sum() for t in d))
        with torch.no_grad():
            for p, t in zip(ref.parameters(), d):
                p.sub_(lr * t / norm)
    assert_same(ours, ref, rtol=1e-6, atol=1e-7)


def test_sam_over_a_micro_batch_estimator():
    """SAM's closure recomputes the micro-batch direction at w + e: with equal micro-batches and no BatchNorm
    that is the batch gradient, so the step is SAM around SGD on the whole batch."""
    data, m, rho, lr = batches(4), 4, 0.1, 0.1
    ours, ref = make_model(), make_model()
    method = compose("sam_pseudo_gd", base=plain_sgd(), estimator=microbatch(), wrappers=[sam()])
    run_method(method, ours, data, lr=lr, batch_size=12, micro_batch_size=m, sam_rho=rho)
    for x, y in data:
        g = sam_gradient(ref, x, y, rho)
        with torch.no_grad():
            for p, t in zip(ref.parameters(), g):
                p.sub_(lr * t)
    assert_same(ours, ref)


def test_a_user_composition_builds_and_steps():
    """The README's example: AdamW + GN penalty + IRE, composed in a script (not registered)."""
    method = compose("my_method", base=adamw(), wrappers=[ire()], estimator=gn_penalty())
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt, summary, metrics = run_method(method, model, batches(3), batch_size=12, micro_batch_size=4, ire_interval=1)
    assert "IRE(" in summary and "grad_norm penalty" in summary and "regularized" in summary
    assert opt.num_refreshes == 3 and all(math.isfinite(m_["reg/value"]) and m_["reg/value"] > 0 for m_ in metrics)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_an_adamcpr_checkpoint_without_the_cpr_step_count_continues_exactly():
    """Checkpoints of the former Adam subclass had no ``cpr_step``: the constraint counts from Adam's ``step``."""
    from regtune.optim import AdamCPR

    data = batches(20)
    kw = dict(lr=1e-2, kappa_init_method="warm_start", kappa_init_param=12)
    whole, part = make_model(), make_model()
    opt_whole = AdamCPR(cpr_param_groups(whole)[0], **kw)
    opt_part = AdamCPR(cpr_param_groups(part)[0], **kw)
    for x, y in data[:8]:
        for model, opt in ((whole, opt_whole), (part, opt_part)):
            set_grads(model, batch_grad(model, x, y))
            opt.step()
    saved = copy.deepcopy(opt_part.state_dict())
    for s in saved["state"].values():
        assert s.pop("cpr_step", 8) == 8
    resumed = copy.deepcopy(part)
    opt_resumed = AdamCPR(cpr_param_groups(resumed)[0], **kw)
    opt_resumed.load_state_dict(saved)
    for x, y in data[8:]:
        for model, opt in ((whole, opt_whole), (resumed, opt_resumed)):
            set_grads(model, batch_grad(model, x, y))
            opt.step()
    assert all(s["cpr_active"] for s in opt_resumed.state.values() if "cpr_active" in s)  # warm start fired at 12
    assert_same(resumed, whole, rtol=0, atol=0)
