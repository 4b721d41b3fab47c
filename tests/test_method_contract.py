"""The contract every registered method keeps, parametrized over the registry (registering a method tests it):
two steps on a tiny task move the weights with a finite loss; a checkpoint taken mid-run and loaded into a
fresh run continues exactly as the uninterrupted run; an unknown key is rejected with its name, and so is a
key of a part the method is not made of; a composed method's hyperparameters and search space are its parts'
union; the regularized / free parameter split is explicit, logged and complete, and the regularization
(weight decay, the CPR / rescaling flag) lands on the regularized tensors only."""

from __future__ import annotations

import io

import pytest
import torch

from regtune import parts as P
from regtune.loop import Run
from regtune.methods import LOOP_HPARAMS, get_method, method_names
from regtune.reference import REFERENCE_KEY, needs_reference
from regtune.space import ConfigError
from regtune.tasks.base import get_task

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


PARTS = {**P.BASES, **P.WRAPPERS, **P.ESTIMATORS, **P.TRANSFORMS}
ALL_PART_KEYS = {h.name: h for make in PARTS.values() for h in make().hparams}


@pytest.mark.parametrize("method", method_names())
def test_a_composed_method_has_exactly_its_parts_hyperparameters(method):
    m = get_method(method)
    assert m.parts, f"{method}: every built-in method is composed from parts (regtune.parts)"
    made = [PARTS[name]() for name in m.parts]
    assert set(m.hparam_map) == {h.name for p in made for h in p.hparams}
    assert set(m.space) == {k for p in made for k in p.space}
    for key, domain in m.space.items():  # each range is the one its part declares
        assert domain == next(p.space[key] for p in reversed(made) if key in p.space), key


@pytest.mark.parametrize("method", method_names())
def test_a_key_of_a_part_it_lacks_is_rejected(method):
    own = set(get_method(method).hparam_map) | {h.name for h in LOOP_HPARAMS} | set(get_task(TINY["task"]).hparam_map)
    foreign = sorted(set(ALL_PART_KEYS) - own)
    assert foreign
    for key in foreign:
        with pytest.raises(ConfigError, match=f"unknown hyperparameter '{key}'"):
            Run(method, {**TINY, "steps": 2, key: ALL_PART_KEYS[key].default})


@pytest.mark.parametrize("method", method_names())
def test_regularization_lands_on_the_regularized_tensors(method):
    hp = get_method(method).hparam_map
    extra = {"weight_decay": 0.25} if "weight_decay" in hp else {}
    run = _run(method, steps=2, **extra)
    for g in run.optimizer.param_groups:
        matrices = all(p.ndim >= 2 for p in g["params"])
        if "weight_decay" in hp:
            assert g["weight_decay"] == (0.25 if matrices else 0.0), (method, g["weight_decay"])
        if "kappa_init_method" in hp or "rescale_alpha" in hp:  # CPR / rescaling act where the flag is set
            assert g["regularize"] == matrices, method
