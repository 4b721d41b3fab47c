"""cpr_grokking: AdamW vs Adam + rescaling vs AdamCPR on modular addition.

CPR paper (Franke et al., NeurIPS 2024, arXiv:2311.09058), grokking figure:
AdamCPR (dependent kappa, factor 0.8) reaches high validation accuracy far
earlier than AdamW (weight decay 0.1), without the long grokking delay. The
paper gives a figure, no table: the report shows steps to 95% validation
accuracy and the final validation accuracy, and plots the curves.
"""

from __future__ import annotations

from regtune.space import LogUniform
from studies.spec import Cell, Scale, Study

LR = LogUniform(1e-4, 1e-2)

STUDY = Study(
    name="cpr_grokking",
    doc="Grokking (x + y mod 113): AdamW vs Adam + rescaling vs AdamCPR.",
    paper="Franke et al., Constrained Parameter Regularization, NeurIPS 2024 (arXiv:2311.09058), grokking figure",
    cells=(
        Cell("adamw", "grokking", "adamw",
             space={"lr": LR, "weight_decay": LogUniform(1e-3, 1.0)},
             points=({"lr": 1e-3, "weight_decay": 0.1},),
             published_config={"lr": 1e-3, "weight_decay": 0.1}),
        Cell("adam_rescale", "grokking", "adam_rescale",
             space={"lr": LR, "rescale_alpha": LogUniform(0.5, 16.0)},
             points=({"lr": 1e-3, "rescale_alpha": 0.8},),
             published_config={"lr": 1e-3, "rescale_alpha": 0.8}),
        Cell("adamcpr", "grokking", "adamcpr",
             space={"lr": LR, "kappa_init_method": "dependent", "kappa_init_param": LogUniform(0.5, 256.0)},
             points=({"lr": 1e-3, "kappa_init_param": 0.8},),
             published_config={"lr": 1e-3, "kappa_init_method": "dependent", "kappa_init_param": 0.8}),
    ),
    scales={
        # grace 1/3 (issue 12): grokking trials generalize late. With the first rung at 1/8 of the budget, 12-19% of
        # the trials ASHA (on validation accuracy) stopped would have reached 95%, about half of all trials that
        # would (benchmarks/bench_search.py, recorded curves); with the first rung at 1/3, 1 of 107 stopped
        "paper": Scale(num_samples=16, fixed={"size": "paper", "steps": 8000, "eval_every": 100},
                       grace_fraction=1 / 3,
                       doc="the paper's budget: 8000 steps (1000 epochs), batch 512"),
        # the main job: the search (2 trials a cell) and its confirm phase (3 seeds a cell, full budget) must fit
        # in 20 minutes on two CPU cores; 3000 steps keep AdamCPR's grokking (95% at about step 1,900) in view
        "laptop": Scale(num_samples=2, fixed={"size": "paper", "steps": 3000, "eval_every": 100},
                        grace_fraction=1 / 3,
                        doc="the paper's task and model, 3000 steps, 2 search trials a method: "
                            "~7-18 min on 2 CPU cores"),
        "smoke": Scale(num_samples=2, fixed={"size": "smoke", "steps": 300, "eval_every": 50},
                       grace_fraction=1 / 3,
                       doc="CI-sized: p = 31, a narrow model, 300 steps"),
    },
    default_scale="laptop",
    threshold=("val/accuracy", 0.95),
    notes="Published: figure only (qualitative) - AdamCPR groks without AdamW's delay; compare 'steps to'.",
)
