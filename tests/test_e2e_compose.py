"""A method composed outside the library runs as a Tune trial on local Ray (no mocks): one composed in a script's
``__main__`` travels as a record (``trainables.get(record)``); one registered by a module of the user's (a study
file) is found by name in the trial process, which imports that module (``regtune.methods.USER_MODULES_ENV``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import cli_env

USER_MODULE = '''
from regtune.compose import compose
from regtune.methods import register_method
from regtune.parts import adamw, ire, sgd

register_method(compose("user_sgdm_ire", base=sgd(momentum=0.9), wrappers=[ire()]))
'''

SCRIPT = '''
import json, sys
import ray
from ray import tune

import my_methods  # noqa: F401  registers user_sgdm_ire, before Ray starts its processes
import trainables
from regtune.compose import compose
from regtune.parts import adamw, gn_penalty

mine = compose("script_adamw_gn", base=adamw(), estimator=gn_penalty())  # not registered here: a record
base = {"task": "grokking", "size": "smoke", "steps": 4, "eval_every": 2, "seed": 1}
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
out = {}
for trainable, space, extra in (
        (trainables.get(mine), trainables.space(mine), {"batch_size": 64, "micro_batch_size": 32}),
        (trainables.get("user_sgdm_ire"), trainables.space("user_sgdm_ire"), {"lr": 0.05, "ire_interval": 2})):
    tuner = tune.Tuner(trainable, param_space={**space, **base, **extra},
                       tune_config=tune.TuneConfig(num_samples=1, metric="val/accuracy", mode="max"),
                       run_config=tune.RunConfig(storage_path=sys.argv[1], verbose=0))
    result = tuner.fit()[0]
    out[trainable.__name__] = {"error": repr(result.error) if result.error else None,
                               "step": result.metrics.get("step"), "keys": sorted(result.metrics)}
ray.shutdown()
print("RESULT " + json.dumps(out))
'''


def test_user_compositions_run_as_tune_trials(tmp_path):
    (tmp_path / "my_methods.py").write_text(textwrap.dedent(USER_MODULE))
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = cli_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    env.pop("REGTUNE_METHOD_MODULES", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "results")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    gn, ire = out["script_adamw_gn"], out["user_sgdm_ire"]
    assert gn["error"] is None and gn["step"] == 4 and "reg/value" in gn["keys"], gn
    assert ire["error"] is None and ire["step"] == 4 and "ire/mask_share" in ire["keys"], ire
