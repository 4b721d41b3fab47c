"""cpr_gpt2: AdamW vs AdamCPR (warm_start, inflection_point) on GPT-2 small / OpenWebText, perplexity.

Franke et al., "Constrained Parameter Regularization", NeurIPS 2024,
https://arxiv.org/abs/2311.09058 (METHODS.md section 1): GPT-2 small on
OpenWebText, 200k steps, 5k warmup, cosine. Published validation perplexity:
AdamW (weight decay 1e-2) 18.23; AdamCPR warm_start (s = 5k steps) 18.02;
AdamCPR inflection_point (Kappa-IP) 17.94. The task is ``openwebtext_gpt2s``
(``regtune.tasks.text``); the report shows validation perplexity beside the
validation loss.

Searched: lr (all cells), weight decay (AdamW), the warm-start step s
(0.5x..8x the 5k-step warmup). Kappa-IP samples R(W) every 500 steps (10% of
the warmup, as the paper). The smoke scale fixes s = 12 steps (2x its 6-step
warmup) and samples R every step, so the constraint acts within 60 steps.

Paper scale: each trial is a data-parallel Ray Train job of 8 workers, one GPU
each (the GPU count of the CPR seed README for GPT-2); the global batch stays
480 x 1024 tokens (60 sequences a worker, in ``accum_steps`` chunks).

Where we knowingly differ: the paper's lr, batch size and lr floor are not in
METHODS.md; we use the task's nanoGPT-style defaults (lr 6e-4, 480 x 1024
tokens a step, cosine to lr/10) as Optuna's first point.
"""

from __future__ import annotations

from regtune.space import IntUniform
from studies._ire_common import ADAM_LR, LLM_ADAMW, WEIGHT_DECAY, cell, resources, text_prepare
from studies.spec import Scale, Study

TASK = "openwebtext_gpt2s"
COL = "GPT-2 small, OpenWebText: val perplexity"
SOURCE = "CPR paper, GPT-2 small on OpenWebText (perplexity)"
PAPER = "Franke et al., Constrained Parameter Regularization, NeurIPS 2024 (arXiv:2311.09058)"
WARMUP = 5000
RECIPE = {"steps": 200_000, "warmup_steps": WARMUP, "lr_schedule": "warmup_cosine"}
SMOKE_WARMUP = 6  # the task's smoke preset
PAPER_GPUS = 8  # the CPR seed README: "for the GPT2 experiments: Ampere, Ada, or Hopper and 8 GPUs"

CELLS = (
    cell(TASK, "adamw", COL, name="adamw", recipe=LLM_ADAMW, space={"lr": ADAM_LR, "weight_decay": WEIGHT_DECAY},
         point={"lr": 6e-4, "weight_decay": 1e-2}, published=18.23, source=SOURCE, metric="val/perplexity",
         published_config={**RECIPE, "weight_decay": 1e-2}, row="AdamW (wd 1e-2)"),
    cell(TASK, "adamcpr", COL, recipe=LLM_ADAMW,
         space={"lr": ADAM_LR, "kappa_init_method": "warm_start",
                "kappa_init_param": IntUniform(WARMUP // 2, 8 * WARMUP)},
         point={"lr": 6e-4, "kappa_init_param": WARMUP}, published=18.02, source=SOURCE,
         metric="val/perplexity", published_config={**RECIPE, "kappa_init_method": "warm_start",
                                                     "kappa_init_param": WARMUP},
         row="AdamCPR warm_start 5k", name="adamcpr_warm_start"),
    cell(TASK, "adamcpr", COL, recipe=LLM_ADAMW,
         space={"lr": ADAM_LR, "kappa_init_method": "inflection_point", "kappa_init_param": 1.0,
                "reg_step_size": WARMUP // 10},
         point={"lr": 6e-4}, published=17.94, source=SOURCE, metric="val/perplexity",
         published_config={**RECIPE, "kappa_init_method": "inflection_point", "reg_step_size": WARMUP // 10},
         row="AdamCPR inflection_point", name="adamcpr_inflection_point"),
)

STUDY = Study(
    name="cpr_gpt2",
    doc="CPR GPT-2 small on OpenWebText: AdamW vs AdamCPR warm_start / inflection_point (perplexity).",
    paper=f"{PAPER}, GPT-2 small on OpenWebText",
    cells=CELLS,
    scales={
        "paper": Scale(num_samples=4, fixed={"size": "paper", "workers": PAPER_GPUS},
                       doc="the paper's budget: 200k steps, 5k warmup, context 1024, 4 trials a cell, each a Ray "
                           "Train job on 8 GPUs as the paper; tokens made once with `python -m studies prepare "
                           "openwebtext`"),
        "smoke": Scale(num_samples=1, fixed={"size": "smoke", "steps": 60, "eval_every": 12}, grace_fraction=1 / 2,
                       space={"adamcpr_warm_start": {"kappa_init_param": 2 * SMOKE_WARMUP},
                              "adamcpr_inflection_point": {"reg_step_size": 1}},
                       doc="CI-sized: generated text, a local BPE of 512 tokens, a 2-layer GPT-2 of width 32, 60 steps"),
    },
    default_scale="paper",
    report_metrics=("val/loss", "val/perplexity"),
    prepare=text_prepare("openwebtext"),
    resources=resources,
    notes="Published: CPR paper, validation perplexity after 200k steps: AdamW 18.23, AdamCPR warm_start 18.02, "
          "AdamCPR inflection_point 17.94. The best trial of a cell is picked on validation loss.",
)
