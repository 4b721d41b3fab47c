"""``trainables.ray_internals`` on a real local Ray (no dashboard, as the study driver starts it).

Ray's rule that makes a stopped multi-worker trial hang the next one: a placement group created by an actor
stays reserved after that actor dies, as long as its job runs. The test reproduces it (an actor that creates a
2-bundle group, like a Ray Train controller, is killed; a group of the same size then cannot be placed), then
checks that ``release()`` frees it (the waiting group is placed), kills a detached ``PlacementGroupCleaner``
whose creator died, and leaves alone the driver's own groups (Tune's trial groups) and groups whose creator
still runs.
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group  # noqa: E402

from tests.conftest import wait_until  # noqa: E402
from trainables import ray_internals as train_groups  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class PlacementGroupCleaner:  # the class name Ray Train's detached cleaner has
    def ping(self) -> bool:
        return True


@ray.remote(num_cpus=0)
class Controller:
    """Like a Ray Train controller: creates its workers' placement group and a detached cleaner."""

    def start(self, cpu: float, with_cleaner: bool) -> tuple[str, str | None]:
        pg = placement_group([{"CPU": cpu}, {"CPU": cpu}])
        assert pg.wait(120)
        cleaner = None
        if with_cleaner:
            self.cleaner = PlacementGroupCleaner.options(lifetime="detached").remote()
            ray.get(self.cleaner.ping.remote())
            cleaner = self.cleaner._actor_id.hex()
        return pg.id.hex(), cleaner


def _state(pg_hex: str) -> str:
    return placement_group_table().get(pg_hex, {}).get("state", "GONE")


def _actor_state(actor_hex: str) -> str:
    from ray._private.state import state

    return state.actor_table(actor_hex).get("State", "GONE")


def test_a_dead_creators_group_stays_reserved_until_released(local_ray):
    driver_pg = placement_group([{"CPU": 0.01}])  # as Tune's trial group: created by the driver
    assert driver_pg.wait(60)
    running = Controller.remote()
    kept, _ = ray.get(running.start.remote(0.01, False))  # its creator still runs
    stopped = Controller.remote()
    leaked, cleaner = ray.get(stopped.start.remote(0.95, True))
    ray.kill(stopped)  # as Tune stopping a trial whose Train run has not shut down yet
    wait_until(lambda: any(pg.placement_group_id.hex() == leaked for pg in train_groups.stale_groups()), 60,
          "the GCS to mark the group's creator dead")

    # Ray's behaviour: the group stays reserved (its creator's job is alive), so the next one cannot be placed
    assert _state(leaked) == "CREATED"
    nxt = placement_group([{"CPU": 0.95}, {"CPU": 0.95}])
    assert not nxt.wait(3)
    assert [a.actor_id.hex() for a in train_groups.orphan_cleaners()] == [cleaner]

    released = train_groups.release()
    assert any(leaked in r for r in released) and any(cleaner in r for r in released), released
    assert nxt.wait(60), "the freed CPUs were not given to the waiting group"
    assert _state(leaked) == "REMOVED"
    wait_until(lambda: _actor_state(cleaner) == "DEAD", 60, "the orphaned cleaner to die")
    # the driver's group and the live creator's group are left alone
    assert _state(driver_pg.id.hex()) == "CREATED" and _state(kept) == "CREATED"
    assert train_groups.stale_groups() == [] and train_groups.release() == []

    for pg in (nxt, driver_pg):
        remove_placement_group(pg)
    ray.kill(running)
