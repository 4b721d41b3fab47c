"""Data provenance: generated stand-in data is marked where it is written; a paper-scale study refuses it (and data
too small for the paper preset) with a one-line error and exit 2 before Ray starts; each trial row and the report
name the data source of every cell."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from regtune.data.cifar import write_fake_cifar
from regtune.data.imagenet import write_fake_imagenet
from regtune.data.provenance import GENERATED_FILE, task_data_source
from regtune.data.synthetic_text import make_smoke_data, write_text_dir
from regtune.data.text import prepare
from regtune.report_protocol import accuracy_over_evals_table, data_source_lines
from regtune.space import ConfigError
from studies.engine.provenance import cell_data_source, check_paper_data
from tests.conftest import run_cli


def _study(name: str):
    import importlib

    return importlib.import_module(f"studies.{name}").STUDY


def test_generated_text_is_marked_through_tokenization(tmp_path):
    out = make_smoke_data(tmp_path, ["wikitext2"], train_lines=200, val_lines=40)
    meta = json.loads((out["wikitext2"] / "meta.json").read_text())
    assert meta["generated"] is True and meta["generated_by"] == "regtune.data.synthetic_text"
    src = task_data_source("wikitext2_transformer", {"data_dir": str(tmp_path), "tokenizer": "word"})
    assert src.exists and src.generated and src.size == meta["counts"]["train"]
    assert "GENERATED stand-in" in src.describe()
    # text that was not generated here (no marker): tokenized as real, just too small for the paper preset
    text = write_text_dir(tmp_path / "mine", train_lines=200, val_lines=40, test_lines=40)
    (text / GENERATED_FILE).unlink()
    prepare("wikitext2", text_dir=text, out_dir=tmp_path / "real" / "wikitext2" / "word", tokenizer="word")
    src = task_data_source("wikitext2_transformer", {"data_dir": str(tmp_path / "real"), "tokenizer": "word"})
    assert not src.generated and src.too_small and src.needed == 1_000_000


def test_paper_scale_refuses_generated_or_too_small_data_and_smoke_accepts_it(tmp_path):
    make_smoke_data(tmp_path, ["wikitext2"], train_lines=200, val_lines=40)
    study = _study("ire_wikitext2")
    with pytest.raises(ConfigError, match=r"holds generated data, not wikitext2 \(word tokens\)") as e:
        check_paper_data(study, "paper", {"data_dir": str(tmp_path)})
    assert "\n" not in str(e.value)
    check_paper_data(study, "smoke", {"data_dir": str(tmp_path)})  # smoke scale: generated data is what it is for

    write_fake_cifar(tmp_path / "c", "cifar10", n_train=384, n_test=128)
    write_fake_cifar(tmp_path / "c", "cifar100", n_train=384, n_test=128)
    with pytest.raises(ConfigError, match="holds generated data, not cifar10"):
        check_paper_data(_study("ire_cifar"), "paper", {"data_dir": str(tmp_path / "c")})
    for kind in ("cifar-10-batches-py", "cifar-100-python"):  # unmarked, but 384 images: too small
        (tmp_path / "c" / kind / GENERATED_FILE).unlink()
    with pytest.raises(ConfigError, match=r"too small for the paper preset: .* holds about \d+ training images "
                                          r"of cifar10, expected at least 50,000"):
        check_paper_data(_study("ire_cifar"), "paper", {"data_dir": str(tmp_path / "c")})

    img = write_fake_imagenet(tmp_path / "imagenet")
    with pytest.raises(ConfigError, match="holds generated data, not imagenet"):
        check_paper_data(_study("ire_imagenet"), "paper", {"data_dir": str(img)})
    (img / GENERATED_FILE).unlink()
    with pytest.raises(ConfigError, match="holds 4 training classes of imagenet, expected at least 1,000"):
        check_paper_data(_study("ire_imagenet"), "paper", {"data_dir": str(img)})


def test_real_sized_data_passes_and_missing_data_is_left_to_the_download(tmp_path):
    d = tmp_path / "wikitext2" / "word"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"source": "hub:Salesforce/wikitext", "counts": {"train": 2_088_628}}))
    check_paper_data(_study("ire_wikitext2"), "paper", {"data_dir": str(tmp_path)})
    src = task_data_source("wikitext2_transformer", {"data_dir": str(tmp_path), "tokenizer": "word"})
    assert src.describe().startswith("wikitext2 (word tokens): real data (hub:Salesforce/wikitext, 2,088,628")
    check_paper_data(_study("ire_cifar"), "paper", {"data_dir": str(tmp_path / "empty")})  # downloads later


def test_cli_refuses_generated_data_at_paper_scale_before_ray_starts(tmp_path):
    make_smoke_data(tmp_path / "data", ["wikitext2"], train_lines=200, val_lines=40)
    storage = tmp_path / "runs"
    proc = run_cli("run", "ire_wikitext2", "--scale", "paper", "--storage", str(storage),
                   "--set", f"data_dir={tmp_path / 'data'}", timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data_dir of cell 'wikitext2_transformer-adamw' holds "
                                               "generated data"), proc.stderr
    assert not (storage / "ire_wikitext2-paper").exists()  # refused before the study dir, the lock or Ray


def test_trial_rows_and_report_name_each_cells_data_source(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", n_train=384, n_test=128)
    study = _study("ire_cifar")
    cell = study.cell("cifar10_resnet56-sgd")
    line = cell_data_source(cell, {"task": cell.task, "size": "smoke", "data_dir": str(tmp_path), "lr": 0.1})
    assert line.startswith("cifar10: GENERATED stand-in (generated by regtune.data.cifar.write_fake_cifar, 384 "
                           "training images) at ")
    assert cell_data_source(cell, {"task": cell.task, "bogus": 1}).startswith("unknown (ConfigError")
    grok = _study("cpr_grokking").cells[0]
    assert cell_data_source(grok, {"task": "grokking"}) == "no data files: the task computes its data"
    best = pd.DataFrame([{"cell": "a", "data_source": line}, {"cell": "b", "data_source": None}])
    md = data_source_lines(best)
    assert md.splitlines()[0] == "## Data source per cell" and f"- a: {line}" in md and "- b: unknown" in md
    assert data_source_lines(best.drop(columns="data_source")) == ""


def test_report_prints_the_best_test_accuracy_over_evaluations_beside_the_final():
    best = pd.DataFrame([{"cell": "c", "final/test/accuracy_max": 0.9624, "final/test/accuracy": 0.95,
                          "final/test/accuracy_best": 0.951, "published/metric": "test/accuracy_max",
                          "published/value": 96.24}])
    md = accuracy_over_evals_table(best)
    assert "| c | 96.24 | 95.00 | 95.10 | 96.24 (test/accuracy_max) |" in md
    assert accuracy_over_evals_table(best.drop(columns="final/test/accuracy_max")) == ""


def test_collect_cell_writes_the_data_source_into_each_trial_row(tmp_path):
    from studies.engine.driver import collect_cell

    write_fake_cifar(tmp_path / "data", "cifar10", n_train=384, n_test=128)
    study = _study("ire_cifar")
    cell = study.cell("cifar10_resnet56-sgd_ire")
    tdir = tmp_path / "trial"
    tdir.mkdir()
    params = {"task": cell.task, "size": "smoke", "data_dir": str(tmp_path / "data"), "lr": 0.1,
              "__method": cell.method, "__extras": {"cell": cell.name}}
    (tdir / "result.json").write_text("\n".join(json.dumps(r) for r in (
        {"step": 2, "val/accuracy": 0.1, "test/accuracy": 0.2, "test/accuracy_max": 0.2, "trial_id": "t1"},
        {"step": 4, "val/accuracy": 0.2, "test/accuracy": 0.1, "test/accuracy_max": 0.2, "trial_id": "t1"})))
    trials, _ = collect_cell(study, "smoke", cell, [(tdir, params)], 4, ["lr"])
    row = trials[0]
    assert row["data_source"].startswith("cifar10: GENERATED stand-in (generated by regtune.data.cifar."
                                         "write_fake_cifar, 384 training images)")
    assert row["published/metric"] == "test/accuracy_max" and row["final/test/accuracy_max"] == 0.2
