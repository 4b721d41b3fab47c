"""IRE-paper vision models and tasks: parameter counts, shapes, the ImageFolder task, smoke runs."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torchvision

from regtune.data.cifar import write_fake_cifar
from regtune.data.imagenet import ImageFolderMissing, write_fake_imagenet
from regtune.loop import Run
from regtune.models.resnet_cifar56 import resnet56_cifar
from regtune.models.vit import vit_cifar, vit_s16
from regtune.models.wrn import wrn28_10
from regtune.space import ConfigError
from regtune.tasks.base import get_task

torch.set_num_threads(1)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts():
    # ResNet-56 (option A): 0.85M; the count of the public CIFAR ResNet code
    assert count(resnet56_cifar(10)) == 853_018
    assert count(vit_cifar("tiny", 100)) == 5_380_132  # ViT-T 32/4: ~5.4M
    with torch.device("meta"):  # no memory for the big ones
        assert count(wrn28_10(10)) == 36_479_194  # WRN-28-10: 36.5M
        assert count(vit_cifar("small", 100)) == 21_376_996
        assert count(vit_s16(1000)) == 22_050_664  # DeiT-S / ViT-S/16
        assert count(torchvision.models.resnet50(weights=None)) == 25_557_032


def test_forward_shapes_of_small_variants():
    x = torch.randn(2, 3, 32, 32)
    assert resnet56_cifar(100, depth=8, width=0.25)(x).shape == (2, 100)
    assert wrn28_10(10, depth=10, widen_factor=1, width=0.5)(x).shape == (2, 10)
    assert vit_cifar("tiny", 7, dim=16, depth=1, heads=2)(x).shape == (2, 7)
    assert vit_s16(5, image_size=32, dim=16, depth=1, heads=2)(x).shape == (2, 5)
    wrn = wrn28_10(10, depth=10, widen_factor=2)
    # stem + 2 per block + a 1x1 shortcut in each stage's first block (16 -> 32 widens stage 1 too)
    assert sum(1 for m in wrn.modules() if isinstance(m, torch.nn.Conv2d)) == 1 + 3 * 2 + 3
    with pytest.raises(ValueError, match="depth=57"):
        resnet56_cifar(10, depth=57)
    with pytest.raises(ValueError, match="depth=27"):
        wrn28_10(10, depth=27)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", 384, 128)
    write_fake_cifar(root, "cifar100", 384, 128)
    return str(root)


def test_cifar_ire_task_defaults():
    for name in ("cifar10_wrn28_10", "cifar100_wrn28_10", "cifar10_resnet56", "cifar100_resnet56",
                 "cifar100_vit_t", "cifar100_vit_s"):
        task = get_task(name)
        assert task.loop_defaults["steps"] == 62500 and task.loop_defaults["lr_schedule"] == "warmup_cosine"
    from regtune.methods import resolve_config
    from studies import get_study
    from studies.spec import first_config

    assert resolve_config("sam_adamw", {"task": "cifar100_vit_s"})["label_smoothing"] == 0.1
    # the paper's optimizer settings: the studies' recipes (each cell's first config)
    table1 = get_study("ire_cifar")
    c = first_config(table1, table1.cell("cifar10_wrn28_10-sgd_ire"), "paper")
    # IRE from 35% of training: epoch 70 of 200 in the reference code
    assert (c["lr"], c["momentum"], c["weight_decay"], c["ire_start_frac"]) == (0.1, 0.9, 5e-4, 0.35)
    c = first_config(table1, table1.cell("cifar10_wrn28_10-sam_ire"), "paper")  # SAM over SGD: no Adam keys
    assert (c["momentum"], c["sam_rho"], c["lr"], c["batch_size"]) == (0.9, 0.05, 0.1, 128) and "betas" not in c
    table3 = get_study("ire_vit_cifar100")
    c = first_config(table3, table3.cell("cifar100_vit_s-sam_adamw"), "paper")  # SAM over AdamW: no momentum
    assert c["betas"] == (0.9, 0.999) and "momentum" not in c and c["lr"] == 1e-3 and c["weight_decay"] == 0.05
    with pytest.raises(ConfigError, match="width"):
        resolve_config("adamw", {"task": "cifar100_vit_t", "width": 0.5})


@pytest.mark.parametrize("task,method", [
    ("cifar10_wrn28_10", "sgd_ire"), ("cifar100_resnet56", "sam_ire"), ("cifar100_vit_t", "adamw_ire"),
    ("cifar100_vit_s", "sam_adamw_ire"),
])
def test_smoke_runs_are_finite(cifar_dir, task, method):
    run = Run(method, {"task": task, "size": "smoke", "data_dir": cifar_dir, "ire_interval": 2})
    reports = list(run.reports())
    assert reports[-1]["step"] == 4
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["val/loss"]) for r in reports)
    assert run.optimizer.num_refreshes == 2 and "test/accuracy" in reports[-1]


def test_run_resumes_bit_for_bit(cifar_dir):
    config = {"task": "cifar10_resnet56", "size": "smoke", "data_dir": cifar_dir, "ire_interval": 3, "steps": 6}
    full = Run("sgd_ire", config)
    want = list(full.reports())
    first = Run("sgd_ire", config)
    it = first.reports()
    next(it)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = Run("sgd_ire", config)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    got = list(resumed.reports())
    assert got[-1]["train/loss"] == want[-1]["train/loss"]
    assert all(torch.equal(p, q) for p, q in zip(full.model.parameters(), resumed.model.parameters()))


def test_imagenet_task_on_a_generated_folder(tmp_path):
    write_fake_imagenet(tmp_path, num_classes=3, train_per_class=4, val_per_class=2, size=36)
    run = Run("adamw_ire", {"task": "imagenet_vit_s", "size": "smoke", "data_dir": str(tmp_path),
                            "ire_interval": 1, "ire_start": 0})  # IRE at once, as the ire_imagenet smoke scale
    assert run.task.num_classes == 3 and run.config["ire_start"] == 0
    x, y = run.task.train_batch(2)
    # the ViT task's DeiT recipe mixes batches (Mixup / CutMix): targets are class probabilities
    assert x.shape == (8, 3, 32, 32) and y.shape == (8, 3) and torch.allclose(y.sum(1), torch.ones(8))
    again = Run("adamw_ire", {"task": "imagenet_vit_s", "size": "smoke", "data_dir": str(tmp_path)})
    x0 = again.task.train_batch(0)[0]
    x2, y2 = again.task.train_batch(2)  # out of order: the stream restarts at step 2
    assert torch.equal(x2, x) and torch.equal(y2, y) and not torch.equal(x0, x)
    reports = list(run.reports())
    assert all(math.isfinite(r["train/loss"]) for r in reports) and 0.0 <= reports[-1]["val/accuracy"] <= 1.0


def test_imagenet_missing_folder_names_it(tmp_path):
    missing = tmp_path / "no_imagenet_here"
    with pytest.raises(ImageFolderMissing, match="no_imagenet_here"):
        Run("sgd", {"task": "imagenet_resnet50", "size": "smoke", "data_dir": str(missing)})
