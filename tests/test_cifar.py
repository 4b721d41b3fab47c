"""CIFAR data (torchvision on-disk format, protocol splits, on-device augmentation), models and tasks."""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from regtune.data.cifar import (
    CifarData,
    CifarFilesMissing,
    augment,
    load_cifar,
    resolve_data_dir,
    write_fake_cifar,
)
from regtune.loop import Run
from regtune.methods import resolve_config
from regtune.models.resnet_cifar import resnet18_cifar
from regtune.models.vgg import vgg11_nodropout, vgg16_bn
from regtune.space import ConfigError
from regtune.tasks.base import get_task

torch.set_num_threads(1)
CPU = torch.device("cpu")
IMPLICIT_TASKS = ("cifar10_resnet18", "cifar100_resnet18", "cifar10_vgg11", "cifar10_vgg16", "cifar100_vgg16")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_fake_cifar(d, "cifar10", n_train=500, n_test=120, seed=0)
    write_fake_cifar(d, "cifar100", n_train=450, n_test=110, seed=1)
    return d


@pytest.mark.parametrize("kind,cls", [("cifar10", torchvision.datasets.CIFAR10),
                                      ("cifar100", torchvision.datasets.CIFAR100)])
def test_files_are_torchvision_format_and_read_alike(kind, cls, root, monkeypatch):
    # torchvision md5-checks the real archives; our generated files differ, so check only that they exist
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    raw = load_cifar(kind, root)
    for train, prefix in ((True, "train"), (False, "test")):
        tv = cls(str(root), train=train, download=False)
        assert np.array_equal(tv.data, raw[f"{prefix}_x"].permute(0, 2, 3, 1).numpy())  # NHWC in torchvision
        assert tv.targets == raw[f"{prefix}_y"].tolist()
    assert raw["train_x"].dtype == torch.uint8 and raw["train_x"].shape[1:] == (3, 32, 32)
    assert len(tv.classes) == (10 if kind == "cifar10" else 100)


def test_reader_accepts_python2_style_bytes_keys(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10, seed=0)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:
        entry = pickle.load(f)
    with open(path, "wb") as f:  # the original archives were written by Python 2 with byte-string keys
        pickle.dump({k.encode(): v for k, v in entry.items()}, f, protocol=2)
    raw = load_cifar("cifar10", tmp_path)
    assert raw["test_y"].tolist() == entry["labels"]


def test_protocol_splits(root):
    raw = load_cifar("cifar10", root)
    data = CifarData("cifar10", data_dir=str(root), n_train=300, n_val=150, n_test=None,
                     device=CPU, seed=0)
    assert torch.equal(data.train_x, raw["train_x"][:300])  # the first n_train
    assert torch.equal(data.val_x, raw["train_x"][-150:])  # the last n_val
    assert torch.equal(data.val_y, raw["train_y"][-150:])
    assert torch.equal(data.test_x, raw["test_x"])  # the official test set
    assert sum(x.shape[0] for x, _ in data.eval_batches("val", 64)) == 150
    with pytest.raises(ConfigError, match="n_train=400 \\+ n_val=150.*only 500 images"):
        CifarData("cifar10", data_dir=str(root), n_train=400, n_val=150, n_test=None,
                  device=CPU, seed=0)


def test_full_train_trains_on_every_training_image(root):
    """The confirm phase's ``full_train``: the whole training set trains (the papers' protocol), whatever n_train
    says; val stays the last n_val (inside the training data then)."""
    raw = load_cifar("cifar10", root)
    data = CifarData("cifar10", data_dir=str(root), n_train=300, n_val=150, n_test=None,
                     device=CPU, seed=0, full_train=True)
    assert torch.equal(data.train_x, raw["train_x"]) and data.train_x.shape[0] == 500
    assert torch.equal(data.val_x, raw["train_x"][-150:])
    seen = torch.cat([data.train_indices(s, 100) for s in range(5)])  # one epoch visits all 500
    assert sorted(seen.tolist()) == list(range(500))


def test_paper_split_sizes_are_40000_and_10000():
    task = get_task("cifar10_resnet18")
    c = resolve_config("pseudo_gd", {"task": task.name})
    assert (c["n_train"], c["n_val"], c["n_test"]) == (40000, 10000, None)
    assert c["full_train"] is False  # the search holds 10000 out; the confirm phase sets it
    assert resolve_config("sgd", {"task": "cifar100_resnet18_cpr", "full_train": True})["full_train"] is True
    assert task.splits == ("val", "test")


@pytest.mark.parametrize("kind,folder,files", [
    ("cifar10", "cifar-10-batches-py", ["data_batch_1", "data_batch_5", "test_batch"]),
    ("cifar100", "cifar-100-python", ["train", "test"]),
])
def test_missing_data_dir_is_a_clear_error(kind, folder, files, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CifarFilesMissing) as info:
        load_cifar(kind, missing)
    msg = str(info.value)
    assert str(missing) in msg and folder in msg and f"python -m studies prepare {kind} --data-dir {missing}" in msg
    assert all(f in msg for f in files)
    assert not missing.exists()  # nothing created or downloaded


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("REGTUNE_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir("/x/y") == resolve_data_dir("/x/y")
    assert str(resolve_data_dir("/x/y")) == "/x/y"
    monkeypatch.delenv("REGTUNE_DATA_DIR")
    assert resolve_data_dir(None).parts[-3:] == (".cache", "regtune", "data")


def make_data(root, seed=0, **kw):
    args = {"data_dir": str(root), "n_train": 320, "n_val": 100, "n_test": None, "device": CPU,
            "seed": seed}
    return CifarData("cifar10", **{**args, **kw})


def test_train_batch_is_a_pure_function_of_seed_and_step(root):
    a, b = make_data(root), make_data(root)
    for step in (5, 0, 17, 5):  # any order, any instance
        xa, ya = a.train_batch(step, 64)
        xb, yb = b.train_batch(step, 64)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.train_batch(1, 64)[0], a.train_batch(2, 64)[0])
    assert not torch.equal(make_data(root, seed=1).train_batch(1, 64)[0], a.train_batch(1, 64)[0])


def test_each_epoch_visits_every_training_image_once(root):
    data = make_data(root)
    per_epoch = 320 // 64
    for epoch in range(2):
        idx = torch.cat([data.train_indices(epoch * per_epoch + i, 64) for i in range(per_epoch)])
        assert sorted(idx.tolist()) == list(range(320))
    # a batch straddling two epochs (96 does not divide 320) still has unique images in each epoch part
    idx = torch.cat([data.train_indices(s, 96) for s in range(10)])  # 960 = 3 epochs
    for e in range(3):
        assert sorted(idx[e * 320:(e + 1) * 320].tolist()) == list(range(320))


def test_augment_crop_flip_and_padding_by_hand():
    img = torch.arange(3 * 32 * 32, dtype=torch.float32).reshape(1, 3, 32, 32) % 251
    img = img.to(torch.uint8)
    centre = augment(img, torch.tensor([[4, 4]]), torch.tensor([False]))
    assert torch.equal(centre, img.float())  # offset (4, 4) of the padded image = no shift
    flipped = augment(img, torch.tensor([[4, 4]]), torch.tensor([True]))
    assert torch.equal(flipped, img.float().flip(-1))
    corner = augment(img, torch.tensor([[0, 0]]), torch.tensor([False]), "zeros")
    assert torch.equal(corner[..., :4, :], torch.zeros(1, 3, 4, 32))
    assert torch.equal(corner[..., 4:, 4:], img.float()[..., :28, :28])
    reflect = augment(img, torch.tensor([[0, 8]]), torch.tensor([False]), "reflect")
    # reflect padding: padded row r (r < 4) is image row 4 - r; padded col 8 + j is image col 4 + j, mirrored past 31
    assert torch.equal(reflect[0, :, 0, :28], img.float()[0, :, 4, 4:])
    assert torch.equal(reflect[0, :, 4:, 28], img.float()[0, :, :28, 30])


def test_train_batch_is_normalized_and_augmented(root):
    data = make_data(root, augment=False)
    x, y = data.train_batch(0, 320)
    idx = data.train_indices(0, 320)
    mean = torch.tensor(data.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.spec.std).view(1, 3, 1, 1)
    assert torch.allclose(x, (data.train_x[idx].float() / 255 - mean) / std, atol=1e-5)
    assert torch.equal(y, data.train_y[idx])
    aug = make_data(root).train_batch(0, 320)[0]
    assert aug.shape == x.shape and not torch.equal(aug, x)


# --------------------------------------------------------------------------
# models
def test_resnet18_cifar_shape_and_size():
    model = resnet18_cifar(10)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the standard CIFAR ResNet-18
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert resnet18_cifar(100, width=0.0625)(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_vgg11_has_no_batchnorm_or_dropout():
    model = vgg11_nodropout(10)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in model.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 8
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 512), (512, 10)]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg16_bn_is_torchvisions():
    ours = vgg16_bn(10).eval()
    theirs = torchvision.models.vgg16_bn(num_classes=10).eval()
    theirs.load_state_dict(ours.state_dict())  # same names and shapes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-6)
    small = vgg16_bn(100, width=0.0625, head="cifar")
    assert small(x).shape == (2, 100)


# --------------------------------------------------------------------------
# tasks
def test_paper_settings_are_the_studies_recipes():
    """Each paper's settings are its study's cells' first configs; the tasks name no method."""
    from studies import get_study
    from studies.spec import first_config

    def first(study: str, cell: str, scale: str = "paper") -> dict:
        s = get_study(study)
        return first_config(s, s.cell(cell), scale)

    sgd = first("implicit_main", "cifar10_resnet18-sgd")
    assert (sgd["batch_size"], sgd["lr"], sgd["momentum"], sgd["weight_decay"], sgd["eval_every"]) == (
        128, 0.1, 0.0, 0.0, 20)
    pgd = first("implicit_main", "cifar100_resnet18-pseudo_gd")
    assert (pgd["batch_size"], pgd["micro_batch_size"], pgd["lr"], pgd["steps"]) == (5120, 128, 0.5, 5000)
    aj = first("implicit_main", "cifar10_vgg11-avg_jacobian")
    assert (aj["lr"], aj["reg_lambda"]) == (0.01, 2e-5)
    assert first("implicit_grafting", "cifar100_vgg16-ngd")["lr"] == 0.4322
    assert first("implicit_grafting", "cifar10_vgg16-sgd")["lr"] == 0.05
    smoke_sgd = first("implicit_main", "cifar10_vgg11-sgd", "smoke")
    smoke_gn = first("implicit_main", "cifar10_vgg11-grad_norm", "smoke")
    assert smoke_sgd["batch_size"] == smoke_gn["micro_batch_size"] == 8 and smoke_gn["batch_size"] == 32
    cpr = first("cpr_cifar100", "adamw")
    assert (cpr["batch_size"], cpr["steps"], cpr["lr_schedule"], cpr["warmup_steps"], cpr["lr_min_ratio"],
            cpr["label_smoothing"], cpr["padding_mode"], tuple(cpr["betas"])) == (
        128, 20000, "warmup_cosine", 500, 0.1, 0.1, "reflect", (0.9, 0.98))
    for name in IMPLICIT_TASKS + ("cifar100_resnet18_cpr",):
        assert get_task(name).resources["gpu"] > 0


@pytest.mark.parametrize("name", IMPLICIT_TASKS + ("cifar100_resnet18_cpr",))
def test_smoke_run_reports_test_accuracy(name, root):
    method = "adamw" if name.endswith("_cpr") else "sgd"
    run = Run(method, {"task": name, "size": "smoke", "data_dir": str(root), "steps": 2, "eval_every": 2})
    (report,) = list(run.reports())
    assert math.isfinite(report["train/loss"]) and 0.0 <= report["val/accuracy"] <= 1.0
    assert "test/accuracy" in report and "test/accuracy_best" in report
    assert run.task.num_classes == (100 if "cifar100" in name else 10)
