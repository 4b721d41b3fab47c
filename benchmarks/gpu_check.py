"""One command that exercises every CUDA path of regtune, in at most ~8 minutes on one GPU, and writes one
markdown table:

* every registered method (``regtune.methods.method_names()``) for a few steps on its smallest task
  (the cheapest task the study catalog pairs it with, smoke size, generated data) on ``cuda``, with the
  task's bf16 autocast where it has one: finite loss, s/step, peak GPU memory;
* fractional-GPU trial packing: the ``cpr_grokking`` smoke study with 4 trials per cell sharing one GPU
  (``gpu: 0.25``, memory capped per trial) against one trial at a time (``gpu: 1``): trials/hour of each;
* the GPU ratios of the benchmarks, through their own functions: micro-batch penalties vs ``pseudo_gd``
  (ResNet-18 widths 0.25 and 1, ``bench_penalties``), AdamCPR vs AdamW optimizer step (``bench_cpr``),
  IRE / SAM vs base optimizers (``bench_ire``), LLaMA-60M tokens/s (``bench_llama``).

Without CUDA it says so, runs the CPU part (every method for 1 step on CPU) and exits 0 (1 if a method fails).

    python benchmarks/gpu_check.py [--out gpu_check.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

# cheapest first: a method runs on the first of these that the study catalog pairs it with
CHEAP_TASKS = ["grokking", "wikitext2_transformer", "cifar10_vgg11", "cifar10_resnet18", "cifar100_resnet18",
               "cifar10_resnet56", "cifar100_resnet56", "cifar100_resnet18_cpr", "cifar100_vit_t", "cifar10_vgg16",
               "cifar100_vgg16", "cifar100_vit_s", "wikitext103_llama60m", "cifar10_wrn28_10", "cifar100_wrn28_10",
               "minipile_llama119m", "openwebtext_gpt2s", "openwebtext_llama229m", "imagenet_vit_s",
               "imagenet_resnet50"]


def smallest_tasks() -> dict[str, str]:
    """method -> its cheapest task in the study catalog (grokking for a method no study uses)."""
    from regtune.methods import method_names
    from studies import get_study, study_names

    pairs: dict[str, set[str]] = {}
    for s in study_names():
        for cell in get_study(s).cells:
            pairs.setdefault(cell.method, set()).add(cell.task)
    rank = {t: i for i, t in enumerate(CHEAP_TASKS)}
    return {m: min(pairs.get(m, {"grokking"}), key=lambda t: rank.get(t, len(rank))) for m in method_names()}


def make_data(root: Path, tasks: set[str]) -> None:
    from regtune.data.cifar import write_fake_cifar
    from regtune.data.imagenet import write_fake_imagenet
    from regtune.data.synthetic_text import make_smoke_data

    if any(t.startswith("cifar10_") for t in tasks):
        write_fake_cifar(root, "cifar10", n_train=512, n_test=128, seed=0)
    if any(t.startswith("cifar100_") for t in tasks):
        write_fake_cifar(root, "cifar100", n_train=512, n_test=128, seed=1)
    if any(t.startswith("imagenet_") for t in tasks):
        write_fake_imagenet(root)
    if any(t.startswith(("wikitext", "minipile", "openwebtext")) for t in tasks):
        make_smoke_data(root, train_lines=1500, val_lines=200, vocab_size=384)


def check_methods(device: str, steps: int, data: Path) -> list[tuple[str, str, str, bool]]:
    from regtune.loop import Run
    from regtune.microbatch import REFERENCE_KEY
    from regtune.tasks import get_task

    warmup = 1 if device == "cuda" else 0
    tasks = smallest_tasks()
    make_data(data, set(tasks.values()))
    rows = []
    for method, task in sorted(tasks.items()):
        what = f"`{method}` on `{task}` (smoke), {steps} step{'s' if steps > 1 else ''} on {device}"
        try:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            config = {"task": task, "size": "smoke", "steps": steps + warmup, "eval_every": steps + warmup,
                      "device": device}
            if "data_dir" in {h.name for h in get_task(task).hparams}:
                config["data_dir"] = str(data)
            run = Run(method, config)
            run.ctx.extras.setdefault(REFERENCE_KEY, {0: 1.0})  # exter_graft: a reference run's gradient norms
            if warmup:
                run.train_steps(warmup)  # allocations, kernels, cudnn autotuning
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            metrics = run.train_steps(steps)
            if device == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / steps
            loss = metrics.get("train/loss", math.nan)
            bf16 = run.config.get("autocast_bf16") and run.device.type == "cuda"
            mem = f", peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device == "cuda" else ""
            ok = math.isfinite(loss) and run.device.type == device
            rows.append(("method", what + (" (bf16 autocast)" if bf16 else ""),
                         f"{dt * 1e3:.1f} ms/step, loss {loss:.3g}{mem}", ok))
        except Exception as e:  # noqa: BLE001 - one failing method is a row, not the end of the check
            rows.append(("method", what, f"{type(e).__name__}: {str(e).splitlines()[0][:150]}", False))
    return rows


def check_packing(storage: Path, samples: int) -> list[tuple[str, str, str, bool]]:
    """cpr_grokking smoke, ``samples`` trials per cell: 4 trials per GPU vs one at a time."""
    import dataclasses

    import pandas as pd

    from studies import get_study
    from studies.engine.driver import run_study

    rows, rate = [], {}
    for label, gpu, conc in (("4 per GPU (gpu 0.25)", 0.25, 4), ("one at a time (gpu 1)", 1.0, 1)):
        study = dataclasses.replace(get_study("cpr_grokking"), resources=lambda task, scale, g=gpu: {"cpu": 1, "gpu": g})
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            sdir = run_study(study, "smoke", storage=str(storage / label.split()[0]), num_samples=samples,
                             max_concurrent=conc, log=lambda m: None)
        wall = time.perf_counter() - t0
        trials = pd.read_parquet(sdir / "trials.parquet")
        rate[label] = len(trials) / wall * 3600
        ok = len(trials) == 3 * samples and set(trials["status"]) <= {"completed", "stopped"}
        rows.append(("packing", f"cpr_grokking smoke, {len(trials)} trials, {label}",
                     f"{rate[label]:.0f} trials/hour ({wall:.0f} s with Ray start)", ok))
    a, b = rate.values()
    rows.append(("packing", "trials/hour, packed / one at a time", f"{a / b:.2f}x", a > b))
    return rows


def check_benchmarks() -> list[tuple[str, str, str, bool]]:
    import statistics

    import bench_cpr
    import bench_ire
    import bench_llama
    import bench_penalties

    cuda = torch.device("cuda")
    rows = []
    args = Namespace(batch=1024, micro=128, steps=3, warmup=1)
    for width in (0.25, 1.0):
        base = bench_penalties.time_variant(width, None, False, args, cuda)
        for name, penalty, measure in bench_penalties.VARIANTS[1:]:
            t = bench_penalties.time_variant(width, penalty, measure, args, cuda)
            rows.append(("penalties", f"ResNet-18 width {width:g}, batch 1024 / micro 128: {name} / pseudo_gd",
                         f"{t / base:.2f}x ({t * 1e3:.0f} ms/step)", t / base <= 2.5))
    for name, model in bench_cpr.models():
        model.to(cuda)
        makers = bench_cpr.make_optimizers(model, True)
        times = {k: [] for k in makers}
        for _ in range(3):
            for k, make in makers.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                bench_cpr.time_steps(model, make, 100)
                torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["regtune AdamCPR"] / med["torch AdamW"]
        rows.append(("cpr", f"{name}: AdamCPR / AdamW step (foreach)", f"{ratio:.2f}x", ratio <= 1.15))
    out = io.StringIO()
    argv = sys.argv
    sys.argv = ["bench_ire.py", "--device", "cuda", "--steps", "20", "--rounds", "3"]
    try:
        with contextlib.redirect_stdout(out):
            bench_ire.main()
    finally:
        sys.argv = argv
    for line in out.getvalue().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] in ("sgd_ire", "adamw_ire", "sam"):
            ratio = float(parts[3])
            ok = ratio <= 1.15 if parts[0] != "sam" else 1.5 <= ratio <= 2.5
            rows.append(("ire", f"ResNet-56 batch 128: {parts[0]} / {parts[2]}", f"{ratio:.2f}x", ok))
    with tempfile.TemporaryDirectory() as tmp:
        from regtune.data.synthetic_text import make_smoke_data

        make_smoke_data(tmp, ["wikitext103"], train_lines=3000, val_lines=300)
        r = bench_llama.measure("wikitext103_llama60m", tmp, device="cuda", batch_size=16, context=1024, steps=5)
    rows.append(("llama", f"LLaMA-60M ({r['params_M']:.1f}M), batch 16 x 1024, AdamW, bf16",
                 f"{r['tokens_per_s']:,.0f} tokens/s", math.isfinite(r["train_loss"])))
    return rows


def table(rows: list[tuple[str, str, str, bool]], header: str) -> str:
    lines = [header, "", "| part | check | result | ok |", "|---|---|---|---|"]
    lines += [f"| {p} | {w} | {r} | {'yes' if ok else '**NO**'} |" for p, w, r, ok in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.md", help="the markdown table (default: ./gpu_check.md)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per method")
    ap.add_argument("--samples", type=int, default=4, help="trials per cell in the packing study")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if not torch.cuda.is_available():
            print("no CUDA device: running the CPU part only (every method, 1 step on CPU)", flush=True)
            rows = check_methods("cpu", 1, Path(tmp) / "data")
            header = f"# gpu_check: no CUDA (CPU part only), torch {torch.__version__}"
        else:
            name = torch.cuda.get_device_name(0)
            print(f"CUDA: {name}", flush=True)
            rows = check_methods("cuda", args.steps, Path(tmp) / "data")
            rows += check_packing(Path(tmp) / "studies", args.samples)
            rows += check_benchmarks()
            header = f"# gpu_check: {name}, torch {torch.__version__}"
    header += f", {time.perf_counter() - started:.0f} s"
    md = table(rows, header)
    Path(args.out).write_text(md)
    print(md)
    print(f"written: {args.out}")
    failed = [r for r in rows if not r[3]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
