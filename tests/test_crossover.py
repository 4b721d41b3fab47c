"""The crossover study: its cells at each scale, the grouped comparison table computed by hand, and the smoke
study end to end (real local Ray, Optuna, sqlite MLflow) with every family and composition confirmed."""

import math
import re
import statistics

import pandas as pd
import pytest

from regtune.methods import method_names
from regtune.report_compare import comparison_table
from studies import get_study
from studies.spec import at_scale, check_study
from tests.conftest import run_smoke_study

FAMILIES = {  # STUDIES.md, "Crossover": every family of the three papers, then the compositions
    "CPR (Franke et al.)": {"adamw", "adam_rescale", "adamcpr"},
    "implicit SGD (Novack et al.)": {"sgd", "pseudo_gd", "grad_norm", "adamw_gn"},
    "IRE / SAM (Wang et al.)": {"sam_adamw", "adamw_ire", "sam_adamw_ire"},
    "compositions": {"adamcpr_ire", "sam_adamcpr", "adamcpr_gn"},
}


def test_cells_per_scale_and_every_method_registered():
    study = get_study("crossover")
    methods = set().union(*FAMILIES.values())
    assert methods <= set(method_names())
    for scale, task in (("laptop", "grokking"), ("smoke", "grokking"), ("paper", "cifar100_resnet18_cpr")):
        st = at_scale(study, scale)
        assert {c.task for c in st.cells} == {task}, scale
        assert {c.method for c in st.cells} == methods, scale
        assert {c.group for c in st.cells} == set(FAMILIES), scale
        for c in st.cells:
            assert c.method in FAMILIES[c.group], (scale, c.name)
        check_study(st, scale)  # every point and range corner resolves for its method and task


def _trials() -> pd.DataFrame:
    """Two cells of one group and one of another, with confirm rows, by hand."""
    rows = []

    def add(cell, idx, method, group, phase, tid, acc, thr, seconds, steps=100, confirms=None, lr=1e-3):
        rows.append({"cell": cell, "cell_index": idx, "method": method, "group": group, "phase": phase,
                     "trial_id": tid, "metric": "val/accuracy", "mode": "max", "final/val/accuracy": acc,
                     "steps_to_threshold": thr, "threshold": "val/accuracy >= 0.95", "seconds": seconds,
                     "steps": steps, "full_budget": steps == 100, "confirms": confirms, "config/lr": lr,
                     "searched": '["lr"]', "status": "completed"})

    add("adamw", 0, "adamw", "A", "search", "s0", 0.5, math.nan, 10.0)
    add("adamw", 0, "adamw", "A", "search", "s1", 0.6, math.nan, 12.0, lr=2e-3)
    add("adamw", 0, "adamw", "A", "confirm", "c0", 0.62, math.nan, 11.0, confirms="s1", lr=2e-3)
    add("adamw", 0, "adamw", "A", "confirm", "c1", 0.58, math.nan, 11.0, confirms="s1", lr=2e-3)
    add("cpr", 1, "adamcpr", "A", "search", "s2", 0.99, 40.0, 15.0)
    add("cpr", 1, "adamcpr", "A", "confirm", "c2", 0.98, 50.0, 16.0, confirms="s2")
    add("cpr", 1, "adamcpr", "A", "confirm", "c3", 0.97, 70.0, 17.0, confirms="s2")
    add("cpr", 1, "adamcpr", "A", "confirm", "c4", 0.40, math.nan, 16.0, confirms="s2")
    add("sam", 2, "sam", "B", "search", "s3", 0.7, math.nan, 24.0, steps=30)  # stopped early
    add("sam", 2, "sam", "B", "search", "s4", 0.9, 90.0, 44.0)
    add("sam", 2, "sam", "B", "confirm", "c5", 0.8, math.nan, 46.0, confirms="s4")
    add("sam", 2, "sam", "B", "confirm", "c6", 0.9, 80.0, 46.0, confirms="s4")
    return pd.DataFrame(rows)


def test_comparison_table_by_hand():
    t = _trials()
    lines = comparison_table(t).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:2] == ["group", "cell"] and "cost / step vs adamw" in head
    lines = lines[2:]
    by_cell = {ln.split("|")[2].strip(): [c.strip() for c in ln.strip("|").split("|")] for ln in lines}
    assert [ln.split("|")[1].strip() for ln in lines] == ["A", "A", "B"]  # grouped, cell order kept
    acc = head.index("val/accuracy (%): mean ± std")
    steps, reached = head.index("steps to val/accuracy >= 0.95: mean ± std"), head.index("reached")
    cost, cfg = head.index("cost / step vs adamw"), head.index("confirmed config")
    assert by_cell["adamw"][acc] == f"60.00 ± {statistics.stdev([62.0, 58.0]):.2f}"
    assert by_cell["adamw"][steps] == "never" and by_cell["adamw"][reached] == "0/2"
    assert by_cell["adamw"][cfg] == "lr=0.002"
    cpr = [98.0, 97.0, 40.0]
    assert by_cell["cpr"][acc] == f"{statistics.mean(cpr):.2f} ± {statistics.stdev(cpr):.2f}"
    assert by_cell["cpr"][steps] == f"60 ± {statistics.stdev([50.0, 70.0]):.0f}" and by_cell["cpr"][reached] == "2/3"
    ref = statistics.mean([10 / 100, 12 / 100, 11 / 100, 11 / 100])  # every adamw run, seconds per step
    assert by_cell["cpr"][cost] == f"{statistics.mean([0.15, 0.16, 0.17, 0.16]) / ref:.2f}x"
    assert by_cell["sam"][cost] == f"{statistics.mean([24 / 30, 0.44, 0.46, 0.46]) / ref:.2f}x"
    assert by_cell["sam"][steps] == "80" and by_cell["sam"][reached] == "1/2"


def test_no_group_no_table():
    t = _trials().drop(columns="group")
    assert comparison_table(t) == ""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return run_smoke_study(tmp_path_factory, "crossover")


def test_smoke_study_reports_every_family_and_composition(smoke):
    sdir, trials, _ = smoke
    methods = set().union(*FAMILIES.values())
    assert set(trials["method"]) == methods
    conf = trials[trials["phase"] == "confirm"]
    assert (conf.groupby("cell").size() == 2).all() and set(conf["method"]) == methods  # smoke: 2 confirm seeds
    md = (sdir / "report" / "report.md").read_text()
    block = md.split("## Comparison: confirmed mean ± std per cell\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("| ") and not ln.startswith("| group")]
    seen = {}
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        seen[cells[1]] = cells
        assert cells[1] in FAMILIES[cells[0]]
        assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", cells[2]), cells  # mean ± std over the 2 confirm seeds
        assert cells[3] == "2"
        assert re.fullmatch(r"\d+\.\d\dx", cells[-2]), cells  # cost per step vs adamw
    assert set(seen) == methods
    assert seen["adamw"][-2] == "1.00x"
    groups = [ln.split("|")[1].strip() for ln in lines]
    assert groups == sorted(groups, key=list(FAMILIES).index)  # grouped by paper, compositions last
