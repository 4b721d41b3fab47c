"""Training throughput (tokens/second) of the LLaMA-60M task (IRE paper, arXiv:2405.20763).

Runs the paper-shaped model of ``wikitext103_llama60m`` (59.9M parameters,
vocabulary 50304) through ``regtune.loop.Run`` with AdamW on generated text
tokenized by a small local BPE (the model keeps the paper's 50304-way output,
so the cost per token is the paper's), for a few steps at a small batch, and
prints one table row per configuration. The first step is a warm-up and is not
timed. On CUDA the task's bf16 autocast is on.

    python benchmarks/bench_llama.py                    # CPU, a few steps
    python benchmarks/bench_llama.py --device cuda --batch-size 16 --context 1024
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from regtune.data.synthetic_text import make_smoke_data
from regtune.loop import Run


def measure(task: str, data_dir: str, *, device: str, batch_size: int, context: int, steps: int) -> dict:
    run = Run("adamw", {"task": task, "data_dir": data_dir, "tokenizer": "local-bpe", "vocab_size": 50304,
                        "batch_size": batch_size, "context": context, "steps": steps + 1, "device": device,
                        "warmup_steps": 1})
    params = sum(p.numel() for p in run.model.parameters())
    run.train_steps(1)  # warm-up (allocations, kernels)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    metrics = run.train_steps(steps)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    return {"device": run.device.type, "threads": torch.get_num_threads(), "params_M": params / 1e6,
            "batch": batch_size, "context": context, "s_per_step": seconds,
            "tokens_per_s": batch_size * context / seconds, "train_loss": metrics.get("train/loss", float("nan"))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="wikitext103_llama60m")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[2])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--data-dir", help="where smoke token files live (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or tmp
        make_smoke_data(data_dir, ["wikitext103"], train_lines=3000, val_lines=300)
        rows = [measure(args.task, data_dir, device=args.device, batch_size=b, context=args.context,
                        steps=args.steps) for b in args.batch_size]
    header = f"{'task':<22}{'device':<8}{'threads':>8}{'params':>9}{'batch':>7}{'context':>9}{'s/step':>9}{'tok/s':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{args.task:<22}{r['device']:<8}{r['threads']:>8}{r['params_M']:>8.1f}M{r['batch']:>7}"
              f"{r['context']:>9}{r['s_per_step']:>9.3f}{r['tokens_per_s']:>10.0f}")


if __name__ == "__main__":
    main()
