"""Unreachable services fail fast: an MLflow server or Ray cluster that is not there is one line and exit 2
before Ray starts or anything is written (studies/engine/preflight_services.py)."""

import socket
import time

import pytest

from regtune.space import ConfigError
from studies.__main__ import main
from studies.engine.preflight_services import check_ray
from tests.conftest import run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cases():
    port = free_port()  # nothing listens on it
    return [
        (["--mlflow-uri", f"http://127.0.0.1:{port}"], f"--mlflow-uri 'http://127.0.0.1:{port}' is not reachable"),
        (["--address", f"127.0.0.1:{port}"], f"no Ray GCS reachable at 127.0.0.1:{port}"),
        (["--address", f"ray://127.0.0.1:{port}"], f"no Ray Client server reachable at 127.0.0.1:{port}"),
        (["--address", f"http://127.0.0.1:{port}"], "for `ray job submit --address URL"),
    ]


@pytest.mark.parametrize("flags,message", _cases(), ids=["mlflow", "gcs", "ray-client", "dashboard"])
def test_unreachable_service_is_one_line_exit_2(flags, message, tmp_path, capsys):
    storage = tmp_path / "results"
    started = time.monotonic()
    code = main(["run", "cpr_grokking", "--scale", "smoke", "--storage", str(storage), *flags])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not storage.exists(), "nothing is written before the services are checked"
    assert elapsed < 15, f"the check took {elapsed:.0f} s (no retries, no waiting for a cluster that is not there)"


def test_a_port_that_is_not_a_ray_gcs_is_refused():
    """An open TCP port is not enough (a proxy or another service may hold it): Ray's GCS client must answer."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        with pytest.raises(ConfigError, match=f"no Ray GCS reachable at 127.0.0.1:{port}"):
            check_ray(f"127.0.0.1:{port}")


def test_ray_address_env_is_checked_too(tmp_path):
    port = free_port()
    proc = run_cli("run", "cpr_grokking", "--scale", "smoke", "--storage", str(tmp_path / "r"), timeout=120,
                   RAY_ADDRESS=f"127.0.0.1:{port}")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        line for line in proc.stderr.strip().splitlines() if line.startswith("error: $RAY_ADDRESS")
    ]
    assert "Ray" not in proc.stdout  # no "starting local Ray" / "connecting to Ray"
    assert not (tmp_path / "r").exists()


def test_a_running_ray_gcs_passes():
    import ray

    ray.init(include_dashboard=False, num_cpus=1)
    try:
        check_ray(ray.get_runtime_context().gcs_address)  # no error
    finally:
        ray.shutdown()
