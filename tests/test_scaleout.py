"""Multi-worker trials: what the driver asks Ray for, and whether cluster.yaml can hold the paper scales."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from studies import get_study
from studies.engine.driver import _resources
from studies.engine.scaleout import TRIAL_CPU, default_concurrency, trial_request, worker_request
from studies.spec import cell_configs

ROOT = Path(__file__).resolve().parents[1]
# the GPU count per run of each paper's own training commands (seed READMEs); see the study modules
PAPER_WORKERS = {"cpr_gpt2": 8, "ire_llama": 2, "ire_imagenet": 4}


def test_one_process_trials_ask_as_before():
    assert trial_request({"cpu": 2, "gpu": 0.25}, 1, {"CPU": 8}) == ({"cpu": 2, "gpu": 0.25}, None)
    assert default_concurrency([(1, {"cpu": 2})], {"CPU": 6}) == 6  # the driver's rule before workers existed


def test_worker_group_on_a_laptop_fits_its_cores():
    trial, spec = trial_request({"cpu": 1, "gpu": 0}, 2, {"CPU": 2})
    assert trial == {"cpu": TRIAL_CPU, "gpu": 0}
    assert spec == {"num": 2, "cpu": 0.99, "gpu": 0.0}
    assert spec["num"] * spec["cpu"] + trial["cpu"] <= 2
    assert default_concurrency([(2, spec)], {"CPU": 2}) == 1


def test_worker_groups_on_a_gpu_cluster():
    spec = worker_request({"cpu": 4, "gpu": 1}, 8, {"CPU": 192, "GPU": 8})
    assert spec == {"cpu": 4.0, "gpu": 1.0}  # fits: unchanged
    assert default_concurrency([(8, spec), (1, {"cpu": 4, "gpu": 1})], {"CPU": 240, "GPU": 12}) == 1  # 12 // 8
    assert default_concurrency([(2, {"cpu": 4, "gpu": 1})], {"CPU": 48, "GPU": 4}) == 2
    # an autoscaling cluster that has no GPU node yet: the request stays, one trial at a time
    assert worker_request({"cpu": 4, "gpu": 1}, 8, {"CPU": 0}) == {"cpu": 4.0, "gpu": 1.0}
    assert default_concurrency([(8, {"cpu": 4, "gpu": 1})], {"CPU": 0}) == 1


@pytest.mark.parametrize("name, workers", sorted(PAPER_WORKERS.items()))
def test_paper_scales_request_the_papers_gpus_and_a_node_type_holds_them(name, workers, monkeypatch):
    study = get_study(name)
    nodes = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
    big = {"CPU": 10_000, "GPU": 10_000}
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: big)  # _resources caps by the cluster: a huge one
    for cell in study.cells:
        fixed, _ = cell_configs(study, cell, "paper")
        assert fixed.get("workers") == workers, cell.name
        _, spec = trial_request(_resources(study, cell, "paper"), workers, big)
        assert spec["gpu"] == 1  # one whole GPU a worker
        fits = [n for n, t in nodes.items() if t["resources"].get("GPU", 0) >= workers * spec["gpu"]
                and t["resources"].get("CPU", 0) >= workers * spec["cpu"]]
        assert fits, f"{name}/{cell.name}: no node type of cluster.yaml holds {workers} x {spec}"
        smoke, _ = cell_configs(study, cell, "smoke")
        assert smoke.get("workers", 1) == 1  # CI-sized runs stay one process
