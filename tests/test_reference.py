"""External grafting's reference from a study's stored results (regtune.reference), and the trial's device
and GPU memory share from its resources (trainables.trial_device). Hand-made Parquet tables, no Ray."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from regtune.data.cifar import write_fake_cifar
from regtune.loop import Run
from regtune.microbatch import REFERENCE_KEY, reference_norm
from regtune.reference import ReferenceMissing, best_completed_trial, load_reference_norms, step_inputs
from trainables import trial_device

SGD = "cifar10_resnet18-sgd"


def _trial(trial_id: str, status: str, acc: float, cell: str = SGD) -> dict:
    return {"cell": cell, "trial_id": trial_id, "status": status, "metric": "val/accuracy", "mode": "max",
            "final/val/accuracy": acc, "steps": 60 if status == "completed" else 20}


def _curve(trial_id: str, norms: list[float], cell: str = SGD, every: int = 20) -> list[dict]:
    return [{"cell": cell, "trial_id": trial_id, "step": every * (i + 1), "grad/full_norm": n,
             "val/accuracy": 0.1} for i, n in enumerate(norms)]


@pytest.fixture
def study_dir(tmp_path):
    """A study dir as the driver leaves it after the sgd cell (and another cell) ran: trials + curves."""
    trials = pd.DataFrame([
        _trial("a", "completed", 0.50),
        _trial("b", "completed", 0.70),  # the best completed trial: the reference
        _trial("c", "stopped", 0.90),  # better, but stopped early by ASHA: never the reference
        _trial("d", "error", math.nan),
        _trial("x", "completed", 0.99, cell="cifar10_resnet18-pseudo_gd"),
    ])
    curves = pd.DataFrame(
        _curve("a", [9.0, 9.5, 9.9]) + _curve("b", [1.5, 2.5, 3.5]) + _curve("c", [7.0])
        + [{"cell": "cifar10_resnet18-pseudo_gd", "trial_id": "x", "step": 20, "val/accuracy": 0.99}])  # no norm
    trials.to_parquet(tmp_path / "trials.parquet", index=False)
    curves.to_parquet(tmp_path / "curves.parquet", index=False)
    return tmp_path


def test_reference_is_the_best_completed_trials_norm_curve_keyed_by_block_start(study_dir):
    norms = load_reference_norms(study_dir, SGD)
    # each report averages the 20 steps before it, so it is keyed by the start of that block
    assert norms == {0: 1.5, 20: 2.5, 40: 3.5}
    assert [reference_norm(norms, s) for s in (0, 19, 20, 39, 40, 59, 100)] == [1.5, 1.5, 2.5, 2.5, 3.5, 3.5, 3.5]
    assert best_completed_trial(pd.read_parquet(study_dir / "trials.parquet"), SGD)["trial_id"] == "b"


def test_reference_follows_the_metric_mode(study_dir):
    trials = pd.read_parquet(study_dir / "trials.parquet")
    trials["mode"] = "min"  # e.g. a loss metric: the lowest final value wins
    trials.to_parquet(study_dir / "trials.parquet", index=False)
    assert load_reference_norms(study_dir, SGD) == {0: 9.0, 20: 9.5, 40: 9.9}


def test_missing_reference_is_a_clear_error_naming_the_cell_and_the_study_dir(study_dir, tmp_path_factory):
    with pytest.raises(ReferenceMissing, match=r"no trials of reference cell 'cifar100_vgg16-sgd' in study dir"):
        load_reference_norms(study_dir, "cifar100_vgg16-sgd")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ReferenceMissing, match=rf"{SGD}.*{empty}.*missing trials.parquet, curves.parquet"):
        load_reference_norms(empty, SGD)
    with pytest.raises(ReferenceMissing, match="no 'grad/full_norm' curve"):
        load_reference_norms(study_dir, "cifar10_resnet18-pseudo_gd")
    trials = pd.read_parquet(study_dir / "trials.parquet")
    trials.loc[trials["cell"] == SGD, "status"] = "stopped"
    trials.to_parquet(study_dir / "trials.parquet", index=False)
    with pytest.raises(ReferenceMissing, match="no completed trial of reference cell"):
        load_reference_norms(study_dir, SGD)


def test_step_inputs_read_the_first_needed_cell_for_exter_graft_only(study_dir):
    extras = {"study_dir": str(study_dir), "cell": "cifar10_resnet18-exter_graft", "needs": [SGD]}
    assert step_inputs("exter_graft", extras) == {REFERENCE_KEY: {0: 1.5, 20: 2.5, 40: 3.5}}
    for method in ("sgd", "iter_graft", "ngd", "adamcpr"):
        assert step_inputs(method, extras) == {}
    assert step_inputs("exter_graft", {REFERENCE_KEY: {0: 1.0}}) == {}  # given directly: nothing to read
    with pytest.raises(ValueError, match=r"exter_graft needs a reference small-batch sgd run.*needs="):
        step_inputs("exter_graft", {"study_dir": str(study_dir), "needs": []})
    with pytest.raises(ReferenceMissing, match="cifar10_vgg16-sgd"):
        step_inputs("exter_graft", {**extras, "needs": ["cifar10_vgg16-sgd"]})


def test_a_run_grafts_the_stored_reference_norm(study_dir, tmp_path):
    """The mapping load_reference_norms builds is what the exter_graft step consumes."""
    write_fake_cifar(tmp_path / "data", "cifar10", n_train=384, n_test=128)
    config = {"task": "cifar10_resnet18", "size": "smoke", "data_dir": str(tmp_path / "data"), "steps": 2,
              "eval_every": 2}
    run = Run("exter_graft", config)
    run.ctx.extras.update(step_inputs("exter_graft", {"study_dir": str(study_dir), "needs": [SGD]}))
    (report,) = list(run.reports())
    assert report["grad/graft_norm"] == pytest.approx(1.5)
    assert math.isfinite(report["train/loss"]) and report["grad/full_norm"] != pytest.approx(1.5)


@pytest.mark.parametrize("requested,gpus,cuda,want", [
    ("auto", 0.25, True, ("cuda", 0.25)),  # a quarter GPU: CUDA, a quarter of its memory
    ("auto", 1, True, ("cuda", None)),  # a whole GPU: no cap
    ("auto", 2, True, ("cuda", None)),
    ("auto", 0, True, ("cpu", None)),  # the machine has CUDA but the trial got no GPU
    ("auto", 0.5, False, ("cpu", None)),  # asked for a GPU where CUDA does not work
    ("cpu", 0.25, True, ("cpu", None)),  # an explicit device wins
    ("cuda", 0.5, True, ("cuda", 0.5)),
])
def test_trial_device_follows_the_trials_resources(requested, gpus, cuda, want):
    assert trial_device(requested, gpus, cuda) == want
