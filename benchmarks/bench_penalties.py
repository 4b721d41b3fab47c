"""Step time of the micro-batch penalties relative to pseudo_gd (implicit-regularization paper).

Novack et al., arXiv:2211.15853. For ResNet-18 (CIFAR) at two widths, one
large batch of B random 32x32 images split into micro-batches of m, this
times one optimizer step of ``pseudo_gd``, ``grad_norm``, ``fisher_trace``,
``unit_jacobian`` (on a step that does not measure the micro-batch data
gradient norm, like 19 of every 20 steps) and ``fisher_trace`` on a measuring
step, all in one process, and prints each time divided by ``pseudo_gd``'s.
Target: <= 2.5x.

    python benchmarks/bench_penalties.py                  # CPU-sized defaults
    python benchmarks/bench_penalties.py --batch 5120 --micro 128 --widths 0.25 1 --steps 5   # GPU
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from regtune.microbatch import microbatch_step
from regtune.models.resnet_cifar import resnet18_cifar
from regtune.step import StepContext

VARIANTS = (
    ("pseudo_gd", None, False),
    ("grad_norm", "grad_norm", False),
    ("fisher_trace", "fisher_trace", False),
    ("unit_jacobian", "unit_jacobian", False),
    ("fisher_trace (measuring step)", "fisher_trace", True),
)


class SyntheticTask:
    num_classes = 10

    def forward(self, model, inputs):
        return model(inputs)

    def criterion(self, logits, targets):
        return F.cross_entropy(logits, targets)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variant(width: float, penalty: str | None, measure: bool, args, device: torch.device) -> float:
    torch.manual_seed(0)
    model = resnet18_cifar(10, width=width).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    config = {"micro_batch_size": args.micro, "reg_lambda": 0.01}
    ctx = StepContext(model, opt, SyntheticTask(), config, device, generator=torch.Generator().manual_seed(0))
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    times = []
    for i in range(args.warmup + args.steps):
        ctx.step = 0 if measure else 1  # step 1: no data-gradient norm measurement for fisher / jacobian
        sync(device)
        t0 = time.perf_counter()
        microbatch_step(ctx, (x, y), penalty_kind=penalty)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]  # median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--widths", type=float, nargs="+", default=[0.0625, 0.25])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    print(f"device {device}, batch {args.batch}, micro-batch {args.micro}, median of {args.steps} steps")
    print(f"{'width':>7} {'method':<30} {'s/step':>9} {'x pseudo_gd':>12}")
    for width in args.widths:
        base = None
        for name, penalty, measure in VARIANTS:
            t = time_variant(width, penalty, measure, args, device)
            base = t if base is None else base
            print(f"{width:>7g} {name:<30} {t:>9.4f} {t / base:>11.2f}x")


if __name__ == "__main__":
    main()
