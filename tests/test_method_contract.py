"""The contract every registered method keeps, parametrized over the registry (registering a method tests it):
two steps on a tiny task move the weights with a finite loss; a checkpoint taken mid-run and loaded into a
fresh run continues exactly as the uninterrupted run; an unknown key is rejected with its name; the
regularized / free parameter split is explicit, logged and complete."""

from __future__ import annotations

import io

import pytest
import torch

from regtune.loop import Run
from regtune.methods import get_method, method_names
from regtune.reference import REFERENCE_KEY, needs_reference
from regtune.space import ConfigError

torch.set_num_threads(1)
TINY = {"task": "grokking", "size": "smoke", "eval_every": 2, "seed": 5}


def _run(method: str, **config) -> Run:
    run = Run(method, {**TINY, **config})
    if needs_reference(method):  # external grafting reads a reference run's per-step gradient norms
        run.ctx.extras[REFERENCE_KEY] = {0: 1.0, 20: 0.5}
    return run


def _params(run: Run) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.model.parameters()]


@pytest.mark.parametrize("method", method_names())
def test_two_steps_move_the_weights_with_a_finite_loss(method):
    run = _run(method, steps=2)
    before = _params(run)
    (report,) = list(run.reports())
    assert report["step"] == 2 and report["diverged"] == 0.0
    assert torch.isfinite(torch.tensor(report["train/loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(run)))


@pytest.mark.parametrize("method", method_names())
def test_checkpoint_round_trip_continues_exactly(method):
    whole = _run(method, steps=4)
    list(whole.reports())
    first = _run(method, steps=4)
    reports = first.reports()
    next(reports)  # steps 1-2, then a checkpoint as the trainable saves it
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = _run(method, steps=4)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    list(resumed.reports())
    assert resumed.step == whole.step == 4
    for a, b in zip(_params(resumed), _params(whole)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", method_names())
def test_an_unknown_key_is_rejected_by_name(method):
    with pytest.raises(ConfigError, match="'lr_warmpu'"):
        Run(method, {**TINY, "steps": 2, "lr_warmpu": 3})


@pytest.mark.parametrize("method", method_names())
def test_regularized_and_free_parameters_are_explicit_and_complete(method):
    run = _run(method, steps=2)
    n = sum(1 for p in run.model.parameters() if p.requires_grad)
    summary = run.param_summary  # what the loop logs: the split, or that nothing is regularized
    assert ("regularized" in summary and "free" in summary) or (f"on {n} tensors" in summary and "no decay" in summary), summary
    model_params = {id(p) for p in run.model.parameters() if p.requires_grad}
    grouped = [id(p) for g in run.optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(model_params), f"{method}: every trainable tensor in exactly one group"
    for g in run.optimizer.param_groups:  # free tensors (biases, norms: 1-D) never decay or get constrained
        if any(p.ndim < 2 for p in g["params"]):
            assert g.get("weight_decay", 0.0) == 0.0 and not g.get("regularize", False), (method, g.keys())
    assert get_method(method).family
