"""The grokking task as METHODS.md describes it, and the Ray-free loop: config
validation, determinism, checkpoint/resume, divergence sentinel, schedules."""

import io
import math

import pytest
import torch
from torch import nn

from regtune.loop import Run, lr_multiplier
from regtune.methods import resolve_config
from regtune.space import ConfigError
from regtune.tasks.grokking import GrokkingTransformer, modular_addition_split

SMOKE = {"task": "grokking", "size": "smoke", "steps": 60, "eval_every": 20}


def test_grokking_data_split():
    (inputs, labels), n_train = modular_addition_split(113, 0.3)
    assert inputs.shape == (12769, 3) and n_train == round(0.3 * 12769)
    assert torch.all(inputs[:, 2] == 113)
    assert torch.equal(labels, (inputs[:, 0] + inputs[:, 1]) % 113)
    assert len({tuple(r) for r in inputs.tolist()}) == 12769  # every pair once
    (inputs2, _), _ = modular_addition_split(113, 0.3)
    assert torch.equal(inputs, inputs2)  # split seed fixed, independent of the run seed


def test_grokking_model_matches_description():
    torch.manual_seed(0)
    m = GrokkingTransformer(114, 128, 4, 512)
    assert not any(isinstance(x, nn.LayerNorm) for x in m.modules())
    assert m.qkv.bias is None and m.out.bias is None and m.unembed.bias is None
    assert m.mlp_in.weight.shape == (512, 128) and m.mlp_out.weight.shape == (128, 512)
    assert m.unembed.weight.shape == (113, 128)
    for name, p in m.named_parameters():
        if p.ndim >= 2:
            assert abs(float(p.detach().std()) - 1 / math.sqrt(128)) < 0.01, name
        else:
            assert torch.count_nonzero(p) == 0, name
    # causal: the logits at the last position depend on every input, earlier positions do not see later ones
    x = torch.tensor([[3, 5, 113]])
    assert m(x).shape == (1, 113)


def test_paper_settings_resolve():
    """The CPR paper's grokking settings are the study's recipes (each cell's first config), not the task's."""
    from studies import get_study
    from studies.spec import first_config

    study = get_study("cpr_grokking")
    c = first_config(study, study.cell("adamcpr"), "paper")
    assert (c["lr"], tuple(c["betas"]), c["batch_size"], c["steps"]) == (1e-3, (0.9, 0.98), 512, 8000)
    assert (c["kappa_init_method"], c["kappa_init_param"], c["regularize_embedding"]) == ("dependent", 0.8, True)
    assert first_config(study, study.cell("adamw"), "paper")["weight_decay"] == 0.1
    assert first_config(study, study.cell("adam_rescale"), "paper")["rescale_alpha"] == 0.8
    assert resolve_config("adamcpr", {"task": "grokking"})["betas"] != (0.9, 0.98)  # the task alone: generic


@pytest.mark.parametrize("bad,message", [
    ({"kapa_init_param": 1.0}, "did you mean 'kappa_init_param'"),
    ({"lr": 0.0}, "lr=0.0 is not allowed"),
    ({"kappa_init_method": "magic"}, "kappa_init_method='magic' is not allowed"),
    ({"steps": -1}, "steps=-1 is not allowed"),
    ({"size": "huge"}, "size='huge' is not allowed"),
])
def test_run_rejects_bad_config(bad, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Run("adamcpr", {**SMOKE, **bad})


def _reports(run):
    return [r for r in run.reports()]


@pytest.mark.parametrize("method", ["adamw", "adam_rescale", "adamcpr"])
def test_resume_from_checkpoint_equals_uninterrupted(method):
    torch.set_num_threads(1)
    full = _reports(Run(method, SMOKE))
    first = Run(method, SMOKE)
    it = first.reports()
    head = [next(it), next(it)]  # 40 steps
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = Run(method, SMOKE)
    second.load_state_dict(torch.load(buf, weights_only=True))
    tail = _reports(second)
    assert [r["step"] for r in head + tail] == [20, 40, 60]
    for a, b in zip(full, head + tail):
        for k in ("train/loss", "val/loss", "val/accuracy"):
            assert a[k] == b[k], (k, a[k], b[k])


def test_same_seed_same_run_other_seed_other_run():
    a, b = _reports(Run("adamcpr", SMOKE)), _reports(Run("adamcpr", SMOKE))
    c = _reports(Run("adamcpr", {**SMOKE, "seed": 1}))
    assert a[-1]["val/loss"] == b[-1]["val/loss"]
    assert a[-1]["val/loss"] != c[-1]["val/loss"]


def test_divergence_reports_a_finite_sentinel_and_stops():
    reports = _reports(Run("sgd", {**SMOKE, "lr": 1e12}))
    last = reports[-1]
    assert last["diverged"] == 1.0 and last["step"] < SMOKE["steps"]
    assert all(math.isfinite(v) for v in last.values() if isinstance(v, float))
    assert last["val/accuracy"] == 0.0


def test_reports_every_eval_every_with_required_keys():
    reports = _reports(Run("adamw", SMOKE))
    assert [r["step"] for r in reports] == [20, 40, 60]
    for key in ("step", "train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        assert all(key in r for r in reports)


def test_warmup_cosine_schedule():
    f = lr_multiplier({"steps": 110, "warmup_steps": 10, "lr_min_ratio": 0.1, "lr_schedule": "warmup_cosine"})
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)


@pytest.mark.parametrize("method", ["adamw", "sam", "adamcpr"])
def test_gradient_accumulation_takes_the_same_step(method):
    """accum_steps = k runs the batch in k chunks: same gradient, so (to round-off) the same trajectory."""
    cfg = {**SMOKE, "steps": 6, "eval_every": 3}
    one = Run(method, cfg)
    four = Run(method, {**cfg, "accum_steps": 4})
    a, b = _reports(one), _reports(four)
    assert a[-1]["train/loss"] == pytest.approx(b[-1]["train/loss"], rel=1e-5)
    for p, q in zip(one.model.parameters(), four.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    three = Run(method, {**cfg, "accum_steps": 3, "lr": 2e-3})  # and it can fail: another lr moves elsewhere
    _reports(three)
    assert any(not torch.allclose(p, q, atol=1e-6) for p, q in zip(one.model.parameters(), three.model.parameters()))
