"""Study storage on S3: ``--storage s3://bucket/prefix`` (or ``$REGTUNE_STORAGE``).

Everything of a study lives under ``s3://bucket/prefix/<study>-<scale>/``, in the same layout as a
directory (``studies/driver.py``): Ray Tune's experiments and every checkpoint (Tune writes them itself,
``RunConfig(storage_path="s3://...")``), ``trials.parquet``, ``curves.parquet``, ``report/`` and the
driver's stage markers. All file access goes through pyarrow's filesystem layer
(``pyarrow.fs.FileSystem.from_uri``), the one Ray Tune uses.

The driver keeps a local mirror of the study (``$REGTUNE_CACHE``, default ``~/.cache/regtune``, then
``storage/<endpoint>/<bucket>/<prefix>/<study>-<scale>/``) so the code that reads and writes a study
directory stays the same for both kinds of storage:

* ``pull``: the mirror's ``tune/`` tree is a cache of the bucket: refreshed (checkpoints left out) when the
  driver starts and after each stage's ``fit``; the Parquet tables are pulled before a report.
* ``push``: what the driver writes (stage markers, the Parquet tables, the report) is uploaded at once.
* ``moved``: a trial dir the driver sets aside (``tune/.abandoned/``) is moved in the bucket too.
* the sqlite MLflow store (``mlflow.db``, ``mlartifacts/``) stays in the mirror only: sqlite needs a local
  file. Give ``--mlflow-uri`` (an ``mlflow server``) to keep runs beside a study that moves between machines;
  a fresh mirror's store is backfilled from the Parquet tables at the end of a run.

One driver per study: ``studies.engine.s3lease`` (a lease object ``driver.lease`` written with conditional puts).

Configuration is the standard AWS environment: ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` (an
S3-compatible server), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` (or
``AWS_REGION``), or an instance profile; pyarrow and boto3 both read it. pyarrow's URI query form also
works (``s3://bucket/prefix?endpoint_override=host:port&scheme=http&region=us-east-1``). Ray workers
must see the same environment: local Ray inherits the driver's; on a cluster set it on every node.

For a local path, every function here does nothing, and ``location`` returns the path.
"""

from __future__ import annotations

import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from regtune.space import ConfigError

URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
CACHE_ENV = "REGTUNE_CACHE"
LEASE_FILE = "driver.lease"
SKIP_PARTS = (".abandoned",)  # never pulled into the mirror (checkpoint_* dirs neither)


def is_uri(value: str | os.PathLike) -> bool:
    return bool(URI.match(os.fspath(value)))


@dataclass
class Remote:
    """An ``s3://bucket/prefix`` storage root and its local mirror."""

    uri: str  # s3://bucket/prefix, no query
    query: str  # "" or "?endpoint_override=..."
    bucket: str
    prefix: str  # "" or "a/b"
    local: Path
    _fs: Any = field(default=None, repr=False)

    @property
    def fs(self):
        if self._fs is None:
            import pyarrow.fs

            self._fs = pyarrow.fs.FileSystem.from_uri(self.uri + self.query)[0]
        return self._fs

    def key(self, rel: str) -> str:
        """The object key of ``rel`` (a path relative to the storage root)."""
        return "/".join(p for p in (self.prefix, rel) if p)

    def fs_path(self, rel: str) -> str:
        return f"{self.bucket}/{self.key(rel)}".rstrip("/")

    def location(self, rel: str) -> str:
        return f"s3://{self.fs_path(rel)}{self.query}"

    def options(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(self.query.lstrip("?")).items()}


_REMOTES: dict[str, Remote] = {}


def parse(value: str | os.PathLike) -> Remote | None:
    """The ``Remote`` of an ``s3://`` storage value (registered, so paths in its mirror map back to the
    bucket); None for a local path. Any other URI, or a malformed one, is a ``ConfigError``."""
    text = os.fspath(value)
    if not is_uri(text):
        return None
    parts = urlsplit(text)
    if parts.scheme != "s3":
        raise ConfigError(f"--storage {text!r} is not allowed: expected a directory or s3://bucket/prefix "
                          f"(scheme {parts.scheme!r} is not supported)")
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if not BUCKET.match(bucket) or ".." in bucket:
        raise ConfigError(f"--storage {text!r} is not allowed: {bucket!r} is not an S3 bucket name "
                          "(3-63 characters: lower-case letters, digits, '.' and '-')")
    if "//" in parts.path.strip("/") or any(p in (".", "..") for p in prefix.split("/")):
        raise ConfigError(f"--storage {text!r} is not allowed: the prefix {prefix!r} has an empty, '.' or '..' part")
    query = f"?{parts.query}" if parts.query else ""
    remote = Remote(uri=f"s3://{bucket}" + (f"/{prefix}" if prefix else ""), query=query, bucket=bucket,
                    prefix=prefix, local=Path())
    remote.local = _mirror_root(remote)
    return _REMOTES.setdefault(str(remote.local), remote)


def _endpoint(remote: Remote) -> str | None:
    opts = remote.options()
    if "endpoint_override" in opts:
        host = opts["endpoint_override"]
        return host if "://" in host else f"{opts.get('scheme', 'https')}://{host}"
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _mirror_root(remote: Remote) -> Path:
    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "regtune").expanduser().resolve()
    endpoint = _endpoint(remote)
    where = re.sub(r"[^A-Za-z0-9.-]+", "_", urlsplit(endpoint).netloc) if endpoint else "aws"
    return cache / "storage" / where / remote.bucket / remote.prefix


def local_root(value: str | os.PathLike) -> Path:
    """Where a storage value's study dirs are on this machine: the directory, or the URI's mirror."""
    remote = parse(value)
    return remote.local if remote else Path(value).expanduser().resolve()


def find(path: str | os.PathLike) -> tuple[Remote, str] | None:
    """(remote, path relative to its root) of a path in a registered mirror; None for any other path."""
    p = Path(path).resolve()
    for root, remote in _REMOTES.items():
        if p == Path(root) or Path(root) in p.parents:
            return remote, p.relative_to(root).as_posix() if p != Path(root) else ""
    return None


def location(path: str | os.PathLike) -> str:
    """What to hand Ray Tune or a trial for ``path``: its s3:// URI in a mirror, else the path itself."""
    found = find(path)
    return found[0].location(found[1]) if found else os.fspath(path)


def _fail(remote: Remote, what: str, e: BaseException) -> ConfigError:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ConfigError(f"--storage {remote.uri}: {what} failed ({text})")


# --------------------------------------------------------------------------
# preflight: before Ray starts and before anything is written
def client(remote: Remote, *, timeout: float = 5.0):
    """A boto3 S3 client for ``remote`` (the lease's conditional puts; pyarrow has none). Short timeouts."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError(f"--storage {remote.uri}: S3 storage needs boto3 (pip install 'regtune[s3]')") from None
    opts = remote.options()
    region = opts.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    config = Config(connect_timeout=timeout, read_timeout=2 * timeout, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.client("s3", endpoint_url=_endpoint(remote), region_name=region or "us-east-1", config=config)


def check(sdir: Path) -> None:
    """``sdir`` in an S3 mirror: the endpoint answers, the bucket exists and a probe object can be written
    and deleted through pyarrow (as Tune will), within seconds; else one line (``ConfigError``, exit 2)."""
    found = find(sdir)
    if not found:
        return
    remote, rel = found
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    endpoint = _endpoint(remote) or "AWS"
    try:
        client(remote).head_bucket(Bucket=remote.bucket)
    except NoCredentialsError:
        raise ConfigError(f"--storage {remote.uri}: no AWS credentials (set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, or use an instance profile)") from None
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", "?"))
        if code in ("404", "NoSuchBucket"):
            raise ConfigError(f"--storage {remote.uri}: bucket {remote.bucket!r} does not exist at {endpoint} "
                              "(create it first)") from None
        if code in ("403", "AccessDenied"):
            raise ConfigError(f"--storage {remote.uri}: access to bucket {remote.bucket!r} at {endpoint} denied "
                              "(check the AWS credentials)") from None
        raise _fail(remote, f"reaching bucket {remote.bucket!r} at {endpoint}", e) from None
    except BotoCoreError as e:
        raise ConfigError(f"--storage {remote.uri}: cannot reach the S3 endpoint {endpoint} ({e}); set "
                          "AWS_ENDPOINT_URL for an S3-compatible server") from None
    probe = remote.fs_path(f"{rel}/.write_probe.{os.getpid()}")
    try:
        with remote.fs.open_output_stream(probe) as f:
            f.write(b"ok")
        remote.fs.delete_file(probe)
    except (OSError, ValueError) as e:
        raise _fail(remote, f"writing a probe object at {probe}", e) from None


# --------------------------------------------------------------------------
# the mirror: pull (bucket -> local cache), push (local -> bucket), moved (a set-aside trial dir)
def _skipped(rel: str) -> bool:
    parts = rel.split("/")
    return any(p.startswith("checkpoint_") or p in SKIP_PARTS for p in parts) or parts[-1] == LEASE_FILE


def pull(*paths: str | os.PathLike) -> None:
    """Refresh mirrored ``paths`` (files or directories) from the bucket. Within ``tune/`` the mirror
    is only a cache: a pulled directory there is replaced by what the bucket holds (checkpoints left out)."""
    for path in paths:
        found = find(path)
        if not found:
            continue
        remote, rel = found
        import pyarrow.fs as pafs

        local = Path(path)
        try:
            info = remote.fs.get_file_info(remote.fs_path(rel))
            if info.type == pafs.FileType.File:
                _download(remote, [(remote.fs_path(rel), local)])
                continue
            if info.type == pafs.FileType.NotFound:
                continue
            tune = local / "tune" if "tune" not in Path(rel).parts else local
            if tune.is_dir():
                shutil.rmtree(tune)
            base = remote.fs_path(rel)
            infos = remote.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            jobs = [(i.path, local / i.path[len(base) + 1:]) for i in infos
                    if i.type == pafs.FileType.File and not _skipped(i.path[len(base) + 1:])]
            _download(remote, jobs)
        except OSError as e:
            raise _fail(remote, f"reading {remote.location(rel)}", e) from None


def _download(remote: Remote, jobs: list[tuple[str, Path]]) -> None:
    def one(job: tuple[str, Path]) -> None:
        src, dest = job
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        with remote.fs.open_input_stream(src) as f:
            tmp.write_bytes(f.read())
        os.replace(tmp, dest)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, jobs))


def push(*paths: str | os.PathLike) -> None:
    """Upload mirrored ``paths`` (files or directories) to the bucket; paths outside a mirror are left alone."""
    import pyarrow.fs as pafs

    for path in paths:
        found = find(path)
        if not found:
            continue
        remote, rel = found
        try:
            if Path(path).is_dir():
                pafs.copy_files(str(Path(path).resolve()), remote.fs_path(rel),
                                source_filesystem=pafs.LocalFileSystem(), destination_filesystem=remote.fs)
            else:
                with remote.fs.open_output_stream(remote.fs_path(rel)) as f:
                    f.write(Path(path).read_bytes())
        except OSError as e:
            raise _fail(remote, f"writing {remote.location(rel)}", e) from None


def moved(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """``src`` (a mirrored directory) was moved to ``dest`` locally: move it in the bucket (copy, then delete)."""
    import pyarrow.fs as pafs

    found, to = find(src), find(dest)
    if not found or not to:
        return
    remote, rel = found
    try:
        if remote.fs.get_file_info(remote.fs_path(rel)).type == pafs.FileType.NotFound:
            return
        pafs.copy_files(remote.fs_path(rel), remote.fs_path(to[1]), source_filesystem=remote.fs,
                        destination_filesystem=remote.fs)
        remote.fs.delete_dir(remote.fs_path(rel))
    except OSError as e:
        raise _fail(remote, f"moving {remote.location(rel)} aside", e) from None


def acquire_lease(sdir: Path, alive, log=print):
    """The study's lease in the bucket (``studies.engine.s3lease``) when ``sdir`` is mirrored; else None."""
    found = find(sdir)
    if not found:
        return None
    from studies.engine.s3lease import Lease

    remote, rel = found
    return Lease(client(remote), remote.bucket, remote.key(f"{rel}/{LEASE_FILE}"), alive=alive, log=log).acquire()
