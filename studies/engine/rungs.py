"""The rule by which ASHA stopped a study's trials, in words, for the study's report.

Grokking is the worst case for early stopping on validation accuracy: a trial that generalizes late looks
hopeless at the first rungs (``benchmarks/bench_search.py`` measures how often ASHA stops such a trial). The
report therefore says which metric the rungs compared and when the first rung came.
"""

from __future__ import annotations

from regtune.tasks.base import get_task
from studies.spec import Study


def rung_note(study: Study, scale: str) -> str:
    sc = study.scales[scale]
    metrics = sorted({f"{get_task(c.task).metric} ({get_task(c.task).mode})" for c in study.cells})
    return (f"Early stopping (search phase): ASHA per cell, rungs on {', '.join(metrics)} at the optimizer step "
            f"(time_attr step, max_t = the cell's budget); first rung (grace period) at {sc.grace_fraction:.3g} of "
            f"the budget, reduction factor {sc.reduction_factor}. Confirm runs are not stopped early.")


def grace_steps(budget: int, fraction: float, eval_every: int) -> int:
    """ASHA's grace period in steps: ``fraction`` of the budget, on the report grid, at least one report."""
    return min(budget, max(eval_every, int(round(budget * fraction / eval_every)) * eval_every))
