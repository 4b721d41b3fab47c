"""The only place regtune touches Ray's private internals (checked against ray 2.60.0).

Ray has no public API for the five things below; each is wrapped here, in one small function, so that a Ray
upgrade that moves them breaks one file, and each degrades to "let Ray decide" when the private name is gone
(an ``ImportError`` or an unexpected error is reported as "unknown", never as a study failure).

* ``gcs_answers`` uses ``ray._raylet.GcsClient``: the preflight check (``studies.engine.preflight_services``)
  must tell "nothing at host:port", "something that is not a Ray GCS" and "a GCS that refuses this process's
  token" apart within seconds and *before* ``ray.init``, which would wait a minute and then fail with a long
  traceback. ``ray.init`` and the state API connect too (and start things); only the GCS client just asks.
* ``recorded_cluster`` uses ``ray._private.services.find_bootstrap_address``: ``--address auto`` means "the
  cluster ``ray start`` last started here", and this is Ray's own lookup of that record; reimplementing it
  would copy Ray's file layout (``/tmp/ray/ray_current_cluster``) and its liveness rules instead.
* ``ResultJsonLogger`` / ``ProgressCsvLogger`` override Tune's ``LoggerCallback._restore_from_remote``: a trial
  retried by ``FailureConfig`` must keep the rows of its ``result.json`` (below, "Per-trial logs").
* ``safe_checkpoint_retention`` wraps ``ray.train._internal.checkpoint_manager._delete_fs_path`` and Tune's
  experiment-state upload: a killed driver must leave state that names only checkpoints still on storage (below,
  "Checkpoint retention").
* ``release`` / ``Reaper`` read the GCS tables through ``ray._private.state`` (and ``ray._raylet`` ids): the
  placement groups a stopped multi-worker trial leaves reserved (below, "Placement groups").

Everything else the engine and the trainables need from Ray is public: the driver's Ray session directory is
``ray.get_runtime_context().get_temp_dir()`` joined with ``get_session_name()`` (``studies.engine.guard``), a
trial's storage directory is ``tune.get_context().get_storage()`` (a DeveloperAPI; ``trainables.train_dp``),
and whether a process is a Ray worker is ``ray.get_runtime_context().worker.mode`` (``trainables.quiet``).
The stage searcher and scheduler (``studies.engine.stage``) keep their own books instead of reading
``OptunaSearch._ot_trials`` or ``AsyncHyperBandScheduler._trial_info``.

Placement groups: Release what a Ray Train run leaves behind when Tune stops its trial before the run has shut down.

Why: a multi-worker trial (``trainables.train_dp``) runs a Ray Train controller actor inside the Tune trial;
the controller creates the workers' placement group. When Tune stops the trial while the Train run is still
running or finishing (ASHA stops every trial at ``max_t`` on its last report, earlier rungs stop the losers,
a failed trial is torn down before its retry), the trial's actor exits and the controller dies with it
(its owner died), before the controller has removed the placement group. Ray Core removes a non-detached
placement group only when its creator actor AND its creator job are both dead (ray-project/ray#65881), so the
group keeps its CPUs/GPUs reserved for as long as the study driver runs. The next trial's worker group then
never fits: Ray Train's worker-group start times out (60 s) and retries, the trial fails, Tune retries it, and
the study hangs. Ray Train's own ``PlacementGroupCleaner`` (a detached actor per Train run) is meant to catch
this, but it asks the Ray state API whether the controller is alive: a local Ray started without the
dashboard has no state API (the cleaner warns every second and never cleans up), and on a host with several
Ray instances the state API address cannot be resolved (its monitor thread dies with a ConnectionError) - the
cleaner then stays alive, a Python process, for as long as the cluster runs.

What: ``release()`` reads the GCS tables (no dashboard needed) and removes, for the caller's own Ray job only,
every placement group whose creator actor is dead (never one created by the driver: Tune's trial groups have
no creator actor), and stops the ``PlacementGroupCleaner`` actors (on this node) whose Train controller is gone.
``Reaper`` does this in a thread of the Tune trial while its Train run starts and runs, so a group leaked
by one trial is released within seconds, well inside the next worker group's start timeout.
(Private API of ray 2.60: the GCS accessor of ``ray._private.state`` and the tables' protobufs.)
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

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


# --------------------------------------------------------------------------
# placement groups a stopped Ray Train run leaves behind
REAP_INTERVAL_S = 2.0
CLEANER_CLASS = "PlacementGroupCleaner"  # ray.train.v2._internal.execution.controller.placement_group_cleaner


def _accessor():
    from ray._private.state import state

    return state._connect_and_get_accessor()


def stale_groups(job_hex: str | None = None) -> list:
    """Placement groups (GCS ``PlacementGroupTableData``) of this Ray job that are not removed, not detached,
    and whose creator actor is dead: nothing can use them any more, and Ray keeps them until the job ends."""
    import ray
    from ray._raylet import ActorID, JobID
    from ray.core.generated import gcs_pb2

    job_hex = job_hex or ray.get_runtime_context().get_job_id()
    out = []
    for raw in _accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached:
            continue
        if JobID(pg.creator_job_id).hex() != job_hex:
            continue
        if not pg.creator_actor_id or ActorID(pg.creator_actor_id).is_nil() or not pg.creator_actor_dead:
            continue  # created by the driver (Tune's trial groups), or its creator still runs
        out.append(pg)
    return out


def orphan_cleaners(job_hex: str | None = None) -> list:
    """Live ``PlacementGroupCleaner`` actors (GCS ``ActorTableData``) of this job whose owner, the Train
    controller that started them, is no longer a live actor (a controller that shuts down cleanly stops its
    cleaner itself)."""
    import ray
    from ray._raylet import JobID
    from ray.core.generated import gcs_pb2

    job_hex = job_hex or ray.get_runtime_context().get_job_id()
    alive = [gcs_pb2.ActorTableData.FromString(raw) for raw in _accessor().get_actor_table(None, "ALIVE")]
    workers = {a.address.worker_id for a in alive}
    return [a for a in alive if a.class_name == CLEANER_CLASS and JobID(a.job_id).hex() == job_hex
            and a.owner_address.worker_id not in workers]


def release(log: Callable[[str], None] | None = None) -> list[str]:
    """Remove this job's stale placement groups and kill its orphaned cleaners; returns what was released."""
    import ray
    from ray._raylet import NodeID, PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    done = []
    for pg in stale_groups():
        pid = PlacementGroupID(pg.placement_group_id)
        bundles = [dict(b.unit_resources) for b in pg.bundles]
        try:
            remove_placement_group(PlacementGroup(pid))
        except Exception as e:  # noqa: BLE001 - removed meanwhile (another trial's reaper); the next pass sees it
            if log:
                log(f"[train_dp] could not remove placement group {pid.hex()}: {type(e).__name__}: {e}")
            continue
        done.append(f"placement group {pid.hex()} {bundles}")
    node = ray.get_runtime_context().get_node_id()
    for actor in orphan_cleaners():
        # no handle to an anonymous detached actor can be had here (ray.kill needs one): stop its worker
        # process, which Ray's cleaners always have on the head node - the local machine's only node
        if NodeID(actor.address.node_id).hex() != node or not actor.pid:
            continue
        try:
            os.kill(actor.pid, signal.SIGTERM)
        except OSError:  # exited meanwhile, or not ours to stop
            continue
        done.append(f"{CLEANER_CLASS} actor {actor.actor_id.hex()} (pid {actor.pid})")
    if log:
        for what in done:
            log(f"[train_dp] released the {what} left by a stopped trial's Train run")
    return done


class Reaper:
    """``release()`` now and then every ``interval`` seconds in a daemon thread, until ``stop()``."""

    def __init__(self, log: Callable[[str], None] | None = print, interval: float = REAP_INTERVAL_S):
        self.log, self.interval = log, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="regtune-train-reaper", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                release(self.log)
            except Exception as e:  # noqa: BLE001 - GCS busy or shutting down: try again next time
                if self.log:
                    self.log(f"[train_dp] reaper: {type(e).__name__}: {e}")
            self._stop.wait(self.interval)

    def __enter__(self) -> Reaper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


# --------------------------------------------------------------------------
# per-trial logs that keep every row across a trial retry
#
# Tune's per-trial logs (``result.json``, ``progress.csv``) that keep every row across a trial retry.
#
# Tune's driver appends each trial's rows to a file in its staging directory and copies that directory to storage in
# the background (an experiment-state sync: at most one at a time, launched every few seconds and after
# checkpoints). When a trial's process dies and ``FailureConfig`` retries it in the same run, Tune's loggers first
# copy the storage's file back over the staging one (``LoggerCallback._restore_from_remote``, written for a driver
# restarted by ``Tuner.restore``, whose staging directory is new and empty; Ray 2.60). The storage copy is only as
# new as the last finished sync, so rows the driver logged after it (such as the report whose checkpoint the retry
# resumes from) are overwritten, and the next sync writes the shortened file to storage: the trial's curve has a
# hole. Seen on a loaded machine: a trial retried from its step-75 checkpoint had no step-75 row in result.json.
#
# These loggers restore from storage only when the staging file is missing (a new driver). A staging file that
# exists was written by this driver, row by row and flushed, and every storage copy of it is an older snapshot.
# Pass ``loggers()`` in ``RunConfig(callbacks=...)``: Tune then adds no JSON or CSV logger of its own.
class _KeepStagedRows:
    """Mixin: restore from storage only when this driver has no staging file of its own."""

    def _restore_from_remote(self, file_name: str, trial) -> None:
        if Path(trial.local_path, file_name).exists():  # this driver's own rows: the newest there are
            return
        super()._restore_from_remote(file_name, trial)  # a new driver (Tuner.restore): storage has them all


@functools.cache
def _logger_classes() -> dict[str, type]:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback  # imported when used: ray.tune is heavy

    class ResultJsonLogger(_KeepStagedRows, JsonLoggerCallback):
        """Tune's ``result.json`` logger; a retried trial keeps the rows logged before it died."""

    class ProgressCsvLogger(_KeepStagedRows, CSVLoggerCallback):
        """Tune's ``progress.csv`` logger; a retried trial keeps the rows logged before it died."""

    return {"ResultJsonLogger": ResultJsonLogger, "ProgressCsvLogger": ProgressCsvLogger}


def __getattr__(name: str):  # ResultJsonLogger, ProgressCsvLogger (module attributes, defined when first used)
    if name in ("ResultJsonLogger", "ProgressCsvLogger"):
        return _logger_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def loggers() -> list:
    """The per-trial loggers for ``tune.RunConfig(callbacks=[..., *loggers()])``."""
    classes = _logger_classes()
    return [classes["ResultJsonLogger"](), classes["ProgressCsvLogger"]()]


# --------------------------------------------------------------------------
# Checkpoint retention across a killed driver
#
# Tune keeps ``num_to_keep`` checkpoints per trial: when a trial reports a new one, the trial's checkpoint manager
# (in the driver) deletes the oldest at once. The experiment state, which a resumed driver restores and which names
# each trial's latest checkpoint, reaches storage only later (Tune saves it every ~10 s, or after ``num_to_keep``
# checkpoints of a trial, and uploads it in the background). A driver killed in between leaves state in storage
# that names a checkpoint it has already deleted; two things then go wrong on resume (both seen with S3 storage):
# - the restored trial's latest checkpoint is gone: Tune fails to restore it ("Could not recover from checkpoint as
#   it does not exist on storage anymore"), retries it ``max_failures`` times with the same result, and the trial
#   ends in ERROR - a trial lost to the kill (1 of 30 kill/resume runs);
# - a restored trial's older checkpoint is gone: the new driver deletes it again, Ray 2.60's ``_delete_fs_path``
#   raises ``FileNotFoundError`` and Tune logs an "Error handling checkpoint" traceback (2 of 15 runs).
# ``safe_checkpoint_retention`` fixes the order: a checkpoint Tune's retention drops is deleted only once an
# experiment state saved after the drop (so without it) is on storage - after the upload of the next state Tune
# saves has finished (the final save of a run waits for its upload anyway). A delete skips a checkpoint that is
# already gone. The cost: up to one more checkpoint per trial is on storage for a few seconds, and a driver killed
# before its next state save leaves the checkpoints it dropped since its last save on storage (Tune no longer lists
# them, so nothing deletes them later: at most a few per trial per kill). Private API of ray 2.60:
# ``ray.train._internal.checkpoint_manager._delete_fs_path`` (the one delete of the retention) and
# ``ray.tune.execution.experiment_state._ExperimentCheckpointManager.sync_up_experiment_state`` with its storage's
# ``syncer`` (the one save + upload of the experiment state).
_dropped: list[tuple] = []  # (filesystem, path) of checkpoints dropped by the retention, not yet deleted


def _delete_if_present(delete: Callable, fs, fs_path: str) -> None:
    import pyarrow.fs

    if fs.get_file_info(fs_path).type != pyarrow.fs.FileType.NotFound:
        delete(fs=fs, fs_path=fs_path)


def safe_checkpoint_retention() -> None:
    """Make Tune delete a checkpoint its retention drops only after an experiment state without it is on storage,
    and skip one that is already gone (see above). Call in the driver before each ``fit``: checkpoints a previous
    run of this process dropped but never deleted (its last state upload failed) are kept."""
    try:
        from ray.train._internal import checkpoint_manager
        from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
    except ImportError:  # moved in another Ray: let Ray decide
        return
    _dropped.clear()
    if getattr(checkpoint_manager._delete_fs_path, "_regtune", False):
        return
    delete, sync_up = checkpoint_manager._delete_fs_path, _ExperimentCheckpointManager.sync_up_experiment_state

    def drop(fs, fs_path: str) -> None:
        _dropped.append((fs, fs_path))

    @functools.wraps(sync_up)
    def sync_up_then_delete(self, save_fn, force: bool = False, wait: bool = False) -> None:
        dropped, saved, synced = list(_dropped), self._last_save_time, self._last_sync_time
        sync_up(self, save_fn, force=force, wait=wait)
        if not dropped or self._last_save_time == saved:  # nothing to delete, or no state saved this time
            return
        syncer = self._storage.syncer
        try:
            if self._last_sync_time == synced:  # an earlier upload was still running: send the state just saved
                syncer.wait()
                syncer.sync_up(self._storage.experiment_driver_staging_path, self._storage.experiment_fs_path)
            syncer.wait()
        except Exception:  # noqa: BLE001 - Tune reports a failed upload itself; keep the checkpoints for now
            return
        for fs, fs_path in dropped:
            _delete_if_present(delete, fs, fs_path)
            _dropped.remove((fs, fs_path))

    drop._regtune = True
    checkpoint_manager._delete_fs_path = drop
    _ExperimentCheckpointManager.sync_up_experiment_state = sync_up_then_delete
