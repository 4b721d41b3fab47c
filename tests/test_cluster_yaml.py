"""Offline checks of ``cluster.yaml`` against Ray's own schema and against README.md's cluster section.

Ray's ``validate_config`` expects a *prepared* config: ``prepare_config`` merges the provider's ``defaults.yaml``
(a file inside the ray package), merges ``setup_commands`` into the head/worker lists, checks the docker block and
fills per-type ``min_workers``/``max_workers``. For ``provider.type: aws`` neither step touches the network, boto3
or AWS credentials (``ray up`` does that later, in the provider's ``bootstrap_config``, which we never call), so the
whole check runs offline. Both functions are private API (``ray.autoscaler._private.util``, ray 2.60.0); the docker
image tag is pinned to the installed ray version below, so a ray upgrade makes this file fail loudly rather than
silently validate against a different schema.

The README check reads the "## Running on a GPU cluster" section of README.md and compares its commands with the
ports, paths and image that cluster.yaml really uses; ``test_consistency_check_can_fail`` shows it catches drift.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ray = pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
README = ROOT / "README.md"
SECTION_HEADING = "## Running on a GPU cluster"
# Flags of `python -m studies run` (the CLI contract); test_readme_flags_exist_in_cli checks them against --help.
STUDIES_RUN_FLAGS = {"--scale", "--storage", "--num-samples", "--max-concurrent", "--mlflow-uri", "--address", "--seed"}


def load_cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """The offline path: prepare (merge defaults, no network) then validate against ray-schema.json."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def readme_cluster_section(text: str) -> str:
    """The README's cluster section: from its level-2 heading to the next level-2 heading."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == SECTION_HEADING]
    assert len(starts) == 1, f"README.md must contain exactly one {SECTION_HEADING!r} heading, found {len(starts)}"
    end = next((j for j in range(starts[0] + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
    return "\n".join(lines[starts[0]:end])


def _flag(command: str, name: str) -> str | None:
    """Value of `--name=V` or `--name V` in a shell command."""
    m = re.search(rf"{re.escape(name)}(?:=|\s+)(\S+)", command)
    return m.group(1) if m else None


def _head_command(config: dict[str, Any], needle: str) -> str:
    found = [c for c in config["head_start_ray_commands"] if needle in c]
    assert len(found) == 1, f"expected one head_start_ray_commands entry containing {needle!r}, found {found}"
    return found[0]


def _mlflow(config: dict[str, Any]) -> dict[str, str | None]:
    cmd = _head_command(config, "mlflow server")
    return {k: _flag(cmd, f"--{k}") for k in ("host", "port", "backend-store-uri", "artifacts-destination")}


def _storage(config: dict[str, Any]) -> str:
    opts = " ".join(config["docker"].get("run_options", []))
    m = re.search(r"-e\s+REGTUNE_STORAGE=(\S+)", opts)
    assert m, "docker.run_options must export REGTUNE_STORAGE"
    return m.group(1)


def _code_dir(config: dict[str, Any]) -> str:
    remote = [r for r, local in config["file_mounts"].items() if local in (".", "./")]
    assert len(remote) == 1, f"file_mounts must copy the repository ('.') to one remote path, found {remote}"
    return remote[0]


def consistency_problems(section: str, config: dict[str, Any]) -> list[str]:
    """Every way the README section disagrees with cluster.yaml (empty list: consistent)."""
    problems = []
    head = _head_command(config, "ray start --head")
    dash_port = _flag(head, "--dashboard-port")
    ml = _mlflow(config)
    storage = _storage(config)
    expected = [
        "ray up cluster.yaml",
        "ray down cluster.yaml",
        "ray dashboard cluster.yaml",
        f"ray job submit --address http://127.0.0.1:{dash_port} --working-dir . -- python -m studies run",
        "ray job logs -f",
        "ray job stop",
        f"--storage {storage}",
        f"--mlflow-uri http://127.0.0.1:{ml['port']}",
        f"ray attach cluster.yaml -p {ml['port']}",
        f"-L {ml['port']}:127.0.0.1:{ml['port']}",
        f"-L {dash_port}:127.0.0.1:{dash_port}",
        str(ml["backend-store-uri"]),
        str(ml["artifacts-destination"]),
        config["docker"]["image"],
        _code_dir(config),
        "RAY_AUTH_MODE=token",
        "RAY_AUTH_MODE=disabled",
        "MLFLOW_TRACKING_URI",
        "REGTUNE_STORAGE",
        "runtime-env-json",
    ]
    problems += [f"README section lacks {s!r}" for s in expected if s not in section]
    known_ports = {dash_port, ml["port"]}
    for port in sorted(set(re.findall(r"127\.0\.0\.1:(\d+)", section)) - known_ports):
        problems.append(f"README uses 127.0.0.1:{port}, which is neither the dashboard nor the MLflow port")
    for addr in set(re.findall(r"--address\s+(\S+)", section)):
        if addr != f"http://127.0.0.1:{dash_port}":
            problems.append(f"README submits to --address {addr}, cluster.yaml serves jobs on 127.0.0.1:{dash_port}")
    for line in section.splitlines():
        if "python -m studies run" in line:
            used = {t for t in shlex.split(line.split("python -m studies run", 1)[1], comments=True)
                    if t.startswith("--")}
            problems += [f"README uses unknown flag {f} of studies run" for f in sorted(used - STUDIES_RUN_FLAGS)]
    return problems


# ------------------------------------------------------------------ schema


def test_cluster_yaml_passes_rays_schema_offline() -> None:
    prepared = validate(load_cluster())
    # prepare_config filled per-type bounds; the head never scales
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize(
    "break_it, error",
    [
        (lambda c: c["available_node_types"]["gpu_1x_a10g"]["resources"].update(GPU=0.5), jsonschema.ValidationError),
        (lambda c: c["available_node_types"]["gpu_1x_a10g"]["resources"].update(CPU="4"), jsonschema.ValidationError),
        (lambda c: c.update(max_worker=4), jsonschema.ValidationError),  # misspelled top-level key
        (lambda c: c["available_node_types"]["head"].update(min_worker=0), jsonschema.ValidationError),
        (lambda c: c["docker"].pop("container_name"), AssertionError),  # image without container_name
        (lambda c: c.update(head_node_type="nope"), ValueError),
        (lambda c: c["available_node_types"]["gpu_1x_a10g"].update(min_workers=99), ValueError),  # > max_workers
    ],
    ids=["fractional-gpu", "string-cpu", "unknown-top-key", "unknown-node-key", "no-container-name",
         "bad-head-type", "min-over-max"],
)
def test_validator_rejects_broken_config(break_it, error) -> None:
    config = load_cluster()
    break_it(config)
    with pytest.raises(error):
        validate(config)


# ------------------------------------------------------------------ our own rules


def test_node_resources_are_integers() -> None:
    for name, node in load_cluster()["available_node_types"].items():
        for key, value in node["resources"].items():
            assert type(value) is int and value >= 0, f"{name}.resources.{key} = {value!r} must be an integer >= 0"


def test_head_runs_no_trials() -> None:
    config = load_cluster()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0
    assert _flag(_head_command(config, "ray start --head"), "--num-cpus") == "0"


def test_gpu_workers_scale_from_zero() -> None:
    config = load_cluster()
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    assert workers, "no worker node types"
    for name, node in workers.items():
        assert node.get("min_workers", 0) == 0, f"{name} must autoscale from zero"
        assert node["resources"].get("GPU", 0) >= 1 and node["resources"].get("CPU", 0) >= 1, name
        assert node["node_config"]["InstanceType"].startswith(("g", "p")), f"{name} is not a GPU instance"
    assert sum(n.get("max_workers", 0) for n in workers.values()) >= config["max_workers"] >= 1


def test_docker_image_matches_installed_ray() -> None:
    docker = load_cluster()["docker"]
    assert docker["container_name"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu", docker["image"]), docker["image"]


def test_setup_installs_torch_and_the_synced_repo() -> None:
    config = load_cluster()
    setup = config["setup_commands"]
    assert setup, "setup_commands must be set (Ray's default installs a nightly Ray)"
    assert any("pip install" in c and "torch" in c for c in setup)
    code = _code_dir(config)
    assert any(f"cd {code}" in c and "pip install" in c and "-e ." in c for c in setup)
    assert ".venv" in config["rsync_exclude"]


def test_servers_bind_to_localhost() -> None:
    config = load_cluster()
    assert _flag(_head_command(config, "ray start --head"), "--dashboard-host") == "127.0.0.1"
    ml = _mlflow(config)
    assert ml["host"] == "127.0.0.1"
    assert ml["backend-store-uri"].startswith("sqlite:////"), "the MLflow store must be an absolute sqlite path"
    assert ml["artifacts-destination"].startswith("/")
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()


def test_every_field_has_a_comment_and_no_credentials() -> None:
    text = CLUSTER_YAML.read_text()
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            assert re.search(r"\s#\s", line), f"cluster.yaml:{number} has no comment: {line!r}"
    for pattern in (r"AKIA[0-9A-Z]{16}", r"aws_secret_access_key", r"aws_access_key_id", r"BEGIN [A-Z ]*PRIVATE KEY"):
        assert not re.search(pattern, text, re.IGNORECASE), f"cluster.yaml must not contain {pattern}"


# ------------------------------------------------------------------ README consistency


def test_readme_cluster_section_matches_cluster_yaml() -> None:
    section = readme_cluster_section(README.read_text())
    assert consistency_problems(section, load_cluster()) == []


def test_consistency_check_can_fail() -> None:
    section = readme_cluster_section(README.read_text())
    config = load_cluster()
    moved = copy.deepcopy(config)
    moved["head_start_ray_commands"] = [c.replace("--port 5000", "--port 5001") for c in config["head_start_ray_commands"]]
    assert any("5001" in p for p in consistency_problems(section, moved))
    assert any("9999" in p for p in consistency_problems(section.replace(":8265", ":9999", 1), config))
    assert any("--epochs" in p for p in consistency_problems(
        section + "\npython -m studies run x --epochs 3\n", config))


def test_readme_flags_exist_in_cli() -> None:
    if importlib.util.find_spec("studies.__main__") is None:
        pytest.skip("the studies CLI does not exist yet")
    out = subprocess.run([sys.executable, "-m", "studies", "run", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    missing = [f for f in sorted(STUDIES_RUN_FLAGS) if f not in out.stdout]
    assert not missing, f"`python -m studies run --help` lacks {missing}"
