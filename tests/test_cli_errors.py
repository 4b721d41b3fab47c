"""Bad input: one line naming the key, the value and what is allowed; exit 2; before Ray; nothing written."""

import pytest

from studies.__main__ import main
from tests.conftest import run_cli

CASES = [
    (["run", "nope"], "unknown study 'nope'"),
    (["run", "cpr_grokking", "--scale", "huge"], "--scale 'huge' is not allowed"),
    (["run", "cpr_grokking", "--set", "kapa_init_param=0.8"], "did you mean 'kappa_init_param'"),
    (["run", "cpr_grokking", "--set", "lr=0"], "lr=0 is not allowed: expected a number > 0"),
    (["run", "cpr_grokking", "--set", "lr=-1e-3"], "lr=-0.001 is not allowed"),
    (["run", "cpr_grokking", "--set", "kappa_init_method=foo"], "kappa_init_method='foo' is not allowed: expected one of"),
    (["run", "cpr_grokking", "--set", "rescale_alpha=0"], "rescale_alpha=0 is not allowed: expected a number > 0"),
    (["run", "cpr_grokking", "--set", "steps=-5"], "steps=-5 is not allowed: expected an integer >= 1"),
    (["run", "cpr_grokking", "--num-samples", "0"], "--num-samples=0 is not allowed"),
    (["run", "cpr_grokking", "--confirm-seeds", "-1"], "--confirm-seeds=-1 is not allowed: expected an integer >= 0"),
    (["run", "cpr_grokking", "--confirm-top", "0"], "--confirm-top=0 is not allowed: expected an integer >= 1"),
    (["run", "cpr_grokking", "--set", "lr"], "expected KEY=VALUE"),
    (["trial", "adamcrp", "--task", "grokking"], "unknown method 'adamcrp' (did you mean 'adamcpr'?)"),
    (["trial", "adamcpr", "--task", "grok"], "unknown task 'grok' (did you mean 'grokking'?)"),
    (["trial", "adamcpr", "--task", "grokking", "--set", "kappa_init_method=warm_start",
      "--set", "kappa_init_param=2.5"], "kappa_init_param=2.5 is not allowed for warm_start"),
    (["report", "cpr_grokking", "--scale", "smoke"], "no study results"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    storage = tmp_path / "results"
    code = main([*argv, "--storage", str(storage)] if argv[0] in ("run", "report") else argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not storage.exists(), "a rejected command must not write into the storage dir"


def test_exit_status_and_no_ray_in_a_real_process(tmp_path):
    storage = tmp_path / "results"
    proc = run_cli("run", "cpr_grokking", "--scale", "smoke", "--set", "kappa_init_method=foo",
                   "--storage", str(storage), timeout=120)
    assert proc.returncode == 2
    assert "kappa_init_method='foo' is not allowed" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr  # failed before Ray started
    assert not storage.exists()
