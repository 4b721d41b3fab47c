"""The only place regtune touches Ray's private internals (checked against ray 2.60.0).

Ray has no public API for the two things below; each is wrapped here, in one small function, so that a Ray
upgrade that moves them breaks one file, and each degrades to "let Ray decide" when the private name is gone
(an ``ImportError`` or an unexpected error is reported as "unknown", never as a study failure).

* ``gcs_answers`` uses ``ray._raylet.GcsClient``: the preflight check (``studies.engine.preflight_services``)
  must tell "nothing at host:port", "something that is not a Ray GCS" and "a GCS that refuses this process's
  token" apart within seconds and *before* ``ray.init``, which would wait a minute and then fail with a long
  traceback. ``ray.init`` and the state API connect too (and start things); only the GCS client just asks.
* ``recorded_cluster`` uses ``ray._private.services.find_bootstrap_address``: ``--address auto`` means "the
  cluster ``ray start`` last started here", and this is Ray's own lookup of that record; reimplementing it
  would copy Ray's file layout (``/tmp/ray/ray_current_cluster``) and its liveness rules instead.

Everything else the engine and the trainables need from Ray is public: the driver's Ray session directory is
``ray.get_runtime_context().get_temp_dir()`` joined with ``get_session_name()`` (``studies.engine.guard``), a
trial's storage directory is ``tune.get_context().get_storage()`` (a DeveloperAPI; ``trainables.train_dp``),
and whether a process is a Ray worker is ``ray.get_runtime_context().worker.mode`` (``trainables.quiet``).
The stage searcher and scheduler (``studies.engine.stage``) keep their own books instead of reading
``OptunaSearch._ot_trials`` or ``AsyncHyperBandScheduler._trial_info``.
"""

from __future__ import annotations

UNKNOWN = "unknown"


def gcs_answers(address: str) -> None:
    """Return if a Ray GCS at ``host:port`` answers with its cluster id; raise what Ray's client raised otherwise
    (an ``RpcError``, an authentication error ...). ``ImportError``: the private client moved (caller decides)."""
    from ray._raylet import GcsClient

    GcsClient(address=address).cluster_id  # noqa: B018 - the constructor asks the GCS for its cluster id


def recorded_cluster() -> str | None:
    """The GCS address of the cluster ``ray start`` last started on this machine (Ray's own lookup); None if
    none is recorded, ``UNKNOWN`` if Ray's private lookup is not there any more (then ``ray.init`` decides)."""
    try:
        from ray._private.services import find_bootstrap_address
    except ImportError:
        return UNKNOWN
    try:
        return find_bootstrap_address(None)
    except Exception:  # noqa: BLE001 - unreadable record: same as none
        return None
