"""Fast checks of the IRE-paper studies and cpr_gpt2 without Ray: specs, scale overrides, the report's
speed-up section, bf16 autocast of the vision tasks, and ``python -m studies prepare``."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from regtune.data.synthetic_text import write_text_dir
from regtune.data.text import load_tokens
from regtune.report_speedup import add_speedups
from regtune.space import ConfigError, IntUniform, LogUniform, Uniform
from studies.spec import Cell, Scale, Study, cell_configs, check_study
from tests.conftest import run_cli

NAMES = ("ire_cifar", "ire_vit_cifar100", "ire_imagenet", "ire_wikitext2", "ire_llama", "cpr_gpt2")


def study(name: str) -> Study:
    return importlib.import_module(f"studies.{name}").STUDY


@pytest.mark.parametrize("name", NAMES)
def test_specs_validate_and_points_sit_inside_their_ranges(name):
    st = study(name)
    assert set(st.scales) == {"paper", "smoke"} and st.prepare is not None
    for scale in st.scales:
        check_study(st, scale)
        for c in st.cells:
            _, searched = cell_configs(st, c, scale)
            for k, v in c.recipe.items():
                d = searched.get(k)
                if isinstance(d, (LogUniform, Uniform, IntUniform)):
                    assert d.low <= v <= d.high, (name, c.name, k, v)
    assert st.resources("cifar10_wrn28_10", "smoke")["cpu"] == 1  # one torch thread per smoke trial


def test_search_spaces_follow_the_catalog():
    """STUDIES.md: lr everywhere; sam_rho on SAM cells; ire_rank / ire_prog on IRE cells; weight decay only
    where listed (the ViT and ViT-ImageNet cells, GPT-2 AdamW); the language IRE studies fix it."""
    for name in NAMES:
        for c in study(name).cells:
            _, searched = cell_configs(study(name), c, "paper")
            assert "lr" in searched
            assert ("sam_rho" in searched) == c.method.startswith("sam")
            assert ({"ire_rank", "ire_prog"} <= set(searched)) == c.method.endswith("_ire")
            wd = "weight_decay" in searched
            assert wd == (name in ("ire_vit_cifar100", "cpr_gpt2") and c.method != "adamcpr"
                          or c.task == "imagenet_vit_s"), (name, c.name)


def test_smoke_scale_overrides_cpr_steps_and_points_drop_fixed_keys():
    st = study("cpr_gpt2")
    ws = st.cell("adamcpr_warm_start")
    fixed, searched = cell_configs(st, ws, "paper")
    assert searched["kappa_init_param"] == IntUniform(2500, 40000) and ws.recipe["kappa_init_param"] == 5000
    fixed, searched = cell_configs(st, ws, "smoke")
    assert fixed["kappa_init_param"] == 12 and set(searched) == {"lr"}
    fixed, _ = cell_configs(st, st.cell("adamcpr_inflection_point"), "smoke")
    assert fixed["reg_step_size"] == 1 and fixed["kappa_init_method"] == "inflection_point"


def _mini_study(**cell_kw) -> Study:
    cells = (Cell("a", "wikitext2_transformer", "adamw"),
             Cell("b", "wikitext2_transformer", "adamw_ire", **cell_kw))
    return Study("mini", "d", "p", cells, {"smoke": Scale(1, {"size": "smoke"})})


def test_check_study_rejects_a_bad_speedup_baseline_or_scale_override():
    check_study(_mini_study(speedup_baseline="a"), "smoke")
    with pytest.raises(ValueError, match="speedup_baseline 'c'"):
        check_study(_mini_study(speedup_baseline="c"), "smoke")
    st = _mini_study()
    bad = Study(st.name, st.doc, st.paper, st.cells, {"smoke": Scale(1, {"size": "smoke"}, space={"zz": {}})})
    with pytest.raises(ConfigError, match="unknown cell 'zz'"):
        check_study(bad, "smoke")


def _best(rows):
    base = {"task": "t", "method": "adamw", "trial_id": "x", "published/metric": None, "published/value": np.nan}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_speedup_section_hand_case():
    best = _best([{"cell": "a", "speedup_baseline": ""},
                  {"cell": "b", "method": "adamw_ire", "trial_id": "y", "speedup_baseline": "a",
                   "published/metric": "speedup", "published/value": 2.1}])
    curves = pd.DataFrame({"cell": ["a"] * 3 + ["b"] * 3, "trial_id": ["x"] * 3 + ["y"] * 3,
                           "step": [10, 20, 40] * 2, "val/loss": [5.0, 4.0, 3.0, 4.0, 2.0, 1.0]})
    out, md = add_speedups(best, curves)
    # b reaches a's final 3.0 halfway between (10, 4.0) and (20, 2.0): step 15; 40 / 15 = 2.67x
    assert out.loc[1, "final/speedup"] == pytest.approx(40 / 15) and np.isnan(out.loc[0, "final/speedup"])
    assert "- speed-up on t: adamw_ire (b) reaches adamw's final val/loss 3 (step 40) at step 15: speed-up 2.67x" in md
    assert "| t | a | b | 3 (40) | 15 | 2.67x | 2.1x |" in md
    # never reached; and no baseline at all -> no section
    slow = curves.assign(**{"val/loss": [5.0, 4.0, 3.0, 4.5, 4.0, 3.5]})
    out, md = add_speedups(best, slow)
    assert "not within its 40 steps: speed-up not reached" in md and np.isnan(out.loc[1, "final/speedup"])
    _, md = add_speedups(best.assign(speedup_baseline=""), curves)
    assert md == ""


@pytest.mark.parametrize("task", ["cifar100_vit_t", "imagenet_vit_s"])
def test_vision_forward_is_float32_on_cpu_and_bf16_autocast_on_cuda(task, tmp_path):
    from regtune.data.cifar import write_fake_cifar
    from regtune.data.imagenet import write_fake_imagenet
    from regtune.methods import resolve_config
    from regtune.tasks.base import get_task

    if task.startswith("imagenet"):
        data = write_fake_imagenet(tmp_path / "imagenet")
    else:
        data = write_fake_cifar(tmp_path, "cifar100", n_train=384, n_test=128)
    config = resolve_config("adamw", {"task": task, "size": "smoke", "data_dir": str(data)})
    assert config["autocast_bf16"] is True
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        inst = get_task(task).build(config, torch.device(device))
        x, y = inst.train_batch(0)
        logits = inst.forward(inst.model, x.to(device))
        assert logits.dtype == (torch.bfloat16 if device == "cuda" else torch.float32)
        assert inst.criterion(logits, y.to(device)).dtype == torch.float32


# --------------------------------------------------------------------------
def test_prepare_cli_tokenizes_generated_text(tmp_path):
    text = write_text_dir(tmp_path / "text", train_lines=300, val_lines=60, test_lines=60)
    out = tmp_path / "tokens"
    proc = run_cli("prepare", "wikitext103", "--text-dir", str(text), "--tokenizer", "local-bpe",
                   "--vocab-size", "300", "--out-dir", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {"train.bin", "val.bin", "test.bin", "meta.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["corpus"] == "wikitext103" and meta["tokenizer"] == "local-bpe" and meta["vocab_size"] <= 300
    data = load_tokens(out)
    assert len(data.splits["train"]) == meta["counts"]["train"] > 1000
    assert int(np.max(data.splits["train"])) < meta["vocab_size"]
    assert "prepared wikitext103" in proc.stdout


@pytest.mark.parametrize("args", [
    ["prepare", "no_such_corpus"],
    ["prepare"],
    ["prepare", "wikitext2", "--tokenizer", "bpe"],
    ["prepare", "wikitext2", "--synthetic-lines", "50", "--tokenizer", "word", "--vocab-size", "10"],
])
def test_prepare_cli_bad_arguments_exit_2(args, tmp_path):
    proc = run_cli(*args, "--out-dir", str(tmp_path / "o"), timeout=120) if len(args) > 2 else run_cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error" in (proc.stdout + proc.stderr)
    assert not (tmp_path / "o" / "meta.json").exists()
