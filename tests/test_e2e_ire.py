"""End to end, at smoke scale, on real local Ray, Optuna and a real sqlite MLflow store: the IRE-paper studies
(ire_cifar, ire_vit_cifar100, ire_imagenet, ire_wikitext2, ire_llama) and cpr_gpt2.

Each study runs once through the CLI (``python -m studies run NAME --scale smoke``) on data its ``prepare``
hook generated in the real on-disk formats (CIFAR pickles, an ImageFolder tree, token files); the tests read
back what it wrote: trials.parquet / curves.parquet, the MLflow runs, and the report. The language studies'
speed-up lines are recomputed from curves.parquet; cpr_gpt2's perplexity is checked against its loss.
"""

from __future__ import annotations

import importlib
import json
import math
import re

import pandas as pd
import pytest

from regtune.report_speedup import baseline_speedup, speedup
from tests.conftest import check_confirm, mlflow_runs, report_table, run_smoke_study

# study -> the (task, method) pairs it must have run, in order (written out here, not read from the spec)
EXPECTED = {
    "ire_cifar": [(t, m) for t in ("cifar10_wrn28_10", "cifar100_wrn28_10", "cifar10_resnet56", "cifar100_resnet56")
                  for m in ("sgd", "sgd_ire", "sam", "sam_ire")],
    "ire_vit_cifar100": [(t, m) for t in ("cifar100_vit_t", "cifar100_vit_s")
                         for m in ("adamw", "adamw_ire", "sam_adamw", "sam_adamw_ire")],
    "ire_imagenet": [("imagenet_resnet50", m) for m in ("sgd", "sgd_ire", "sam", "sam_ire")]
                    + [("imagenet_vit_s", "adamw"), ("imagenet_vit_s", "adamw_ire")],
    "ire_wikitext2": [("wikitext2_transformer", "adamw"), ("wikitext2_transformer", "adamw_ire")],
    "ire_llama": [(t, m) for t in ("wikitext103_llama60m", "minipile_llama119m", "openwebtext_llama229m")
                  for m in ("adamw", "adamw", "adamw_ire")],  # T-step AdamW, 2T-step AdamW, AdamW-IRE
    "cpr_gpt2": [("openwebtext_gpt2s", "adamw"), ("openwebtext_gpt2s", "adamcpr"), ("openwebtext_gpt2s", "adamcpr")],
}
STEPS = {"ire_cifar": 4, "ire_vit_cifar100": 4, "ire_imagenet": 3, "ire_wikitext2": 60, "ire_llama": 60,
         "cpr_gpt2": 60}  # the 2T AdamW cells of ire_llama (names ending in -2T) run twice as long
PUBLISHED = {  # every published number the report's table must show, in parentheses
    "ire_cifar": [95.84, 80.81, 93.49, 72.81, 96.24, 81.49, 93.78, 73.78, 96.58, 83.05, 94.05, 75.54,
                  96.7, 83.5, 94.46, 75.86],
    "ire_vit_cifar100": [63.9, 65.43, 67.05, 68.39, 64.25, 66.93, 67.33, 70.47],
    "ire_imagenet": [76.81, 77.04, 77.47, 77.92, 78.7, 79.1],
    "ire_wikitext2": [3.25, 2.35, 5.4],
    "ire_llama": [2.1, 2.3, 2.1],
    "cpr_gpt2": [18.23, 18.02, 17.94],
}

# a row whose cells publish two metrics prints one line for each
ROWS = {"ire_wikitext2": ["AdamW", "AdamW-IRE (train/loss)", "AdamW-IRE (speedup)"]}


def search(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[trials["phase"] == "search"]


def check_common(name: str, sdir, all_trials: pd.DataFrame, curves: pd.DataFrame) -> str:
    """Every cell ran its one smoke search trial to the end on the generated data, Optuna's first point is the
    published setting, MLflow nests one run per trial under one study run, the confirm phase re-ran each cell's
    config with 2 fresh seeds, and the report's published tables (confirmed, and the best search trial) have
    the paper's shape with every published value in it, as printed. Returns the report's text."""
    trials = search(all_trials)
    study = importlib.import_module(f"studies.{name}").STUDY
    assert list(zip(trials["task"], trials["method"])) == EXPECTED[name]
    assert list(trials["cell"]) == [c.name for c in study.cells] and trials["trial_id"].is_unique
    assert (all_trials["status"] == "completed").all(), all_trials[["cell", "status"]]
    assert (all_trials["steps"] == all_trials["cell"].map(
        lambda c: 2 * STEPS[name] if c.endswith("-2T") else STEPS[name])).all()
    data = sdir.resolve() / "data"
    assert (all_trials["config/data_dir"] == str(data / "imagenet" if name == "ire_imagenet" else data)).all()
    for metric in trials["metric"].unique():
        assert trials[f"final/{metric}"].map(math.isfinite).all()
    assert set(curves["trial_id"]) == set(all_trials["trial_id"])
    for c, (_, row) in zip(study.cells, trials.iterrows()):
        searched = json.loads(row["searched"])
        point = {k: v for k, v in c.recipe.items() if k in searched}
        assert point and set(point) == set(searched), c.name
        for k, v in point.items():
            assert row[f"config/{k}"] == pytest.approx(v), (c.name, k)

    parents, children = mlflow_runs(f"sqlite:///{sdir / 'mlflow.db'}", f"regtune/{name}")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(all_trials["trial_id"])
    assert {c.data.tags["cell"] for c in children} == {c.name for c in study.cells}

    md = (sdir / "report" / "report.md").read_text()
    check_confirm(all_trials, md, seeds=2)
    # every row and the report name the data: here the smoke hooks' generated stand-ins
    assert all_trials["data_source"].str.contains("GENERATED stand-in").all(), all_trials["data_source"]
    sources = md.split("## Data source per cell", 1)[1]
    assert all(f"- {c.name}: " in sources for c in study.cells)
    published = sorted(p.text for c in study.cells for p in c.published.values())
    assert sorted(float(t) for t in published) == sorted(PUBLISHED[name])
    for heading, pattern in [("Published table: best single search trial, one seed (published)", r"\(([\d.]+)\)"),
                             ("Published table: confirmed mean ± std (n) vs published", r" vs ([\d.]+):")]:
        table = report_table(md, heading)
        header = table.pop("")
        assert header == list(dict.fromkeys(c.col for c in study.cells))
        assert list(table) == ROWS.get(name, list(dict.fromkeys(c.row for c in study.cells))), heading
        shown = [v for cells in table.values() for text in cells for v in re.findall(pattern, text)]
        assert sorted(shown) == published, heading  # as printed: 96.70, not 96.7
    return md


def check_speedups(md: str, trials: pd.DataFrame, curves: pd.DataFrame, tasks: list[str], steps: int = 60) -> None:
    """One speed-up line per task, with the numbers recomputed from curves.parquet: ire_wikitext2 on the training
    loss of one shared schedule, ire_llama as the steps 2T AdamW needs to reach AdamW-IRE's final val loss."""
    for task in tasks:
        ire = trials[(trials["task"] == task) & (trials["method"] == "adamw_ire")].iloc[0]
        base = trials[trials["cell"] == ire["speedup_baseline"]].iloc[0]
        metric, mode = ire["speedup_metric"], ire["speedup_mode"]

        def curve(r, metric=metric):
            c = curves[curves["trial_id"] == r["trial_id"]].sort_values("step")
            return list(zip(c["step"], c[metric]))

        line = next(ln for ln in md.splitlines() if ln.startswith(f"- speed-up on {task}:"))
        if mode == "baseline_reaches_final":
            assert base["cell"] == f"{task}-adamw-2T" and base["steps"] == 2 * steps and metric == "val/loss"
            s = baseline_speedup(curve(base), curve(ire))
            assert s.target_loss == pytest.approx(ire[f"final/{metric}"]) and s.base_step == steps
            assert f"reaches adamw_ire's final {metric} {s.target_loss:.4g} (step {steps}," in line
            if s.ratio is None:
                assert line.endswith("speed-up > 2.00x (not reached)"), line
            else:
                assert line.endswith(f"at step {s.step:.0f}: speed-up {s.ratio:.2f}x"), line
                assert 0 < s.ratio <= 2.0
            continue
        assert base["method"] == "adamw" and metric == "train/loss"
        s = speedup(curve(base), curve(ire))
        assert s.target_loss == pytest.approx(base[f"final/{metric}"]) and s.base_step == steps
        assert f"final {metric} {s.target_loss:.4g} (step {steps})" in line
        if s.ratio is None:
            assert line.endswith("speed-up not reached"), line
        else:
            assert line.endswith(f"at step {s.step:.0f}: speed-up {s.ratio:.2f}x"), line
            assert 1.0 <= s.ratio and s.step <= steps


# --------------------------------------------------------------------------
def test_ire_cifar(tmp_path_factory):
    sdir, trials, curves = run_smoke_study(tmp_path_factory, "ire_cifar")
    md = check_common("ire_cifar", sdir, trials, curves)
    assert (trials["config/momentum"] == 0.9).all() and (trials["config/weight_decay"] == 5e-4).all()
    assert trials["final/test/accuracy"].between(0, 1).all()
    # Table 1's metric: the best test accuracy over the reports, beside the final one
    assert (trials["final/test/accuracy_max"] >= trials["final/test/accuracy"]).all()
    assert (trials["published/metric"] == "test/accuracy_max").all()
    assert "## Test accuracy: best over evaluations and final" in md
    assert "| SAM-IRE | " in md and "(96.70)" in md and "Speed-up" not in md
    assert (sdir / "data" / "cifar-10-batches-py" / "data_batch_1").is_file()


def test_ire_vit_cifar100(tmp_path_factory):
    sdir, trials, curves = run_smoke_study(tmp_path_factory, "ire_vit_cifar100")
    check_common("ire_vit_cifar100", sdir, trials, curves)
    assert trials.loc[trials["phase"] == "confirm", "config/full_train"].eq(True).all()  # the paper's 50k images
    trials = search(trials)
    sam = trials[trials["method"].isin(["sam_adamw", "sam_adamw_ire"])]  # SAM over AdamW
    assert len(sam) == 4 and "config/sam_base" not in sam and "config/momentum" not in sam  # no SGD keys
    assert trials["final/test/accuracy"].between(0, 1).all()


def test_ire_imagenet(tmp_path_factory):
    sdir, trials, curves = run_smoke_study(tmp_path_factory, "ire_imagenet")
    md = check_common("ire_imagenet", sdir, trials, curves)
    assert trials["final/val/accuracy"].between(0, 1).all()
    for heading in ("Published table: best single search trial, one seed (published)",
                    "Published table: confirmed mean ± std (n) vs published"):
        table = report_table(md, heading)
        assert table["SGD"][1] == "N/A" and table["AdamW"][0] == "N/A"  # Tables 2 and 4 side by side
    assert len(list((sdir / "data" / "imagenet" / "train").iterdir())) == 4


def test_ire_wikitext2(tmp_path_factory):
    sdir, trials, curves = run_smoke_study(tmp_path_factory, "ire_wikitext2")
    md = check_common("ire_wikitext2", sdir, trials, curves)
    trials = search(trials)
    assert "## Speed-up over the baseline" in md and "| 5.4x |" in md  # the published speed-up, in its table
    check_speedups(md, trials, curves, ["wikitext2_transformer"])
    ire = trials[trials["method"] == "adamw_ire"].iloc[0]
    assert ire["config/ire_prog_decay"] and ire["config/ire_rank"] == pytest.approx(0.01)


def test_ire_llama(tmp_path_factory):
    sdir, trials, curves = run_smoke_study(tmp_path_factory, "ire_llama")
    md = check_common("ire_llama", sdir, trials, curves)
    trials = search(trials)
    tasks = ["wikitext103_llama60m", "minipile_llama119m", "openwebtext_llama229m"]
    check_speedups(md, trials, curves, tasks)
    # the published table puts our ratio beside the paper's in the IRE row
    row = report_table(md, "Published table: best single search trial, one seed (published)")[
        "AdamW-IRE: speed-up over AdamW (x)"]
    for text, pub in zip(row, (2.1, 2.3, 2.1)):
        assert re.fullmatch(rf"(\d+(\.\d+)?|-) \({pub:g}\)", text), text


def test_cpr_gpt2(tmp_path_factory):
    sdir, trials, curves = run_smoke_study(tmp_path_factory, "cpr_gpt2")
    md = check_common("cpr_gpt2", sdir, trials, curves)
    trials = search(trials)
    assert trials["final/val/perplexity"].to_numpy() == pytest.approx(trials["final/val/loss"].map(math.exp))
    cpr = trials.set_index("cell")
    assert cpr.loc["adamcpr_warm_start", "config/kappa_init_method"] == "warm_start"
    assert cpr.loc["adamcpr_warm_start", "config/kappa_init_param"] == 12  # the smoke scale's override
    assert cpr.loc["adamcpr_inflection_point", "config/reg_step_size"] == 1
    table = report_table(md, "Best configuration per cell (search, one seed)")
    col = table["cell"].index("val/perplexity")
    for cell, row in cpr.iterrows():
        assert table[cell][col] == f"{row['final/val/perplexity']:.4g}"
    assert "Speed-up" not in md
