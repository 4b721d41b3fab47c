"""AdamCPR speed: optimizer-step time against torch AdamW (same foreach setting) and
against the reference package ``pytorch_cpr.AdamCPR``, measured in one run on the
same model and gradients; and grokking training steps per second.

    python benchmarks/bench_cpr.py [--threads 1] [--steps 200]

Targets (issue: foundation): AdamCPR within 1.15x of AdamW, and no slower than the
reference package. Interleaved rounds, median per round, so drift on a shared
machine hits all optimizers alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from regtune.loop import Run
from regtune.optim import AdamCPR, cpr_param_groups, decay_param_groups
from regtune.tasks.grokking import GrokkingTransformer


def models():
    torch.manual_seed(0)
    yield "grokking transformer (d 128)", GrokkingTransformer(114, 128, 4, 512)
    layers = []
    for _ in range(24):
        layers += [nn.Linear(256, 256), nn.LayerNorm(256)]
    yield "MLP 24x256 + LayerNorm (72 tensors)", nn.Sequential(*layers)


def make_optimizers(model, foreach):
    def adamw():
        groups, _ = decay_param_groups(model, weight_decay=0.1, regularize_embedding=True)
        return torch.optim.AdamW(groups, lr=1e-3, foreach=foreach)

    def ours():
        groups, _ = cpr_param_groups(model, regularize_embedding=True)
        return AdamCPR(groups, lr=1e-3, kappa_init_method="dependent", kappa_init_param=0.8, foreach=foreach)

    out = {"torch AdamW": adamw, "regtune AdamCPR": ours}
    try:
        import pytorch_cpr

        def ref():
            groups, _ = cpr_param_groups(model, regularize_embedding=True)
            return pytorch_cpr.AdamCPR(groups, lr=1e-3, kappa_init_method="dependent", kappa_init_param=0.8,
                                       foreach=foreach)

        out["pytorch_cpr AdamCPR"] = ref
    except ImportError:
        pass
    return out


def time_steps(model, make, steps):
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = make()
    for _ in range(5):
        opt.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps


def bench_optimizers(steps, rounds):
    rows = []
    for name, model in models():
        for foreach in (False, True):
            makers = make_optimizers(model, foreach)
            times = {k: [] for k in makers}
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            for _ in range(rounds):
                for k, make in makers.items():
                    model.load_state_dict(state)
                    times[k].append(time_steps(model, make, steps))
            med = {k: statistics.median(v) for k, v in times.items()}
            base = med["torch AdamW"]
            for k, v in med.items():
                rows.append((name, foreach, k, v * 1e3, v / base, v / med.get("pytorch_cpr AdamCPR", float("nan"))))
    return rows


def bench_grokking(steps):
    rows = []
    for method in ("adamw", "adam_rescale", "adamcpr"):
        run = Run(method, {"task": "grokking", "steps": steps, "eval_every": steps})
        run.train_steps(5)
        t0 = time.perf_counter()
        run.train_steps(steps)
        rows.append((method, steps / (time.perf_counter() - t0)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per timing")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--grok-steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU\n")
    print(f"{'model':38s} {'foreach':7s} {'optimizer':20s} {'ms/step':>8s} {'/AdamW':>7s} {'/pytorch_cpr':>12s}")
    for name, foreach, opt, ms, r_adamw, r_ref in bench_optimizers(args.steps, args.rounds):
        print(f"{name:38s} {str(foreach):7s} {opt:20s} {ms:8.3f} {r_adamw:7.3f} {r_ref:12.3f}")
    print(f"\n{'grokking (paper size, batch 512)':38s} {'steps/s':>8s}")
    for method, sps in bench_grokking(args.grok_steps):
        print(f"{method:38s} {sps:8.1f}")


if __name__ == "__main__":
    main()
