"""A recipe lives once: tasks name no method, the library names no study, a paper's settings are its study's.

Mechanical checks over the source (string literals and names outside docstrings and comments) and over the
registered data: a task's defaults and size presets hold only loop and task hyperparameters; every study cell's
recipe holds only keys its method or task knows, and its searched keys are Optuna's first point.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

from regtune.methods import LOOP_HPARAMS, get_method, method_names
from regtune.tasks.base import get_task, task_names
from studies import get_study, study_names
from studies.spec import cell_configs, cell_points

ROOT = Path(__file__).resolve().parents[1]


def _docstring_lines(source: str) -> set[int]:
    """Line numbers of every module, class and function docstring."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_tokens(path: Path) -> list[tuple[int, str, str]]:
    """(line, kind, text) of the names and string literals of a file, docstrings and comments left out."""
    source = path.read_text()
    skip = _docstring_lines(source)
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.start[0] in skip:
            continue
        if tok.type == tokenize.NAME:
            out.append((tok.start[0], "name", tok.string))
        elif tok.type == tokenize.STRING:
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):  # an f-string: its text
                value = tok.string
            out.append((tok.start[0], "string", str(value)))
    return out


def test_the_scan_sees_code_and_skips_docstrings(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""adamw in a docstring."""\nX = {"sgd": 1}  # adamcpr in a comment\n\n\ndef f():\n'
                 '    """sam_ire here too."""\n    return cpr_grokking\n')
    assert [(kind, text) for _, kind, text in code_tokens(f) if text in ("adamw", "sgd", "adamcpr", "sam_ire",
                                                                         "cpr_grokking")] == [
        ("string", "sgd"), ("name", "cpr_grokking")]


@pytest.mark.parametrize("path", sorted((ROOT / "regtune" / "tasks").glob("*.py")), ids=lambda p: p.name)
def test_tasks_name_no_method(path):
    methods = set(method_names())
    named = [f"{path.name}:{line}: {text!r}" for line, kind, text in code_tokens(path)
             if kind == "string" and text in methods]
    assert not named, "a task names a method (a paper's per-method setting belongs in its study): " + "; ".join(named)


def test_regtune_names_no_study():
    studies = set(study_names())
    assert studies, "no study found"
    named = []
    for path in sorted((ROOT / "regtune").rglob("*.py")):
        for line, kind, text in code_tokens(path):
            if (kind == "name" and text in studies | {"studies"}) or \
                    (kind == "string" and any(s in text for s in studies)):
                named.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert not named, "regtune/ names a study (or imports the catalog): " + "; ".join(named)


@pytest.mark.parametrize("name", task_names())
def test_task_defaults_set_no_method_hyperparameter(name):
    task = get_task(name)
    allowed = {h.name for h in LOOP_HPARAMS} | set(task.hparam_map)
    for where, defaults in [("loop_defaults", task.loop_defaults), *((f"sizes[{s}]", d) for s, d in task.sizes.items())]:
        extra = set(defaults) - allowed
        assert not extra, f"task {name!r} {where} sets {sorted(extra)}: method hyperparameters belong in a study"


@pytest.mark.parametrize("name", study_names())
def test_every_recipe_is_the_fixed_config_and_the_first_point(name):
    study = get_study(name)
    for scale in study.scales:
        for cell in study.cells:
            hparams = {h.name for h in LOOP_HPARAMS} | set(get_task(cell.task).hparam_map) \
                | set(get_method(cell.method).hparam_map)
            assert set(cell.recipe) <= hparams, (cell.name, sorted(set(cell.recipe) - hparams))
            fixed, searched = cell_configs(study, cell, scale)
            space_fixed = {**cell.space, **study.scales[scale].space.get(cell.name, {})}
            for k, v in cell.recipe.items():
                if k in searched:
                    continue
                if k in study.scales[scale].fixed or k in space_fixed:  # a scale or the cell's space fixes it
                    continue
                assert fixed[k] == v, (name, scale, cell.name, k)
            point = {k: v for k, v in cell.recipe.items() if k in searched}
            if point and set(point) == set(searched):
                assert cell_points(cell, searched)[0] == point, (name, scale, cell.name)
