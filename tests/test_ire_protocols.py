"""The IRE paper's CIFAR protocol (METHODS.md section 3): IRE from 35% of training by default, the start
searchable as a share of the budget, and Table 1's metric (the best test accuracy over evaluations) beside the
final test accuracy. Unit level: the resolved configs, the optimizer built from them, and a tiny real run."""

from __future__ import annotations

import math

import pytest
import torch

from regtune.data.cifar import write_fake_cifar
from regtune.families.ire import ire_start_step
from regtune.loop import Run
from regtune.methods import get_method, resolve_config
from regtune.results import trial_row
from regtune.space import ConfigError
from studies.spec import cell_configs, check_study, first_config


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one torch thread (and do not fight other processes for the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ire_optimizer(method: str, config: dict):
    c = resolve_config(method, config)
    model = torch.nn.Linear(3, 2)
    return c, get_method(method).build(model, c)[0]


def _study_optimizer(study: str, cell: str, overrides: dict | None = None):
    """The first config of a study's cell (its recipe) and the optimizer it builds."""
    from studies import get_study

    s = get_study(study)
    c = first_config(s, s.cell(cell), "paper", overrides)
    return c, get_method(s.cell(cell).method).build(torch.nn.Linear(3, 2), c)[0]


@pytest.mark.parametrize("method", ["sgd_ire", "sam_ire"])
def test_cifar_ire_starts_at_35_percent_of_the_steps(method):
    c, opt = _study_optimizer("ire_cifar", f"cifar10_resnet56-{method}")  # the IRE paper's Table 1 recipe
    assert c["ire_start"] is None and c["ire_start_frac"] == 0.35
    assert c["steps"] == 200 * 40000 // 128 == 62500  # 200 epochs of the 40000 training images at batch 128
    assert opt.start == ire_start_step(c) == round(0.35 * 62500) == 21875  # epoch 70 of 200
    c, opt = _study_optimizer("ire_cifar", f"cifar100_wrn28_10-{method}", {"steps": 1000})  # follows the budget
    assert opt.start == 350
    c, opt = _ire_optimizer("adamw_ire", {"task": "cifar100_vit_s", "steps": 10, "ire_start_frac": 0.5})
    assert opt.start == 5


def test_absolute_ire_start_still_works_and_both_at_once_is_an_error():
    c, opt = _study_optimizer("ire_cifar", "cifar10_resnet56-sgd_ire", {"ire_start": 123})
    assert opt.start == 123 and c["ire_start_frac"] is None  # the user's step replaces the recipe's share
    _, opt = _ire_optimizer("adamw_ire", {"task": "grokking"})
    assert opt.start == 0  # no setting: IRE from the first step, as before
    _, opt = _ire_optimizer("adamw_ire", {"task": "wikitext103_llama60m"})
    assert opt.start == 0  # a task sets no method's hyperparameter: the paper's start is its study's
    _, opt = _study_optimizer("ire_llama", "wikitext103_llama60m-adamw_ire")
    assert opt.start == 1000  # the recipe's absolute start (end of warmup)
    _, opt = _study_optimizer("ire_llama", "wikitext103_llama60m-adamw_ire", {"ire_start_frac": 0.1})
    assert opt.start == 5000  # a share the user sets replaces the recipe's absolute start
    with pytest.raises(ConfigError, match=r"ire_start=5 and ire_start_frac=0\.2 are both set.*set only one of"):
        resolve_config("sgd_ire", {"task": "cifar10_resnet56", "ire_start": 5, "ire_start_frac": 0.2})
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match=f"ire_start_frac={bad!r} is not allowed"):
            resolve_config("sgd_ire", {"task": "cifar10_resnet56", "ire_start_frac": bad})


def test_ire_cifar_studies_search_the_start_as_a_share_of_the_budget():
    from studies.ire_cifar import STUDY as cifar
    from studies.ire_vit_cifar100 import STUDY as vit

    for study in (cifar, vit):
        for cell in study.cells:
            _, searched = cell_configs(study, cell, "paper")
            assert ("ire_start_frac" in searched) == cell.method.endswith("_ire"), cell.name
            if cell.method.endswith("_ire"):
                assert cell.recipe["ire_start_frac"] == 0.35
                assert searched["ire_start_frac"].low <= 0.35 <= searched["ire_start_frac"].high
    # a fixed absolute start on the command line with the searched share: refused before anything starts
    with pytest.raises(ConfigError, match="both set"):
        check_study(cifar, "smoke", {"ire_start": 2, "ire_start_frac": 0.5})
    # Table 1's metric is the best test accuracy over epochs; Table 3 compares the final one
    assert {c.published["test/accuracy_max"].value for c in cifar.cells if c.method == "sam_ire"} >= {96.70}
    assert all("test/accuracy" in c.published for c in vit.cells)


def test_best_test_accuracy_over_evaluations_is_reported_beside_the_final(tmp_path, one_thread):
    data = write_fake_cifar(tmp_path, "cifar10", n_train=384, n_test=128)
    config = {"task": "cifar10_resnet56", "size": "smoke", "data_dir": str(data), "steps": 6, "eval_every": 1,
              "lr": 0.5, "ire_start_frac": 0.5}
    run = Run("sgd_ire", config)
    assert run.optimizer.start == 3
    reports = list(run.reports())
    assert len(reports) == 6
    accs = [r["test/accuracy"] for r in reports]
    for i, r in enumerate(reports):  # the running maximum of the test accuracy at every report
        assert r["test/accuracy_max"] == pytest.approx(max(accs[: i + 1]))
    assert len(set(accs)) > 1  # the test accuracy moved, so the maximum is not trivially the last value
    row = trial_row({"budget": 6}, config, reports, errored=False)
    assert row["final/test/accuracy"] == pytest.approx(accs[-1])
    assert row["final/test/accuracy_max"] == pytest.approx(max(accs))
    assert "final/test/accuracy_best" in row  # the best-validation checkpoint's test accuracy is still there

    # the maximum survives a resume: a run restored after 3 steps ends with the same maximum
    first = Run("sgd_ire", config)
    it = first.reports()
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    second = Run("sgd_ire", config)
    second.load_state_dict(state)
    tail = list(second.reports())
    assert [r["test/accuracy_max"] for r in head + tail] == pytest.approx([r["test/accuracy_max"] for r in reports])


def test_tasks_without_the_flag_score_the_test_split_only_at_the_end(tmp_path, one_thread):
    data = write_fake_cifar(tmp_path, "cifar10", n_train=384, n_test=128)
    base = {"task": "cifar10_resnet56", "size": "smoke", "data_dir": str(data), "steps": 2, "eval_every": 1}
    reports = list(Run("sgd", {**base, "test_every_eval": False}).reports())
    assert "test/accuracy" not in reports[0] and "test/accuracy_max" not in reports[-1]
    assert math.isfinite(reports[-1]["test/accuracy"])


# --------------------------------------------------------------------------
# the language studies' speed-ups: the paper's quantities
@pytest.mark.parametrize("scale", ["paper", "smoke"])
def test_ire_llama_has_a_2t_adamw_cell_per_task_and_measures_the_speedup_against_it(scale):
    from studies.ire_llama import STUDY

    tasks = ("wikitext103_llama60m", "minipile_llama119m", "openwebtext_llama229m")
    for task in tasks:
        cells = {c.name: c for c in STUDY.cells if c.task == task}
        assert set(cells) == {f"{task}-adamw", f"{task}-adamw-2T", f"{task}-adamw_ire"}
        steps = {}
        for name, c in cells.items():
            steps[name] = first_config(STUDY, c, scale)["steps"]
        t = steps[f"{task}-adamw"]
        assert t == {"paper": {"wikitext103_llama60m": 50_000, "minipile_llama119m": 30_000,
                               "openwebtext_llama229m": 50_000}[task], "smoke": 60}[scale]
        assert steps[f"{task}-adamw_ire"] == t and steps[f"{task}-adamw-2T"] == 2 * t
        ire = cells[f"{task}-adamw_ire"]
        assert ire.speedup_baseline == f"{task}-adamw-2T" and ire.speedup_mode == "baseline_reaches_final"
        assert ire.speedup_metric == "val/loss" and ire.published["speedup"].metric == "speedup"


def test_ire_wikitext2_speedup_is_on_the_training_loss_with_ire_from_step_3000():
    from studies.ire_wikitext2 import STUDY

    ire = STUDY.cell("wikitext2_transformer-adamw_ire")
    assert ire.speedup_metric == "train/loss" and ire.speedup_mode == "reach_baseline_final"
    assert ire.published["speedup"].value == 5.4 and ire.published["train/loss"].value == 2.35
    c = first_config(STUDY, ire, "paper")
    assert c["steps"] == 100_000 and c["ire_start"] == 3000 and c["warmup_steps"] == 3000


def test_check_study_rejects_an_unknown_speedup_mode():
    from studies.spec import Cell, Scale, Study

    cells = (Cell("a", "wikitext2_transformer", "adamw"),
             Cell("b", "wikitext2_transformer", "adamw_ire", speedup_baseline="a", speedup_mode="faster"))
    with pytest.raises(ValueError, match="speedup_mode='faster' is not allowed"):
        check_study(Study("mini", "d", "p", cells, {"smoke": Scale(1, {"size": "smoke"})}), "smoke")


def test_paper_size_trains_200_epochs_of_the_training_set_it_uses():
    c = resolve_config("sgd", {"task": "cifar100_resnet56"})
    assert c["epochs"] == 200 and c["n_train"] == 40000 and c["steps"] == 62500
    full = resolve_config("sgd_ire", {"task": "cifar10_wrn28_10", "n_train": 50000, "n_val": 1, "ire_start_frac": 0.35})
    assert full["steps"] == 200 * 50000 // 128 == 78125  # all 50000 images (the reference's training set)
    assert ire_start_step(full) == round(0.35 * 78125)  # IRE's start (the study's share) follows the budget
    assert resolve_config("adamw", {"task": "cifar100_vit_t", "batch_size": 100, "epochs": 3})["steps"] == 1200
    assert resolve_config("sgd", {"task": "cifar10_resnet56", "steps": 7})["steps"] == 7  # steps set: it wins
    assert resolve_config("sgd", {"task": "cifar10_resnet56", "size": "smoke"})["steps"] == 4
