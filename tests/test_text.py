"""Text data pipeline and language-model tasks (IRE / CPR papers)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from regtune.data.synthetic_text import make_smoke_data, write_text_dir
from regtune.data.text import (
    EOT,
    MissingTokensError,
    eval_starts,
    load_tokens,
    prepare,
    prepare_main,
    token_dir,
    train_starts,
)
from regtune.loop import Run
from regtune.methods import resolve_config
from regtune.models.hf_lm import (
    GPT2_SMALL,
    LLAMA_PRESETS,
    build_gpt2,
    build_llama,
    count_parameters,
    gpt2_param_formula,
    llama_param_formula,
)
from regtune.space import ConfigError
from regtune.tasks.base import get_task

TEXT_TASKS = ["wikitext2_transformer", "wikitext103_llama60m", "minipile_llama119m", "openwebtext_llama229m",
              "openwebtext_gpt2s"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_data")
    make_smoke_data(root, train_lines=1500, val_lines=200, vocab_size=384)
    return root


def _instance(data_dir, task="wikitext103_llama60m", **over):
    config = resolve_config("adamw", {"task": task, "size": "smoke", "data_dir": str(data_dir), **over})
    return get_task(task).build(config, torch.device("cpu"))


# --------------------------------------------------------------------------
# prepare
def test_word_level_vocab_and_counts_hand_case(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    (text / "train.txt").write_text("a b a\n\n c  b\n", encoding="utf-8")
    (text / "valid.txt").write_text("a d <unk>\n", encoding="utf-8")
    out = tmp_path / "tok"
    meta = prepare("wikitext2", text_dir=text, out_dir=out, tokenizer="word")
    # <unk> = 0, <eos> = 1, then train words by first appearance; blank lines give a lone <eos>
    assert json.loads((out / "vocab.json").read_text()) == ["<unk>", "<eos>", "a", "b", "c"]
    assert meta["vocab_size"] == 5 and meta["eos_id"] == 1 and meta["unk_id"] == 0
    assert meta["counts"] == {"train": 8, "val": 4} and meta["dtype"] == "uint16"
    assert json.loads((out / "meta.json").read_text()) == meta
    data = load_tokens(out)
    assert data.splits["train"].tolist() == [2, 3, 2, 1, 1, 4, 3, 1]
    assert data.splits["val"].tolist() == [2, 0, 0, 1]  # "d" is not in the train vocabulary
    assert (out / "train.bin").stat().st_size == 8 * 2 and not (out / "test.bin").exists()


def test_word_level_switches_to_uint32_for_large_vocabularies(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    words = [f"w{i}" for i in range(70_000)]
    (text / "train.txt").write_text(" ".join(words) + "\n", encoding="utf-8")
    (text / "valid.txt").write_text("w69999 w3\n", encoding="utf-8")
    meta = prepare("wikitext2", text_dir=text, out_dir=tmp_path / "tok", tokenizer="word")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002
    assert load_tokens(tmp_path / "tok").splits["val"].tolist() == [70_001, 5, 1]


def test_local_bpe_is_lossless_and_counts_match(tmp_path):
    from tokenizers import Tokenizer

    text = write_text_dir(tmp_path / "text", train_lines=600, val_lines=80, test_lines=80, seed=3)
    out = tmp_path / "tok"
    meta = prepare("minipile", text_dir=text, out_dir=out, tokenizer="local-bpe", vocab_size=300)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert meta["vocab_size"] == tok.get_vocab_size() <= 300 and meta["eos_id"] == tok.token_to_id(EOT) == 0
    data = load_tokens(out)
    for split, name in (("train", "train.txt"), ("val", "valid.txt"), ("test", "test.txt")):
        ids = data.splits[split]
        assert meta["counts"][split] == len(ids) == (out / f"{split}.bin").stat().st_size // 2
        assert ids[-1] == meta["eos_id"]
        decoded = tok.decode(ids.tolist(), skip_special_tokens=False)
        assert decoded == (text / name).read_text(encoding="utf-8") + EOT
    assert meta["counts"]["train"] < 0.75 * len((text / "train.txt").read_bytes())  # merges compress the text


def test_prepare_rejects_bad_arguments(tmp_path):
    (tmp_path / "train.txt").write_text("x\n")
    with pytest.raises(FileNotFoundError, match=r"valid\.txt"):
        prepare("wikitext2", text_dir=tmp_path, out_dir=tmp_path / "o", tokenizer="word")
    with pytest.raises(ConfigError, match="vocab_size"):
        prepare("wikitext2", text_dir=tmp_path, out_dir=tmp_path / "o", tokenizer="word", vocab_size=100)
    with pytest.raises(ConfigError, match="corpus='c4'"):
        prepare("c4", text_dir=tmp_path)


def test_prepare_cli(tmp_path, capsys):
    text = write_text_dir(tmp_path / "text", train_lines=100, val_lines=20, test_lines=20)
    assert prepare_main(["wikitext2", "--text-dir", str(text), "--data-dir", str(tmp_path), "--tokenizer", "word"]) == 0
    assert (token_dir(tmp_path, "wikitext2", "word") / "meta.json").is_file()
    assert prepare_main(["wikitext103", "--synthetic-lines", "200", "--out-dir", str(tmp_path / "s"),
                         "--tokenizer", "local-bpe", "--vocab-size", "300"]) == 0
    assert load_tokens(tmp_path / "s").meta["tokenizer"] == "local-bpe"
    assert prepare_main(["wikitext2", "--text-dir", str(text), "--out-dir", str(tmp_path / "x"),
                         "--vocab-size", "10"]) == 2
    assert "vocab_size" in capsys.readouterr().out


# --------------------------------------------------------------------------
# batches
def test_train_batches_are_a_pure_function_of_seed_and_step(data_dir):
    a, b = _instance(data_dir), _instance(data_dir)
    x, y = a.train_batch(7)
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.int64
    assert torch.equal(x, b.train_batch(7)[0]) and torch.equal(y, b.train_batch(7)[1])
    a.train_batch(3)
    assert torch.equal(a.train_batch(7)[0], x)  # no hidden iterator state
    assert not torch.equal(a.train_batch(8)[0], x)
    assert not torch.equal(_instance(data_dir, seed=1).train_batch(7)[0], x)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    tokens = a.data.splits["train"]
    for row, s in enumerate(train_starts(len(tokens), 32, 8, 0, 7)):
        assert x[row].tolist() == tokens[s:s + 32].tolist() and y[row].tolist() == tokens[s + 1:s + 33].tolist()


def test_eval_windows_are_fixed_and_non_overlapping(data_dir):
    n = 1000
    starts = eval_starts(n, 32, None)
    assert len(starts) == (n - 1) // 32 and np.all(np.diff(starts) == 32)
    some = eval_starts(n, 32, 10)
    assert len(some) == 10 and np.all(np.diff(some) >= 32) and some[-1] + 33 <= n
    inst0, inst1 = _instance(data_dir), _instance(data_dir, seed=5)
    b0, b1 = list(inst0.eval_batches("val")), list(inst1.eval_batches("val"))
    assert len(b0) == 8 and all(torch.equal(p[0], q[0]) for p, q in zip(b0, b1))


def test_missing_token_dir_gives_a_clear_error(tmp_path, data_dir):
    with pytest.raises(MissingTokensError) as err:
        _instance(tmp_path, task="openwebtext_gpt2s")
    msg = str(err.value)
    where = str(token_dir(tmp_path, "openwebtext", "local-bpe"))
    assert where in msg and "meta.json" in msg and "train.bin" in msg and "val.bin" in msg
    assert "python -m studies prepare openwebtext --tokenizer local-bpe" in msg
    # a truncated file is caught too
    bad = tmp_path / "copy"
    bad.mkdir()
    src = token_dir(data_dir, "wikitext2", "word")
    for name in ("meta.json", "train.bin", "val.bin"):
        (bad / name).write_bytes((src / name).read_bytes()[: None if name != "val.bin" else 10])
    with pytest.raises(MissingTokensError, match="val.bin"):
        load_tokens(bad)


# --------------------------------------------------------------------------
# models and tasks
@pytest.mark.parametrize("task", ["wikitext2_transformer", "wikitext103_llama60m", "openwebtext_gpt2s"])
def test_models_are_causal(data_dir, task):
    torch.manual_seed(0)
    inst = _instance(data_dir, task=task)
    inst.model.eval()
    x, _ = inst.train_batch(0)
    x2 = x.clone()
    x2[:, 20:] = (x2[:, 20:] + 1) % inst.data.vocab_size
    with torch.no_grad():
        a, b = inst.forward(inst.model, x), inst.forward(inst.model, x2)
    assert a.shape == (inst.batch_size, 32, inst.num_classes)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


@pytest.mark.parametrize("task", TEXT_TASKS)
def test_tasks_train_through_the_loop(data_dir, task):
    torch.set_num_threads(1)
    from studies._ire_common import LLM_ADAMW  # the language-model studies' AdamW (a task names no optimizer)

    run = Run("adamw", {"task": task, "size": "smoke", "data_dir": str(data_dir), "steps": 40, "eval_every": 20,
                        **LLM_ADAMW, "lr": 3e-3, "warmup_steps": 4})
    assert run.config["lr_schedule"] == "warmup_cosine" and run.config["max_grad_norm"] == 1.0
    assert run.config["betas"] == (0.9, 0.95) and run.config["lr_min_ratio"] > 0
    start = run.task.evaluate(run.model, "val")
    assert abs(start["val/loss"] - math.log(run.task.num_classes)) < 1.0  # near uniform at init
    reports = list(run.reports())
    assert [r["step"] for r in reports] == [20, 40]
    last = reports[-1]
    assert last["diverged"] == 0.0 and 0.0 <= last["val/accuracy"] <= 1.0
    assert last["val/perplexity"] == pytest.approx(math.exp(last["val/loss"]))
    assert last["val/loss"] < start["val/loss"] - 1.0, (start, last)
    assert last["best/val/loss"] == min(r["val/loss"] for r in reports)
    assert run.task_def.metric == "val/loss" and run.task_def.mode == "min"


def test_vocab_size_padding_and_validation(data_dir):
    inst = _instance(data_dir)
    assert inst.num_classes % 64 == 0 and inst.num_classes >= inst.data.vocab_size
    assert _instance(data_dir, task="wikitext2_transformer").num_classes == load_tokens(
        token_dir(data_dir, "wikitext2", "word")).vocab_size
    with pytest.raises(ConfigError, match="vocab_size=10"):
        _instance(data_dir, vocab_size=10)
    with pytest.raises(ConfigError, match="n_heads=3"):
        _instance(data_dir, n_heads=3)


@pytest.mark.parametrize("preset,target", [("llama60m", 60e6), ("llama119m", 119e6), ("llama229m", 229e6)])
def test_llama_paper_parameter_counts(preset, target):
    shape = LLAMA_PRESETS[preset]
    n = count_parameters(build_llama, **shape)
    assert n == llama_param_formula(**shape)
    assert abs(n - target) / target < 0.01, n


def test_gpt2_small_parameter_count_and_task_paper_shapes():
    n = count_parameters(build_gpt2, **GPT2_SMALL)
    assert n == gpt2_param_formula(**GPT2_SMALL) and abs(n - 124e6) / 124e6 < 0.01
    expected = {"wikitext103_llama60m": "llama60m", "minipile_llama119m": "llama119m",
                "openwebtext_llama229m": "llama229m"}
    for task, preset in expected.items():
        c = resolve_config("adamw", {"task": task})
        shape = {k: c[k] for k in ("d_model", "n_layers", "n_heads", "d_mlp", "context")}
        assert {**shape, "vocab_size": 50304} == LLAMA_PRESETS[preset]
        assert c["max_grad_norm"] == 1.0  # lr 6e-4 and weight decay 0.1: the ire_llama study's recipe
    c = resolve_config("adamw", {"task": "wikitext2_transformer"})
    assert (c["d_model"], c["n_layers"], c["n_heads"], c["d_mlp"], c["batch_size"]) == (128, 2, 8, 512, 32)
    assert (c["steps"], c["warmup_steps"], c["lr_min_ratio"]) == (100_000, 3000, 0.05)
    c = resolve_config("adamw", {"task": "openwebtext_gpt2s"})
    assert (c["steps"], c["warmup_steps"]) == (200_000, 5000)


def test_resume_continues_bit_for_bit(data_dir):
    torch.set_num_threads(1)
    config = {"task": "wikitext2_transformer", "size": "smoke", "data_dir": str(data_dir), "steps": 20,
              "eval_every": 10, "dropout": 0.1, "lr": 3e-3}
    straight = Run("adamw", config)
    want = list(straight.reports())[-1]
    first = Run("adamw", config)
    next(first.reports())
    state = first.state_dict()
    resumed = Run("adamw", config)
    resumed.load_state_dict(state)
    got = list(resumed.reports())[-1]
    assert got["val/loss"] == want["val/loss"] and got["train/loss"] == want["train/loss"]


def test_paper_settings_of_the_text_studies():
    """The papers' settings are the studies' recipes (a task names no method): each cell's first config."""
    from studies import get_study
    from studies.spec import first_config

    llama = get_study("ire_llama")
    c = first_config(llama, llama.cell("wikitext103_llama60m-adamw_ire"), "paper")
    assert (c["ire_rank"], c["ire_prog"], c["ire_start"]) == (0.4, 3.0, c["warmup_steps"])
    assert (c["lr"], tuple(c["betas"]), c["regularize_embedding"], c["weight_decay"]) == (6e-4, (0.9, 0.95), True, 0.1)
    assert first_config(llama, llama.cell("openwebtext_llama229m-adamw_ire"), "smoke")["ire_start"] == 6
    wt2 = get_study("ire_wikitext2")
    c = first_config(wt2, wt2.cell("wikitext2_transformer-adamw_ire"), "paper")
    assert (c["ire_rank"], c["ire_prog"], c["ire_prog_decay"], c["ire_start"]) == (0.01, 5.0, True, 3000)
    gpt2 = get_study("cpr_gpt2")
    c = first_config(gpt2, gpt2.cell("adamcpr_warm_start"), "paper")
    assert (c["kappa_init_method"], c["kappa_init_param"]) == ("warm_start", 5000)
    assert first_config(gpt2, gpt2.cell("adamw"), "paper")["weight_decay"] == 1e-2
    # the task alone starts IRE nowhere in particular: no paper's setting outside its study
    assert resolve_config("adamw_ire", {"task": "wikitext103_llama60m"})["ire_start"] is None
