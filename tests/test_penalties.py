"""Micro-batch penalties (regtune.penalties) and their use in the micro-batch step.

Each penalty's step direction is checked against a brute-force reference
written here: an explicit loop over micro-batches with
``torch.autograd.grad(create_graph=True)``; the double-backward gradient of
R_k is also checked against central finite differences; the linear-model case
is derived by hand.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regtune.microbatch import microbatch_step
from regtune.penalties import PENALTIES, penalty, sample_labels, unit_direction
from regtune.step import StepContext

torch.set_num_threads(1)
C = 5


class Tiny(nn.Module):
    """conv -> BatchNorm -> tanh -> avg-pool -> linear: smooth, with per-batch statistics."""

    def __init__(self, bn: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc = nn.Linear(4 * 4 * 4, C)

    def forward(self, x):
        return self.fc(F.avg_pool2d(torch.tanh(self.bn(self.conv(x))), 2).flatten(1))


class StubTask:
    num_classes = C

    def forward(self, model, x):
        return model(x)

    def criterion(self, logits, y):
        return F.cross_entropy(logits, y)


def data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)


def make_model(seed: int = 0, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny(bn).double().train()


def library_direction(model, x, y, m, kind, lam, seed, step=1):
    """The direction microbatch_step leaves in p.grad (lr = 0 keeps the weights)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctx = StepContext(model, opt, StubTask(), {"micro_batch_size": m, "reg_lambda": lam}, torch.device("cpu"),
                      step=step, generator=torch.Generator().manual_seed(seed))
    metrics = microbatch_step(ctx, (x, y), penalty_kind=kind)
    return [p.grad.clone() for p in model.parameters()], metrics


def brute_force(model, x, y, m, kind, lam, seed):
    """(1/K) sum_k grad[L_k + lam R_k], R_k = ||grad X_k||^2, written out; plus mean R_k and mean ||grad L_k||^2."""
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    k_count = math.ceil(x.shape[0] / m)
    total = [torch.zeros_like(p) for p in params]
    regs, micro = [], []
    for k in range(k_count):
        xb, yb = x[k * m:(k + 1) * m], y[k * m:(k + 1) * m]
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        micro.append(sum((g ** 2).sum() for g in torch.autograd.grad(loss, params, retain_graph=True)))
        if kind is None:
            objective = loss
        else:
            if kind == "grad_norm":
                target = loss
            elif kind == "fisher_trace":
                target = F.cross_entropy(logits, sample_labels(logits, gen))
            elif kind == "avg_jacobian":
                target = logits.mean(0).sum()
            else:  # unit_jacobian: a normalized Gaussian direction, fresh per micro-batch
                u = torch.randn(C, generator=gen, dtype=torch.float64)
                target = logits.mean(0) @ (u / u.norm())
            g_x = torch.autograd.grad(target, params, create_graph=True)
            reg = sum((g ** 2).sum() for g in g_x)
            regs.append(float(reg.detach()))
            objective = loss + lam * reg
        for t, g in zip(total, torch.autograd.grad(objective, params, materialize_grads=True)):
            t += g / k_count
    return total, (sum(regs) / len(regs) if regs else 0.0), float(sum(micro) / len(micro))


def rel_err(a, b) -> float:
    num = max(float((u - v).abs().max()) for u, v in zip(a, b))
    return num / max(float(v.abs().max()) for v in b)


@pytest.mark.parametrize("kind", (None,) + PENALTIES)
@pytest.mark.parametrize("n,m,step", [(12, 4, 1), (10, 4, 0), (8, 8, 3)])
def test_direction_matches_brute_force(kind, n, m, step):
    x, y = data(n)
    model = make_model()
    ref_model = copy.deepcopy(model)
    lam = 0.3
    got, metrics = library_direction(model, x, y, m, kind, lam, seed=11, step=step)
    want, want_reg, want_micro = brute_force(ref_model, x, y, m, kind, lam, seed=11)
    assert rel_err(got, want) < 1e-5
    if kind is not None:  # the penalty really moves the direction
        plain, _, _ = brute_force(copy.deepcopy(ref_model), x, y, m, None, lam, seed=11)
        assert rel_err(plain, want) > 1e-3
    assert metrics["reg/value"] == pytest.approx(want_reg, rel=1e-6)
    # step 0 measures the data-gradient norm for every method; other steps skip it for the costly penalties
    if "grad/micro_norm" in metrics:
        assert metrics["grad/micro_norm"] == pytest.approx(want_micro, rel=1e-6)
    assert ("grad/micro_norm" in metrics) == (kind in (None, "grad_norm") or step % 20 == 0)


def test_unit_jacobian_with_fixed_direction():
    x, y = data(6)
    model = make_model()
    params = list(model.parameters())
    u = torch.tensor([0.6, 0.0, -0.8, 0.0, 0.0], dtype=torch.float64)
    logits = model(x)
    reg, _ = penalty("unit_jacobian", logits, F.cross_entropy(logits, y), params, direction=u)
    got = torch.autograd.grad(reg, params, materialize_grads=True)
    logits = model(x)
    # X = mean_i u . f(x_i), written out per example
    target = sum((logits[i] * u).sum() for i in range(6)) / 6
    g_x = torch.autograd.grad(target, params, create_graph=True)
    want_reg = sum((g ** 2).sum() for g in g_x)
    want = torch.autograd.grad(want_reg, params, materialize_grads=True)
    assert float(reg.detach()) == pytest.approx(float(want_reg.detach()), rel=1e-10)
    assert rel_err(got, want) < 1e-8


def test_fisher_trace_with_fixed_sampling_seed():
    x, y = data(8)
    model = make_model()
    params = list(model.parameters())
    logits = model(x)
    reg_a, _ = penalty("fisher_trace", logits, F.cross_entropy(logits, y), params, torch.Generator().manual_seed(5))
    y_hat = sample_labels(logits, torch.Generator().manual_seed(5))
    g_x = torch.autograd.grad(F.cross_entropy(logits, y_hat), params, create_graph=True)
    want = sum((g ** 2).sum() for g in g_x)
    assert float(reg_a.detach()) == pytest.approx(float(want.detach()), rel=1e-10)
    reg_b, _ = penalty("fisher_trace", logits, F.cross_entropy(logits, y), params, torch.Generator().manual_seed(5))
    assert float(reg_a.detach()) == float(reg_b.detach())  # same seed, same labels


@pytest.mark.parametrize("kind", PENALTIES)
def test_double_backward_matches_finite_differences(kind):
    """<grad R, v> against (R(theta + eps v) - R(theta - eps v)) / 2 eps, with the random draws held fixed."""
    x, y = data(6, seed=3)
    model = make_model(seed=4)
    params = list(model.parameters())
    logits = model(x)
    y_hat = sample_labels(logits, torch.Generator().manual_seed(2))
    u = unit_direction(C, torch.Generator().manual_seed(2), dtype=torch.float64)

    def reg_value():
        out = model(x)
        loss = F.cross_entropy(out, y)
        target = {"grad_norm": loss, "fisher_trace": F.cross_entropy(out, y_hat),
                  "avg_jacobian": out.mean(0).sum(), "unit_jacobian": out.mean(0) @ u}[kind]
        return sum((g ** 2).sum() for g in torch.autograd.grad(target, params, create_graph=True))

    out = model(x)
    if kind == "fisher_trace":
        reg = sum((g ** 2).sum() for g in torch.autograd.grad(F.cross_entropy(out, y_hat), params, create_graph=True))
    else:
        reg, _ = penalty(kind, out, F.cross_entropy(out, y), params, direction=u)
    grad = torch.autograd.grad(reg, params, materialize_grads=True)
    gen = torch.Generator().manual_seed(9)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    eps = 1e-5
    with torch.no_grad():
        for p, d in zip(params, v):
            p += eps * d
    plus = float(reg_value().detach())
    with torch.no_grad():
        for p, d in zip(params, v):
            p -= 2 * eps * d
    minus = float(reg_value().detach())
    fd = (plus - minus) / (2 * eps)
    analytic = float(sum((g * d).sum() for g, d in zip(grad, v)))
    assert analytic == pytest.approx(fd, rel=1e-5)


@pytest.mark.parametrize("kind", ["avg_jacobian", "unit_jacobian"])
@pytest.mark.parametrize("step", [0, 1])
def test_jacobian_penalties_of_a_linear_model(kind, step):
    """f(x) = W x: grad_W X_k = a xbar_k^T (a = 1 or u), so R_k = |a|^2 |xbar_k|^2, constant in W (hand-derived):
    the step direction is pseudo_gd's and reg/value is the mean of |a|^2 |xbar_k|^2."""
    torch.manual_seed(0)
    model = nn.Linear(7, C, bias=False).double()
    x = torch.randn(9, 7, dtype=torch.float64)
    y = torch.randint(0, C, (9,))
    got, metrics = library_direction(model, x, y, 3, kind, 0.7, seed=1, step=step)
    plain, _ = library_direction(model, x, y, 3, None, 0.7, seed=1, step=step)
    assert rel_err(got, plain) < 1e-12
    a_sq = C if kind == "avg_jacobian" else 1.0
    want = sum(a_sq * float(x[k * 3:(k + 1) * 3].mean(0).pow(2).sum()) for k in range(3)) / 3
    assert metrics["reg/value"] == pytest.approx(want, rel=1e-12)


def test_sample_labels_follow_the_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]]).repeat(40000, 1)
    labels = sample_labels(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(labels, minlength=4).double() / labels.numel()
    assert torch.allclose(freq, torch.softmax(logits[0].double(), 0), atol=0.01)
    again = sample_labels(logits, torch.Generator().manual_seed(0))
    assert torch.equal(labels, again)
    assert not labels.requires_grad


def test_unit_direction_is_a_fresh_unit_vector():
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([unit_direction(C, gen, dtype=torch.float64) for _ in range(4000)])
    assert torch.allclose(draws.norm(dim=1), torch.ones(4000, dtype=torch.float64))
    assert not torch.allclose(draws[0], draws[1])
    assert float(draws.mean(0).abs().max()) < 0.05  # isotropic: no preferred direction


def test_unknown_penalty_is_an_error():
    logits = torch.zeros(2, C, requires_grad=True)
    with pytest.raises(ValueError, match="unknown penalty"):
        penalty("trace", logits, logits.sum(), [logits])


class TinyAttention(nn.Module):
    """Embedding -> one causal self-attention head (``F.scaled_dot_product_attention``, or the same function
    written out) -> linear head on the last position, as in the grokking transformer."""

    def __init__(self, explicit: bool = False, vocab: int = 7, dim: int = 8):
        super().__init__()
        self.explicit = explicit
        self.emb = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.head = nn.Linear(dim, C, bias=False)

    def forward(self, tokens):
        q, k, v = self.qkv(self.emb(tokens)).unsqueeze(1).chunk(3, dim=-1)  # [batch, 1 head, seq, dim]
        if self.explicit:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
            att = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        else:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(att[:, 0, -1])


@pytest.mark.parametrize("kind", PENALTIES)
def test_penalties_differentiate_through_fused_attention(kind):
    """The fused attention kernels have no double backward: the penalized step runs the math kernel and
    matches the brute force on the same function written out."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 7, (8, 3), generator=g), torch.randint(0, C, (8,), generator=g)
    torch.manual_seed(0)
    model = TinyAttention().double()
    ref_model = TinyAttention(explicit=True).double()
    ref_model.load_state_dict(model.state_dict())
    got, metrics = library_direction(model, x, y, 4, kind, 0.3, seed=11)
    want, want_reg, _ = brute_force(ref_model, x, y, 4, kind, 0.3, seed=11)
    assert rel_err(got, want) < 1e-6
    assert metrics["reg/value"] == pytest.approx(want_reg, rel=1e-6)
