"""Study specs (one module per paper table) and the CLI (`python -m studies`)."""

from __future__ import annotations

import importlib

from regtune.space import ConfigError, suggest
from studies.spec import Study

# module name of every study in the catalog; a module defines STUDY
STUDY_MODULES = {
    "cpr_grokking": "studies.cpr_grokking",
}


def get_study(name: str) -> Study:
    if name not in STUDY_MODULES:
        raise ConfigError(
            f"unknown study {name!r}{suggest(name, STUDY_MODULES)}; known studies: {', '.join(sorted(STUDY_MODULES))}"
        )
    return importlib.import_module(STUDY_MODULES[name]).STUDY


def study_names() -> list[str]:
    return sorted(STUDY_MODULES)
