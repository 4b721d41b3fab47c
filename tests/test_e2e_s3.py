"""S3 study storage against a real S3-compatible server (moto's standalone server, started here on 127.0.0.1
and configured the AWS way, ``AWS_ENDPOINT_URL``; no client is patched).

* A smoke study runs with ``--storage s3://bucket/prefix``, its driver is SIGKILLed once Tune has saved a
  restorable state in the bucket, the same command resumes it from the bucket and finishes, and its Parquet
  tables, report and checkpoints are read back from the bucket with pyarrow.
* The study lease (``studies.engine.s3lease``): one holder; a dead holder on this host is replaced at once, one on
  another host only after its heartbeat is ``ttl`` old; a holder whose lease was taken stops itself.
* Bad S3 storage is one line: nothing listening at the endpoint (exit 2 before Ray starts), no such bucket.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import cli_env, run_cli, wait_until
from tests.test_fault_tolerance import Driver, _wait_for

pytest.importorskip("moto", reason="moto[server] (the test extra) runs the S3-compatible server")
boto3 = pytest.importorskip("boto3")

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
STUDY = "cpr_grokking-smoke"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1: yields its endpoint URL; stopped by pid at the end."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **CREDS})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"moto server did not start:\n{log.read_text()[-2000:]}") from None
            time.sleep(0.2)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _client(url: str):
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def _fs(url: str):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=url.split("://", 1)[1], scheme="http", access_key="testing",
                             secret_key="testing", region="us-east-1")


def _files(fs, root: str) -> list[str]:
    """Object paths under ``root`` relative to it (none if there is nothing yet)."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)


def _env(url: str, tmp_path: Path) -> dict[str, str]:
    return cli_env(AWS_ENDPOINT_URL=url, REGTUNE_CACHE=str(tmp_path / "cache"), **CREDS)


# ---------------------------------------------------------------------------------------------------- the study
def test_study_on_s3_killed_resumed_and_read_back(s3, tmp_path):
    """Three cells, a trial each, one at a time, no confirm phase: SIGKILL once a trial's reports in the bucket
    are past step 150 of 300 (Tune syncs its experiment state with them, every second checkpoint of a trial, so
    the state in the bucket knows a checkpoint of that trial); the same command resumes from the bucket, the
    trial continues from its checkpoint, and the study finishes."""
    import pandas as pd

    bucket, prefix = "regtune-e2e", "studies/run1"
    _client(s3).create_bucket(Bucket=bucket)
    fs, root = _fs(s3), f"{bucket}/{prefix}/{STUDY}"
    env = _env(s3, tmp_path)
    args = ["run", "cpr_grokking", "--scale", "smoke", "--storage", f"s3://{bucket}/{prefix}",
            "--num-samples", "1", "--max-concurrent", "1", "--confirm-seeds", "0"]

    stage = f"{root}/tune/stage1"

    def steps() -> list[list[int]]:  # each trial's reported steps, as the bucket has them (objects are whole)
        reports = [fs.open_input_stream(f"{stage}/{f}").read().decode() for f in _files(fs, stage)
                   if f.endswith("/result.json")]
        return [[json.loads(line)["step"] for line in text.splitlines() if line.strip()] for text in reports]

    first = Driver(args, tmp_path / "run1.log", env)
    _wait_for(lambda: any(150 <= max(s, default=0) < 300 for s in steps()), 240,
              "a trial's reports past step 150 in the bucket", first)
    lease = json.loads(_client(s3).get_object(Bucket=bucket, Key=f"{prefix}/{STUDY}/driver.lease")["Body"].read())
    assert lease["pid"] == first.proc.pid
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()

    second = Driver(args, tmp_path / "run2.log", env)
    assert second.wait(300) == 0, second.output()[-3000:]
    out = second.output()
    assert f"taking over the study's lease from the previous driver (pid {first.proc.pid}" in out
    assert f"[stage1] resuming the interrupted experiment in s3://{bucket}/{prefix}/{STUDY}/tune/stage1" in out
    assert f"results:  s3://{bucket}/{prefix}/{STUDY}/trials.parquet" in out
    assert "Traceback" not in out
    resumed = [int(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "] resumed at step" in line]
    assert resumed and resumed[0] >= 100, resumed  # from a checkpoint in the bucket, not from step 0

    # read back from the bucket, not from the driver's local mirror
    files = _files(fs, root)
    assert {"trials.parquet", "curves.parquet", "report/report.md", "tune/stage1/stage_done.json"} <= set(files)
    assert "driver.lease" not in files  # released at the end
    trials = pd.read_parquet(f"{root}/trials.parquet", filesystem=fs)
    curves = pd.read_parquet(f"{root}/curves.parquet", filesystem=fs)
    assert len(trials) == 3 and trials["trial_id"].is_unique and trials["cell"].nunique() == 3
    assert set(trials["status"]) <= {"completed", "stopped"}
    assert not curves.duplicated(["trial_id", "step"]).any()
    assert set(curves["trial_id"]) == set(trials["trial_id"])
    # every trial dir Tune owns in the bucket is a row (set-aside dirs of the killed run are under .abandoned)
    owned = {f.split("/")[2] for f in files if f.startswith("tune/stage1/") and f.endswith("/params.json")}
    assert owned == {f"{c}_{t}" for c, t in zip(trials["cell"], trials["trial_id"])}
    assert any("/checkpoint_" in f for f in files)  # checkpoints live in the bucket
    done = json.loads(fs.open_input_stream(f"{root}/tune/stage1/stage_done.json").read())
    assert done["trials"] == 3 and done["errors"] == 0
    assert "cpr_grokking (smoke scale)" in fs.open_input_stream(f"{root}/report/report.md").read().decode()

    # the report is rebuilt from the bucket alone (a fresh mirror), and written back there
    proc = run_cli("report", "cpr_grokking", "--scale", "smoke", "--storage", f"s3://{bucket}/{prefix}",
                   timeout=300, AWS_ENDPOINT_URL=s3, REGTUNE_CACHE=str(tmp_path / "fresh-cache"), **CREDS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "fresh-cache").is_dir()


# ------------------------------------------------------------------------------------------------ fail fast
def test_unreachable_s3_endpoint_is_one_line_exit_2_before_ray(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    proc = run_cli("run", "cpr_grokking", "--scale", "smoke", "--storage", "s3://regtune-missing/x", timeout=120,
                   AWS_ENDPOINT_URL=url, REGTUNE_CACHE=str(tmp_path / "cache"), **CREDS)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err == (f"error: --storage s3://regtune-missing/x: cannot reach the S3 endpoint {url} (Could not connect to "
                   f'the endpoint URL: "{url}/regtune-missing"); set AWS_ENDPOINT_URL for an S3-compatible server'), err
    assert "Ray" not in proc.stdout + proc.stderr


def test_missing_bucket_is_one_line(s3, tmp_path, monkeypatch):
    from regtune.space import ConfigError
    from studies.engine import storage

    for k, v in {"AWS_ENDPOINT_URL": s3, storage.CACHE_ENV: str(tmp_path / "cache"), **CREDS}.items():
        monkeypatch.setenv(k, v)
    sdir = storage.local_root("s3://regtune-missing/x") / STUDY
    with pytest.raises(ConfigError) as e:
        storage.check(sdir)
    assert str(e.value) == f"--storage s3://regtune-missing/x: bucket 'regtune-missing' does not exist at {s3} (create it first)"


# ------------------------------------------------------------------------------------------------- the lease
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _lease(url: str, key: str, **kw):
    from studies.engine.guard import pid_alive
    from studies.engine.s3lease import Lease

    logged: list[str] = []
    kw.setdefault("log", logged.append)
    return Lease(_client(url), "regtune-lease", key, alive=pid_alive, **kw), logged


def test_lease_one_holder_takeover_rules_and_loss(s3):
    from regtune.space import ConfigError

    client = _client(s3)
    client.create_bucket(Bucket="regtune-lease")

    # one holder: a live driver on another host keeps it; release frees it
    a, _ = _lease(s3, "s/a.lease", host="node-a", ttl=60)
    a.acquire()
    b, _ = _lease(s3, "s/a.lease", host="node-b", ttl=60)
    with pytest.raises(ConfigError, match=r"in use by another driver \(pid \d+ on node-a"):
        b.acquire()
    a.release()
    b.acquire()
    assert json.loads(client.get_object(Bucket="regtune-lease", Key="s/a.lease")["Body"].read())["host"] == "node-b"
    b.release()
    with pytest.raises(client.exceptions.NoSuchKey):
        client.get_object(Bucket="regtune-lease", Key="s/a.lease")

    # a dead holder on this host (a SIGKILLed driver): taken over at once, whatever the ttl
    dead, _ = _lease(s3, "s/b.lease", pid=_dead_pid(), ttl=3600)
    dead.acquire()
    dead._stop.set()  # its process is gone: no more heartbeats
    c, logged = _lease(s3, "s/b.lease", ttl=3600)
    c.acquire()
    assert c.previous["pid"] == dead.pid and "its process is gone" in logged[0]
    c.release()

    # a holder on another host that stopped renewing: taken over only once its heartbeat is ttl old (server clock)
    gone, _ = _lease(s3, "s/c.lease", host="node-a", ttl=3, on_lost=lambda reason: None)
    gone.acquire()
    gone._stop.set()
    gone._thread.join()
    lost_d: list[str] = []
    d, logged = _lease(s3, "s/c.lease", host="node-b", ttl=3, on_lost=lost_d.append)
    with pytest.raises(ConfigError, match="in use by another driver"):
        d.acquire()
    deadline = time.monotonic() + 30
    while True:
        try:
            d.acquire()
            break
        except ConfigError:
            assert time.monotonic() < deadline, "the stale lease was never taken over"
            time.sleep(0.5)
    assert "no heartbeat for" in logged[-1]

    # the holder renews (its ETag changes), and stops when another driver took the lease (a refused renewal)
    etag = d.etag
    wait_until(lambda: d.etag != etag, 20, "a renewal of the lease")
    client.put_object(Bucket="regtune-lease", Key="s/c.lease", Body=b'{"pid": 1, "host": "intruder"}')
    wait_until(lambda: lost_d, 20, "the holder noticing its lease was taken")
    assert "was taken over or deleted" in lost_d[0]
    d.release()  # not ours any more: the intruder's lease stays
    assert b"intruder" in client.get_object(Bucket="regtune-lease", Key="s/c.lease")["Body"].read()


def test_lease_ttl_setting_is_checked(monkeypatch):
    from regtune.space import ConfigError
    from studies.engine.s3lease import TTL_ENV, default_ttl

    monkeypatch.setenv(TTL_ENV, "0.5")
    with pytest.raises(ConfigError, match=r"REGTUNE_LEASE_TTL='0.5' is not allowed: expected seconds between 3"):
        default_ttl()
    monkeypatch.setenv(TTL_ENV, "90")
    assert default_ttl() == 90


def test_storage_values():
    from regtune.space import ConfigError
    from studies.engine import storage

    assert storage.parse("/tmp/x") is None and storage.location("/tmp/x/y") == "/tmp/x/y"
    for bad, msg in [("gs://b/p", "scheme 'gs' is not supported"), ("s3://B_x/p", "is not an S3 bucket name"),
                     ("s3://bucket/a/../b", "has an empty, '.' or '..' part")]:
        with pytest.raises(ConfigError, match=msg):
            storage.parse(bad)
    remote = storage.parse("s3://bucket/pre/fix?endpoint_override=127.0.0.1:9&scheme=http")
    sdir = remote.local / STUDY
    assert storage.location(sdir / "tune") == f"s3://bucket/pre/fix/{STUDY}/tune?endpoint_override=127.0.0.1:9&scheme=http"
    assert remote.local.parts[-4:] == ("127.0.0.1_9", "bucket", "pre", "fix")



def test_mirror_pull_push_and_move_aside(s3, tmp_path, monkeypatch):
    """The driver's local mirror against the bucket: pull leaves checkpoints out and replaces the tune/ cache,
    push uploads, a trial dir set aside locally is moved in the bucket too (checkpoints included)."""
    from studies.engine import storage

    for k, v in {"AWS_ENDPOINT_URL": s3, storage.CACHE_ENV: str(tmp_path / "cache"), **CREDS}.items():
        monkeypatch.setenv(k, v)
    client = _client(s3)
    client.create_bucket(Bucket="regtune-mirror")
    exp = f"p/{STUDY}/tune/stage1"
    for key in (f"{exp}/a_1/params.json", f"{exp}/a_1/checkpoint_000000/state.pt", f"{exp}/b_2/result.json",
                f"p/{STUDY}/driver.lease", f"p/{STUDY}/tune/.abandoned/stage1/c_3.x/params.json"):
        client.put_object(Bucket="regtune-mirror", Key=key, Body=key.encode())
    sdir = storage.local_root("s3://regtune-mirror/p") / STUDY
    stale = sdir / "tune" / "stage1" / "gone_9" / "params.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")  # in the mirror only: not in the bucket any more
    storage.pull(sdir)
    got = sorted(p.relative_to(sdir).as_posix() for p in sdir.rglob("*") if p.is_file())
    assert got == ["tune/stage1/a_1/params.json", "tune/stage1/b_2/result.json"]
    assert (sdir / "tune/stage1/a_1/params.json").read_text() == f"{exp}/a_1/params.json"

    (sdir / "trials.parquet").write_bytes(b"PAR1")
    storage.push(sdir / "trials.parquet")
    assert client.get_object(Bucket="regtune-mirror", Key=f"p/{STUDY}/trials.parquet")["Body"].read() == b"PAR1"

    dest = sdir / "tune" / ".abandoned" / "stage1" / "a_1.stamp"
    dest.parent.mkdir(parents=True)
    os.replace(sdir / "tune/stage1/a_1", dest)
    storage.moved(sdir / "tune/stage1/a_1", dest)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="regtune-mirror", Prefix=f"p/{STUDY}/tune/")["Contents"]}
    assert not {k for k in keys if "/stage1/a_1/" in k}
    assert {f"p/{STUDY}/tune/.abandoned/stage1/a_1.stamp/params.json",
            f"p/{STUDY}/tune/.abandoned/stage1/a_1.stamp/checkpoint_000000/state.pt"} <= keys


def test_reference_tables_read_from_a_study_uri(s3, monkeypatch):
    """A trial reads an earlier cell's tables (external grafting's reference) from the study's s3:// URI, which the
    driver puts in ``__extras["study_dir"]`` with S3 storage."""
    import pandas as pd

    from regtune.reference import ReferenceMissing, load_reference_norms

    for k, v in {"AWS_ENDPOINT_URL": s3, **CREDS}.items():
        monkeypatch.setenv(k, v)
    _client(s3).create_bucket(Bucket="regtune-ref")
    uri = f"s3://regtune-ref/p/{STUDY}"
    with pytest.raises(ReferenceMissing, match="missing trials.parquet, curves.parquet"):
        load_reference_norms(uri, "sgd")
    fs = _fs(s3)
    pd.DataFrame({"cell": ["adamw"], "status": ["completed"]}).to_parquet(f"regtune-ref/p/{STUDY}/trials.parquet",
                                                                          filesystem=fs)
    pd.DataFrame({"cell": ["adamw"], "step": [0]}).to_parquet(f"regtune-ref/p/{STUDY}/curves.parquet", filesystem=fs)
    with pytest.raises(ReferenceMissing, match=r"no trials of reference cell 'sgd' .* \(cells there: adamw\)"):
        load_reference_norms(uri, "sgd")
