"""Cost of IRE and SAM relative to their base optimizers, measured in one run on one model.

IRE (Wang et al., NeurIPS 2024, arXiv:2405.20763) targets about +10% compute:
one extra forward/backward every ``ire_interval`` (K = 10) steps plus a few
elementwise passes over the parameters per step. SAM (arXiv:2010.01412) costs
about 2x (two forward/backward passes per step). This script times the full
training step (``regtune.step.standard_step``: forward, backward, hooks,
optimizer) on synthetic CIFAR-shaped data and prints amortized time per step
and the ratio to the base optimizer:

    python benchmarks/bench_ire.py                       # ResNet-56, batch 128, CUDA if present
    python benchmarks/bench_ire.py --smoke               # seconds on a CPU (narrow ResNet-8)

Targets: IRE / base <= 1.15 for SGD and AdamW; SAM / SGD about 2.
Methods are timed interleaved in rounds (each round runs every method for
``--steps`` steps, a multiple of K so mask refreshes are amortized exactly)
and the median round is reported, which damps drift on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from regtune.models.resnet_cifar56 import resnet56_cifar
from regtune.optim import IRE, SAM
from regtune.step import StepContext, standard_step


class SyntheticCifar:
    """Random CIFAR-shaped batches on the device (TaskInstance contract: forward / criterion)."""

    def __init__(self, batch: int, classes: int, device: torch.device):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
        self.y = torch.randint(0, classes, (batch,), generator=g).to(device)

    def forward(self, model, inputs):
        return model(inputs)

    def criterion(self, logits, targets):
        return F.cross_entropy(logits, targets, label_smoothing=0.1)


def make_optimizer(name: str, model: torch.nn.Module, interval: int) -> torch.optim.Optimizer:
    def sgd():
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def adamw():
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    ire = {"ire_rank": 0.2, "ire_prog": 2.0, "ire_interval": interval}
    return {
        "sgd": sgd, "adamw": adamw,
        "sgd_ire": lambda: IRE(sgd(), **ire),
        "adamw_ire": lambda: IRE(adamw(), **ire),
        "sam": lambda: SAM(sgd(), rho=0.05, model=model),
    }[name]()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=56)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--interval", type=int, default=10, help="IRE mask refresh interval K")
    ap.add_argument("--steps", type=int, default=20, help="steps per method per round (multiple of K)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps (CPU CI)")
    args = ap.parse_args()
    if args.smoke:
        args.depth, args.width, args.batch, args.steps, args.rounds = 8, 0.5, 32, 10, 3
    if args.steps % args.interval:
        ap.error(f"--steps={args.steps} must be a multiple of --interval={args.interval}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.backends.cudnn.benchmark = True

    names = ["sgd", "sgd_ire", "adamw", "adamw_ire", "sam"]
    task = SyntheticCifar(args.batch, 100, device)
    setups = {}
    for name in names:
        torch.manual_seed(0)
        model = resnet56_cifar(100, depth=args.depth, width=args.width).to(device)
        opt = make_optimizer(name, model, args.interval)
        ctx = StepContext(model, opt, task, {"max_grad_norm": None}, device,
                          generator=torch.Generator().manual_seed(1))
        setups[name] = ctx
    n_params = sum(p.numel() for p in setups["sgd"].model.parameters())

    def run(name: str, steps: int) -> float:
        ctx = setups[name]
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            standard_step(ctx, (task.x, task.y))
            ctx.step += 1
        sync(device)
        return (time.perf_counter() - t0) / steps

    for name in names:  # warm-up (allocations, cudnn autotuning, first IRE mask)
        run(name, args.interval)
    per_step: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            per_step[name].append(run(name, args.steps))
    med = {n: statistics.median(v) for n, v in per_step.items()}

    base_of = {"sgd": "sgd", "sgd_ire": "sgd", "adamw": "adamw", "adamw_ire": "adamw", "sam": "sgd"}
    target = {"sgd_ire": "<= 1.15", "adamw_ire": "<= 1.15", "sam": "~ 2"}
    print(f"ResNet-{args.depth} width {args.width:g} ({n_params:,} parameters), batch {args.batch}, {device.type}"
          f" ({torch.get_num_threads()} threads), K={args.interval}, median of {args.rounds} rounds x"
          f" {args.steps} steps")
    print(f"{'method':<10} {'ms/step':>9} {'base':>6} {'ratio':>7} {'target':>8}")
    for name in names:
        ratio = med[name] / med[base_of[name]]
        print(f"{name:<10} {1e3 * med[name]:>9.2f} {base_of[name]:>6} {ratio:>7.3f} {target.get(name, ''):>8}")


if __name__ == "__main__":
    main()
