"""Study specs (one module per paper table, each defining ``STUDY``) and the CLI
(``python -m studies``). Every module of this package that defines ``STUDY`` is
in the catalog; the module name is the study name."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from regtune.space import ConfigError, suggest
from studies.spec import Study

_NOT_STUDIES = {"spec", "engine", "__main__"}


def _modules() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in _NOT_STUDIES
                  and not m.name.startswith("_"))


def get_study(name: str) -> Study:
    names = study_names()
    if name not in names:
        raise ConfigError(f"unknown study {name!r}{suggest(name, names)}; known studies: {', '.join(names)}")
    return importlib.import_module(f"studies.{name}").STUDY


def study_names() -> list[str]:
    return [m for m in _modules() if hasattr(importlib.import_module(f"studies.{m}"), "STUDY")]
