"""One driver per study on S3: a lease object written with conditional puts.

The lease is ``<study prefix>/driver.lease``: JSON with the holder's pid, host, a random token, when it
started and its last heartbeat. Every write is conditional, so the server decides between racing drivers:

* acquire: ``PutObject`` with ``If-None-Match: *`` creates the lease only if there is none.
* take over: a lease whose holder is dead may be replaced with ``If-Match: <the ETag read>``: of two
  drivers taking over the same dead lease, only one wins. The holder counts as dead when it ran on this
  host and its pid is gone (a killed driver resumed on the same machine: no wait), or when the lease was
  not renewed for ``ttl`` seconds by the server's own clock (``Last-Modified`` against the response's
  ``Date``; no clock of a client is compared with another's).
* heartbeat: the holder rewrites the lease every ``ttl / 6`` s with ``If-Match`` on its last ETag. A
  refused write (the lease was taken over or deleted), or no successful renewal for ``ttl / 2`` s (the
  server unreachable), means another driver may own the study now: the holder stops at once
  (``os._exit(3)``, without writing more), well before the lease can be taken over (``ttl``).
* release: ``DeleteObject`` with ``If-Match`` (where the server does not support a conditional delete,
  the lease is deleted only if it still carries our ETag).

Guarantee: as long as the server applies conditional writes atomically (AWS S3, MinIO and moto do) and the
holder's process is not frozen for longer than ``ttl / 2`` between a renewal and its next write, two
drivers never write to one study at the same time. A frozen process (SIGSTOP, a suspended VM) can outlive
its lease unnoticed: leases without fencing tokens cannot rule that out.

``ttl``: ``$REGTUNE_LEASE_TTL`` seconds, default 60.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any

from regtune.space import ConfigError

TTL_ENV = "REGTUNE_LEASE_TTL"


def default_ttl() -> float:
    text = os.environ.get(TTL_ENV, "60")
    try:
        ttl = float(text)
    except ValueError:
        ttl = -1.0
    if not 3 <= ttl <= 3600:
        raise ConfigError(f"{TTL_ENV}={text!r} is not allowed: expected seconds between 3 and 3600")
    return ttl


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _lost(reason: str) -> None:
    print(f"error: {reason}; stopping now so that two drivers never write to one study", file=sys.stderr, flush=True)
    os._exit(3)


class Lease:
    """The driver's hold on one study in a bucket (``acquire`` / ``release``; renewed by a thread)."""

    def __init__(self, client, bucket: str, key: str, *, alive: Callable[[int], bool], ttl: float | None = None,
                 log: Callable[[str], None] = print, on_lost: Callable[[str], None] = _lost,
                 host: str | None = None, pid: int | None = None):
        self.client, self.bucket, self.key = client, bucket, key
        self.alive, self.log, self.on_lost = alive, log, on_lost
        self.ttl = default_ttl() if ttl is None else ttl
        self.host, self.pid = host or socket.gethostname(), pid or os.getpid()
        self.token = secrets.token_hex(8)
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")
        self.etag: str | None = None
        self.previous: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def _body(self) -> bytes:
        return json.dumps({"pid": self.pid, "host": self.host, "token": self.token, "started": self.started,
                           "heartbeat": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()

    def _put(self, **condition: str) -> str:
        return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), **condition)["ETag"]

    def read(self) -> tuple[dict[str, Any], str, float] | None:
        """(holder, ETag, seconds since its last write by the server's clock), or None if there is no lease."""
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:  # noqa: BLE001 - botocore's ClientError
            if _code(e) in ("NoSuchKey", "404"):
                return None
            raise
        try:
            holder = json.loads(r["Body"].read().decode() or "{}")
        except ValueError:
            holder = {}
        now = parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"])
        return holder, r["ETag"], (now - r["LastModified"]).total_seconds()

    def acquire(self) -> Lease:
        for _ in range(3):  # the lease may vanish between a refused create and the read
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except Exception as e:  # noqa: BLE001
                code = _code(e)
                if code == "NotImplemented" or code == "501":
                    raise ConfigError(f"--storage: the S3 server does not support conditional writes (If-None-Match), "
                                      f"which the study's lease {self.where} needs") from None
                if code not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    raise ConfigError(f"--storage: writing the study's lease {self.where} failed ({e})") from None
            found = self.read()
            if found is None:
                continue
            holder, etag, age = found
            dead_here = holder.get("host") == self.host and isinstance(holder.get("pid"), int) \
                and not self.alive(holder["pid"])
            if not dead_here and age <= self.ttl:
                raise ConfigError(
                    f"the study {self.where.rsplit('/', 1)[0]} is in use by another driver (pid {holder.get('pid')} "
                    f"on {holder.get('host')}, since {holder.get('started')}, last heartbeat {age:.0f} s ago): wait "
                    f"for it, or stop it and run again (a dead driver's lease expires {self.ttl:.0f} s after its "
                    f"last heartbeat)")
            try:
                self.etag = self._put(IfMatch=etag)
            except Exception as e:  # noqa: BLE001
                if _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    raise ConfigError(f"the study's lease {self.where} was just taken by another driver") from None
                raise ConfigError(f"--storage: taking over the study's lease {self.where} failed ({e})") from None
            why = "its process is gone" if dead_here else f"no heartbeat for {age:.0f} s"
            self.log(f"taking over the study's lease from the previous driver (pid {holder.get('pid')} on "
                     f"{holder.get('host')}: {why})")
            self.previous = holder
            break
        else:
            raise ConfigError(f"the study's lease {self.where} keeps changing: another driver is starting")
        self._thread = threading.Thread(target=self._heartbeat, name="regtune-lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.ttl / 6):
            sent = time.monotonic()
            try:
                etag = self._put(IfMatch=self.etag)
            except Exception as e:  # noqa: BLE001
                if self._stop.is_set():
                    return
                if _code(e) in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                    self.on_lost(f"the study's lease {self.where} was taken over or deleted")
                    return
                if time.monotonic() - last_ok > self.ttl / 2:
                    self.on_lost(f"the study's lease {self.where} could not be renewed for "
                                 f"{time.monotonic() - last_ok:.0f} s ({e})")
                    return
                continue
            if self._stop.is_set():  # released while this write was in flight: undo it below in release
                self.etag = etag
                return
            self.etag, last_ok = etag, sent

    def release(self) -> None:
        if self.etag is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except Exception as e:  # noqa: BLE001
            if _code(e) not in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                found = self.read()  # a server without conditional deletes
                if found and found[1] == self.etag:
                    self.client.delete_object(Bucket=self.bucket, Key=self.key)
        self.etag = None
