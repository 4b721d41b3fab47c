"""End to end, at smoke scale, on real local Ray, Optuna and a real sqlite MLflow store: the implicit-SGD
studies (implicit_main, implicit_large_micro, implicit_micro_sweep, implicit_grafting) and cpr_cifar100.

Each study runs once through the CLI (``python -m studies run NAME --scale smoke``) on generated CIFAR
files in the real on-disk format; the tests read back what it wrote: trials.parquet / curves.parquet,
the MLflow runs, and the report's published tables. The grafting study also checks that every
exter_graft trial grafted the gradient norm its sgd reference cell stored.
"""

from __future__ import annotations

import importlib
import json
import math
import re

import pandas as pd
import pytest

from tests.conftest import check_confirm, mlflow_runs, report_table, run_smoke_study

BEST, FINAL = "test/accuracy_best", "test/accuracy"


def get_study(name: str):
    return importlib.import_module(f"studies.{name}").STUDY  # this study only, not the whole catalog


def check_common(name: str, sdir, all_trials: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Every cell ran its smoke trial to the end, MLflow nests one run per trial under one study run, the confirm
    phase re-ran each cell's best config with 2 fresh seeds, and the report's published tables (confirmed, and
    the best search trial) have the seed's shape with every published value in it, as printed. Returns the
    search trials."""
    trials = all_trials[all_trials["phase"] == "search"]
    study = get_study(name)
    cells = {c.name: c for c in study.cells}
    assert list(dict.fromkeys(trials["cell"])) == list(cells)  # every cell, in order
    assert all(trials.loc[trials["cell"] == n, "method"].eq(c.method).all() for n, c in cells.items())
    assert (trials["status"] == "completed").all(), trials[["cell", "status"]]
    assert (all_trials["steps"] == 4).all() and all_trials["trial_id"].is_unique
    assert trials["final/test/accuracy"].between(0, 1).all() and trials["final/test/accuracy_best"].between(0, 1).all()
    assert set(curves["trial_id"]) == set(all_trials["trial_id"])
    for n, c in cells.items():  # Optuna's first point: the recipe's published eta / lambda (the searched keys)
        row = trials[trials["cell"] == n].iloc[0]
        searched = json.loads(row["searched"])
        point = {k: v for k, v in c.recipe.items() if k in searched}
        assert set(point) == set(searched), (n, point, searched)
        for k, v in point.items():
            assert row[f"config/{k}"] == pytest.approx(v), (n, k)
        assert json.loads(row["published/values"]) == {m: p.value for m, p in c.published.items()}

    parents, children = mlflow_runs(f"sqlite:///{sdir / 'mlflow.db'}", f"regtune/{name}")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(all_trials["trial_id"])
    assert {c.data.tags["cell"] for c in children} == set(cells)

    md = (sdir / "report" / "report.md").read_text()
    check_confirm(all_trials, md, seeds=2)
    confirmed = report_table(md, "Published table: confirmed mean ± std (n) vs published")
    table = report_table(md, "Published table: best single search trial, one seed (published)")
    header = table.pop("")
    assert header == confirmed.pop("") == list(dict.fromkeys(c.col for c in study.cells))
    multi = {m for c in study.cells for m in c.published} == {BEST, FINAL}
    for c in study.cells:
        for metric, pub in c.published.items():
            label = f"{c.row} ({'best' if metric == BEST else 'final'})" if multi else c.row
            text = table[label][header.index(c.col)]
            assert re.fullmatch(rf"\d+\.\d\d \({re.escape(pub.text)}\)", text), (c.name, text)
            shown = re.escape(pub.text + (f" ± {pub.std_text}" if pub.std is not None else ""))
            text = confirmed[label][header.index(c.col)]
            assert re.fullmatch(rf"\d+\.\d\d ± \S+ \(n=2\) vs {shown}: (consistent|differs)", text), (c.name, text)
    configs = report_table(md, "Hyperparameters: best found (published)")
    for c in study.cells:
        text = configs[c.row][configs[""].index(c.col)]
        assert re.search(rf"(^|, )lr=[0-9.e+-]+ \({c.published_config['lr']:.3g}\)", text), (c.name, text)
    return trials


# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grafting(tmp_path_factory):
    return run_smoke_study(tmp_path_factory, "implicit_grafting")


def test_implicit_grafting(grafting):
    sdir, trials, curves = grafting
    trials = check_common("implicit_grafting", sdir, trials, curves)
    assert len(trials) == 20 and trials.groupby("task")["method"].apply(set).map(len).eq(5).all()
    md = (sdir / "report" / "report.md").read_text()
    assert "| VGG-16/CIFAR100 | " in md and "(63.48)" in md and "lr=0.432 (0.432)" in md


def test_exter_graft_trials_grafted_the_stored_sgd_norm(grafting):
    """Each exter_graft trial took its step norm from its own task's sgd cell, read from curves.parquet:
    the mean norm of the sgd run's first 20-step block (smoke runs 4 steps, all in block 0). A trial
    that had no reference would have errored (tests/test_reference.py). The confirm runs of exter_graft (other
    seeds) graft the same stored norm: the reference is the sgd cell's best search trial, not a confirm run."""
    _, trials, curves = grafting
    used = {}
    for task in trials["task"].unique():
        sgd = trials[(trials["cell"] == f"{task}-sgd") & (trials["status"] == "completed")
                     & (trials["phase"] == "search")]
        ref_id = sgd.loc[sgd["final/val/accuracy"].idxmax(), "trial_id"]
        ref = curves[curves["trial_id"] == ref_id].sort_values("step")
        block0 = float(ref["grad/full_norm"].iloc[0])  # the first report: mean over steps 0, 1
        graft = curves[curves["cell"] == f"{task}-exter_graft"]
        assert len(graft) == 2 * 3 and graft["grad/graft_norm"].notna().all()  # 1 search + 2 confirm runs
        assert graft["grad/graft_norm"].to_numpy() == pytest.approx([block0] * 6, rel=1e-9)
        assert not math.isclose(block0, float(graft["grad/full_norm"].iloc[0]), rel_tol=1e-6)  # grafted, not own
        used[task] = block0
    assert len(set(used.values())) == 4  # four tasks, four different references


# --------------------------------------------------------------------------
def test_implicit_main(tmp_path_factory):
    sdir, trials, curves = run_smoke_study(tmp_path_factory, "implicit_main")
    trials = check_common("implicit_main", sdir, trials, curves)
    assert len(trials) == 17
    assert "unit_jacobian" not in set(trials.loc[trials["task"] == "cifar10_vgg11", "method"])
    table = report_table((sdir / "report" / "report.md").read_text(),
                         "Published table: best single search trial, one seed (published)")
    assert table["VGG-11/CIFAR10"][-1] == "N/A"  # the paper has no VGG-11 x UJ cell
    assert table[""] == ["SB SGD", "LB SGD", "LB + GN", "LB + FT", "LB + AJ", "LB + UJ"]
    configs = report_table((sdir / "report" / "report.md").read_text(), "Hyperparameters: best found (published)")
    assert "reg_lambda=" in configs["ResNet-18/CIFAR100"][4] and "(5e-05)" in configs["ResNet-18/CIFAR100"][4]
    penalized = trials[trials["method"].isin(["grad_norm", "fisher_trace", "avg_jacobian", "unit_jacobian"])]
    assert (penalized["final/reg/value"] > 0).all()  # the penalty R_k was computed


def test_implicit_large_micro(tmp_path_factory):
    sdir, trials, curves = run_smoke_study(tmp_path_factory, "implicit_large_micro")
    trials = check_common("implicit_large_micro", sdir, trials, curves)
    # the per-cell micro-batch size, shrunk with the smoke batch of 32
    assert trials["config/micro_batch_size"].tolist() == [16, 16, 16, 24]
    assert trials["method"].tolist() == ["grad_norm", "fisher_trace", "grad_norm", "grad_norm"]
    table = report_table((sdir / "report" / "report.md").read_text(),
                         "Published table: best single search trial, one seed (published)")
    assert table[""] == ["Test Accuracy"] and "VGG-11/CIFAR10, LB + GN (mb size=2500)" in table


def test_implicit_micro_sweep_reports_best_and_final(tmp_path_factory):
    sdir, trials, curves = run_smoke_study(tmp_path_factory, "implicit_micro_sweep")
    trials = check_common("implicit_micro_sweep", sdir, trials, curves)
    gn = trials[trials["method"] == "grad_norm"]
    assert gn["config/micro_batch_size"].tolist() == [2, 4, 16, 24]
    sgd = trials[trials["method"] == "sgd"].set_index("cell")["config/lr"]
    assert 0.075 <= sgd["cifar10_vgg11-sgd-lr0.15"] <= 0.3 and 0.005 <= sgd["cifar10_vgg11-sgd-lr0.01"] <= 0.02
    table = report_table((sdir / "report" / "report.md").read_text(),
                         "Published table: best single search trial, one seed (published)")
    assert set(table) == {"", "VGG-11/CIFAR10 (best)", "VGG-11/CIFAR10 (final)"}
    best, final = table["VGG-11/CIFAR10 (best)"], table["VGG-11/CIFAR10 (final)"]
    assert best[0].endswith("(78.19)") and final[0].endswith("(77.56)")
    # ours: the best trial's test accuracy at the best-validation checkpoint and at the last one
    for i, cell in enumerate(get_study("implicit_micro_sweep").cells):
        row = trials[trials["cell"] == cell.name].iloc[0]
        assert best[i].startswith(f"{100 * row['final/test/accuracy_best']:.2f} ")
        assert final[i].startswith(f"{100 * row['final/test/accuracy']:.2f} ")


def test_cpr_cifar100(tmp_path_factory):
    sdir, all_trials, curves = run_smoke_study(tmp_path_factory, "cpr_cifar100")
    trials = check_common("cpr_cifar100", sdir, all_trials, curves)
    conf = all_trials[all_trials["phase"] == "confirm"]
    assert conf["config/full_train"].eq(True).all() and not trials["config/full_train"].any()  # the paper's 50k
    by_cell = trials.set_index("cell")
    assert by_cell["config/kappa_init_method"].dropna().to_dict() == {
        "adamcpr-warm_start": "warm_start", "adamcpr-dependent": "dependent",
        "adamcpr-inflection_point": "inflection_point"}
    assert by_cell.loc["adamcpr-warm_start", "config/kappa_init_param"] == 2  # smoke: the constraint starts at step 2
    assert by_cell.loc["adamcpr-dependent", "config/kappa_init_param"] == pytest.approx(8.0)  # Optuna's first point
    assert by_cell.loc["adamw", "config/weight_decay"] == pytest.approx(1e-3)
    md = (sdir / "report" / "report.md").read_text()
    table = report_table(md, "Published table: best single search trial, one seed (published)")
    assert table[""] == ["AdamW", "Adam + Rescaling", "AdamCPR warm start", "AdamCPR dependent", "AdamCPR Kappa-IP"]
    assert [t.split("(")[1] for t in table["ResNet-18/CIFAR-100"]] == ["74.9)", "74.7)", "76.6)", "76.4)", "76.3)"]
    confirmed = report_table(md, "Published table: confirmed mean ± std (n) vs published")["ResNet-18/CIFAR-100"]
    assert [t.split(" vs ")[1].split(":")[0] for t in confirmed] == [
        "74.9 ± 0.21", "74.7 ± 0.24", "76.6 ± 0.22", "76.4 ± 0.50", "76.3 ± 0.15"]  # as printed
    cells = report_table(md, "Confirmed results per cell")
    head = cells.pop("cell")
    assert {r[head.index("test")] for r in cells.values()} == {"Welch t-test"}  # the paper gives ± over 3 seeds
    assert {r[head.index("split")] for r in cells.values()} == {"test set; trained on the full training set"}
