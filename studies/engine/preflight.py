"""Data before Ray: the driver checks that every cell's data sets are present and complete for the chosen
scale, before Ray starts and before anything is written to the study directory.

``check_data(study, scale, overrides)`` raises ``MissingData`` (a ``ConfigError``:
exit status 2) with one line per missing data set: which cells read it, where,
what is wrong, and the exact ``python -m studies prepare`` command that makes it.
What a cell reads comes from its task (``Task.data``, ``regtune.data.check``) and
its resolved config (data dir, tokenizer, image and token counts); the files are
only ``stat``-ed (the sizes and counts ``studies prepare`` recorded), so the check
costs well under a second.

A study whose ``prepare`` hook generates its own data at a scale (the ``smoke``
scales: small files in the real formats in the study dir) is marked with
``generates_data(scale)``; its cells are not checked there, unless ``--set
data_dir=...`` points them elsewhere. ``study_needs`` also serves
``python -m studies prepare --study NAME``.

Only presence and completeness are checked here; where the data came from
(provenance) is another check's business.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from regtune.data.check import Need, command, merge, problem
from regtune.methods import resolve_config
from regtune.space import ConfigError
from regtune.tasks.base import get_task
from studies.spec import Study, cell_configs, sample_point


class MissingData(ConfigError):
    """Data sets a study needs are missing; the message has one line per data set."""


def generates_data(*scales: str) -> Callable:
    """Mark a study's ``prepare`` hook as generating every data set its cells read at ``scales``."""
    def mark(hook: Callable) -> Callable:
        hook.generates = frozenset(scales)
        return hook
    return mark


def generated(study: Study, scale: str, overrides: Mapping[str, Any] | None = None) -> bool:
    """True when the study's own hook makes the data at ``scale`` (and no ``--set data_dir`` overrides it)."""
    return scale in getattr(study.prepare, "generates", ()) and "data_dir" not in (overrides or {})


def study_needs(study: Study, scale: str, overrides: Mapping[str, Any] | None = None) -> list[tuple[Need, list[str]]]:
    """Every data set the study's cells read at ``scale``, once each: (need, names of the cells reading it)."""
    groups: dict[tuple[str, str], tuple[list[Need], list[str]]] = {}
    for cell in study.cells:
        task = get_task(cell.task)
        if task.data is None:
            continue
        fixed, searched = cell_configs(study, cell, scale, None, overrides)
        hparams = {k: v for k, v in fixed.items() if not k.startswith("__")}
        config = resolve_config(cell.method, {**hparams, **sample_point(searched)[0]})
        for need in task.data(config):
            needs, cells = groups.setdefault(need.key, ([], []))
            needs.append(need)
            cells.append(cell.name)
    return [(merge(needs), cells) for needs, cells in groups.values()]


def _cells(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"cell{'s' if len(names) > 1 else ''} {', '.join(names[:shown])}{more}"


def missing_lines(study: Study, scale: str, overrides: Mapping[str, Any] | None = None) -> list[str]:
    """One line per data set that is missing or incomplete (empty when all are there)."""
    if generated(study, scale, overrides):
        return []
    lines = []
    for need, cells in study_needs(study, scale, overrides):
        why = problem(need)
        if why is not None:
            lines.append(f"data set {need.label} of {_cells(cells)} is not ready: {why}; prepare it with: "
                         f"{command(need)}")
    return lines


def check_data(study: Study, scale: str, overrides: Mapping[str, Any] | None = None) -> None:
    """Raise ``MissingData`` (one line per data set) unless every cell's data are present and complete."""
    lines = missing_lines(study, scale, overrides)
    if lines:
        raise MissingData("\n".join(lines))
