"""Data provenance checks of a study run: a paper-scale cell refuses stand-in data.

A cell whose task runs its ``paper`` size preset must read the real data set:
data that this project generated (``studies prepare --synthetic-lines``, the
smoke hooks' CIFAR / ImageFolder / text writers; marked as described in
``regtune.data.provenance``) or data smaller than the preset needs is refused
with a one-line ``ConfigError`` (the CLI exits 2) before Ray starts. Data that
is not there at all is left to the download / missing-data checks.
``cell_data_source`` gives the one-line source that each trial row records
(``data_source``) and the report prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from regtune.data.provenance import DataSource, describe_task_data, task_data_source
from regtune.methods import resolve_config
from regtune.space import ConfigError
from studies.spec import Cell, Study, cell_configs, sample_point


def _resolved(cell: Cell, fixed: Mapping[str, Any], searched: Mapping[str, Any]) -> dict[str, Any]:
    hparams = {k: v for k, v in fixed.items() if not k.startswith("__")}
    return resolve_config(cell.method, {**hparams, **sample_point(searched)[0]})


def refusal(cell: str, source: DataSource) -> str | None:
    """Why ``source`` cannot serve a paper-scale run of ``cell`` (one line), or None."""
    if not source.exists:
        return None
    if source.generated:
        return (f"data_dir of cell {cell!r} holds generated data, not {source.name}: {source.path} ({source.origin}); "
                "a paper-scale run needs the real data set (prepare it, e.g. `python -m studies prepare CORPUS` "
                "without --synthetic-lines, or point data_dir / $REGTUNE_DATA_DIR at it)")
    if source.too_small:
        about = "about " if source.approximate else ""
        return (f"data_dir of cell {cell!r} is too small for the paper preset: {source.path} holds "
                f"{about}{source.size:,} {source.unit} of {source.name}, expected at least {source.needed:,}")
    return None


def check_paper_data(study: Study, scale: str, overrides: Mapping[str, Any] | None = None,
                     extra: Mapping[str, Any] | None = None) -> None:
    """Raise ``ConfigError`` when a cell running its task's ``paper`` size would read stand-in data."""
    seen: dict[tuple[str, str], str | None] = {}
    for cell in study.cells:
        fixed, searched = cell_configs(study, cell, scale, extra, overrides)
        config = _resolved(cell, fixed, searched)
        if config.get("size") != "paper":
            continue
        source = task_data_source(cell.task, config)
        if source is None:
            continue
        key = (source.name, source.path)
        if key not in seen:
            seen[key] = refusal(cell.name, source)
        if seen[key]:
            raise ConfigError(seen[key])


def cell_data_source(cell: Cell, config: Mapping[str, Any]) -> str:
    """The one-line data source of a trial's config (for ``trials.parquet``; never raises)."""
    try:
        resolved = resolve_config(cell.method, {k: v for k, v in config.items() if not k.startswith("__")})
    except Exception as e:  # noqa: BLE001 - a report field, not a check
        return f"unknown ({type(e).__name__}: {e})"
    return describe_task_data(cell.task, resolved)
