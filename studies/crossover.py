"""crossover: every method family of the three papers, and their compositions, on one task.

No paper has this table. The CPR paper (Franke et al., arXiv:2311.09058) compares AdamW, Adam + rescaling and
AdamCPR; the implicit-regularization paper (Novack et al., arXiv:2211.15853) small-batch SGD, large-batch SGD and
its micro-batch penalties; the IRE paper (Wang et al., arXiv:2405.20763) SAM and IRE over SGD and AdamW. Here each
of them, and the compositions no paper ran (AdamCPR + IRE, SAM over AdamCPR, AdamCPR or AdamW with the micro-batch
gradient-norm penalty), trains on the same task with the same budget, searched with its own space (the method's
default ranges; the papers' settings evaluated first) and confirmed with fresh seeds, the same way for every cell.

Tasks: grokking (x + y mod p; the CPR paper's model) at ``laptop`` scale on CPU, the default; CIFAR-100 ResNet-18
(the CPR paper's CIFAR-100 setup: 20k steps of batch 128) at ``paper`` scale on a GPU cluster. The report leads
with one table grouped by paper, then the compositions: the metric's confirm mean ± std, steps to the threshold
(mean ± std), cost per step relative to AdamW, and the confirmed configuration.

The micro-batch cells use the implicit paper's shape scaled to the task: a large batch of 4 micro-batches (grokking:
512 = 4 x 128; CIFAR: 512 = 4 x 128), small-batch SGD at the micro-batch size.
"""

from __future__ import annotations

from typing import Any

from regtune.space import IntUniform, LogUniform
from studies import cpr_cifar100, cpr_grokking, implicit_main
from studies._cifar import resources
from studies.spec import Cell, Scale, Study

CPR, IMPLICIT, IRE_SAM, COMPOSED = "CPR (Franke et al.)", "implicit SGD (Novack et al.)", "IRE / SAM (Wang et al.)", \
    "compositions"

ADAM_LR, SGD_LR = LogUniform(1e-4, 1e-2), LogUniform(1e-3, 1.0)
DECAY = LogUniform(1e-3, 1.0)
LAMBDA = LogUniform(1e-4, 1.0)  # micro-batch penalty weight
RHO = LogUniform(0.01, 0.5)

# each cell's recipe: the papers' settings, one dict that is both the fixed config and Optuna's first point
GROK = "grokking"
CIFAR = "cifar100_resnet18_cpr"  # the CPR paper's CIFAR-100 ResNet-18 setup (20k steps of batch 128)
# the papers' settings, written in their own studies: CPR's grokking recipes (cpr_grokking), CPR's CIFAR-100 ones
# (cpr_cifar100: AdamW, rescaling, warm start), the implicit paper's small-batch SGD lr on CIFAR-100 (implicit_main);
# no paper gives SGD on grokking: lr 0.1, the implicit paper's value
RECIPES = {
    GROK: {**cpr_grokking.RECIPE, "sgd": {"lr": 0.1}},
    CIFAR: {
        **{m: dict(cpr_cifar100.STUDY.cell(c).recipe)
           for m, c in (("adamw", "adamw"), ("adam_rescale", "adam_rescale"), ("adamcpr", "adamcpr-warm_start"))},
        "sgd": {"lr": implicit_main.TABLE["cifar100_resnet18"]["sgd"][0]},
    },
}
KAPPA_SPACE = {"dependent": LogUniform(0.5, 256.0), "warm_start": IntUniform(250, 4000, log=True)}
GN = {"reg_lambda": 0.01}  # implicit paper, ResNet-18 GN penalty
SAM = {"sam_rho": 0.05}  # SAM's radius in the IRE paper's CIFAR runs
IRE = {"ire_rank": 0.2, "ire_prog": 2.0}  # IRE's defaults (the paper's LLaMA / ViT setting)
MICRO = {"batch_size": 512, "micro_batch_size": 128}  # a large batch of 4 micro-batches
SMALL = {"batch_size": 128}  # small-batch SGD: batch = micro-batch
# laptop grokking: small enough that 13 cells x (2 search + 3 confirm) trials fit on a laptop, and AdamCPR's point
# still groks (95% validation accuracy at about 500 steps; benchmarks/search_pool.py, the same task): (x + y) mod 23,
# 70% of the 529 pairs for training, one batch of all 370 (the micro-batch cells: 3 micro-batches of <= 128), width 64
LAPTOP_TASK = {"size": "paper", "modulus": 23, "train_fraction": 0.7, "d_model": 64, "d_mlp": 128, "batch_size": 512}


def _cells(task: str) -> tuple[Cell, ...]:
    r = RECIPES[task]
    adamw, cpr, sgd = r["adamw"], r["adamcpr"], r["sgd"]
    cpr_space = {"lr": ADAM_LR, "kappa_init_param": KAPPA_SPACE[cpr["kappa_init_method"]]}
    adamw_space = {"lr": ADAM_LR, "weight_decay": DECAY}

    def cell(method: str, group: str, recipe: dict[str, Any], space: dict[str, Any]) -> Cell:
        name = method if task == GROK else f"cifar100-{method}"
        return Cell(name, task, method, recipe=recipe, space=space, published_config=recipe, group=group)

    return (
        cell("adamw", CPR, adamw, adamw_space),
        cell("adam_rescale", CPR, r["adam_rescale"], {"lr": ADAM_LR, "rescale_alpha": LogUniform(0.5, 16.0)}),
        cell("adamcpr", CPR, cpr, cpr_space),
        cell("sgd", IMPLICIT, {**sgd, **SMALL}, {"lr": SGD_LR}),
        cell("pseudo_gd", IMPLICIT, {**sgd, **MICRO}, {"lr": SGD_LR}),
        cell("grad_norm", IMPLICIT, {**sgd, **GN, **MICRO}, {"lr": SGD_LR, "reg_lambda": LAMBDA}),
        cell("adamw_gn", IMPLICIT, {**adamw, **GN, **MICRO}, {**adamw_space, "reg_lambda": LAMBDA}),
        cell("sam_adamw", IRE_SAM, {**adamw, **SAM}, {**adamw_space, "sam_rho": RHO}),
        cell("adamw_ire", IRE_SAM, {**adamw, **IRE}, adamw_space),
        cell("sam_adamw_ire", IRE_SAM, {**adamw, **SAM, **IRE}, {**adamw_space, "sam_rho": RHO}),
        cell("adamcpr_ire", COMPOSED, {**cpr, **IRE}, cpr_space),
        cell("sam_adamcpr", COMPOSED, {**cpr, **SAM}, {**cpr_space, "sam_rho": RHO}),
        cell("adamcpr_gn", COMPOSED, {**cpr, **GN, **MICRO}, {**cpr_space, "reg_lambda": LAMBDA}),
    )


CELLS = _cells(GROK) + _cells(CIFAR)

STUDY = Study(
    name="crossover",
    doc="Crossover: CPR, implicit-SGD penalties, IRE/SAM and their compositions on one task, searched and confirmed.",
    paper="no paper: the families of Franke et al. (arXiv:2311.09058), Novack et al. (arXiv:2211.15853) and Wang et "
          "al. (arXiv:2405.20763) side by side, plus compositions",
    cells=CELLS,
    scales={
        "laptop": Scale(num_samples=2, fixed={**LAPTOP_TASK, "steps": 1000, "eval_every": 50}, tasks=(GROK,),
                        grace_fraction=1 / 3, confirm_seeds=3,  # grace 1/3: benchmarks/bench_search.py (grokking)
                        doc="grokking at p = 23 (70% of the pairs, full batch, width 64), 1000 steps, 2 search trials "
                            "and 3 confirm seeds a cell: ~20-40 min on 2 CPU cores"),
        "paper": Scale(num_samples=16, fixed={"size": "paper"}, tasks=(CIFAR,),
                       doc="CIFAR-100 ResNet-18 at the CPR paper's budget (20k steps), 16 trials a cell; a GPU cluster"),
        "smoke": Scale(num_samples=1, fixed={"size": "smoke", "steps": 40, "eval_every": 20}, tasks=(GROK,),
                       grace_fraction=1 / 2, doc="CI-sized: grokking at p = 31, a narrow model, 40 steps"),
    },
    default_scale="laptop",
    threshold=("val/accuracy", 0.95),
    resources=resources,
    notes="No published numbers: the table compares the families with each other. Every cell: its method's search "
          "space, the papers' settings evaluated first, the same step budget and the same confirm seeds.",
)
