"""ImageNet ViT-S/16 trains with the DeiT-S recipe (regtune.tasks.imagenet, augment=deit): the per-image
transforms run on a tiny generated ImageFolder, Mixup / CutMix turn the targets into class probabilities that the
loss handles (label smoothing included), batches stay a pure function of (seed, step), and stochastic depth
drops residual branches only in training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regtune.data.imagenet import batch_mixer, mix_batch, train_transform, write_fake_imagenet
from regtune.loop import Run
from regtune.methods import resolve_config
from regtune.models.vit import ViT
from regtune.tasks.base import accuracy, get_task


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_vit_task_defaults_are_the_deit_s_recipe():
    c = resolve_config("adamw", {"task": "imagenet_vit_s"})
    assert c["augment"] == "deit" and (c["randaugment_ops"], c["randaugment_magnitude"]) == (2, 27)
    assert (c["mixup_alpha"], c["cutmix_alpha"], c["mix_switch_prob"]) == (0.8, 1.0, 0.5)
    assert c["random_erasing"] == 0.25 and c["label_smoothing"] == 0.1 and c["drop_path"] == 0.1
    assert c["batch_size"] == 1024
    from studies import get_study
    from studies.spec import first_config

    study = get_study("ire_imagenet")  # DeiT's AdamW: the study's recipe (a task names no optimizer)
    c = first_config(study, study.cell("imagenet_vit_s-adamw"), "paper")
    assert c["lr"] == pytest.approx(5e-4 * 1024 / 512) and c["weight_decay"] == 0.05
    assert c["steps"] == round(300 * 1_281_167 / 1024) and c["lr_schedule"] == "warmup_cosine"
    assert c["warmup_steps"] == round(30 * 1_281_167 / 1024) and c["lr_min_ratio"] == pytest.approx(1e-5 / 1e-3)
    assert resolve_config("sgd", {"task": "imagenet_resnet50"})["augment"] == "basic"


def test_deit_transforms_run_and_are_seeded(tmp_path):
    from PIL import Image

    root = write_fake_imagenet(tmp_path / "im", num_classes=3, train_per_class=2, val_per_class=1, size=48)
    image = Image.open(next((root / "train").rglob("*.png"))).convert("RGB")
    t = train_transform(32, "deit")
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(t(image))
    assert outs[0].shape == (3, 32, 32) and outs[0].dtype == torch.float32
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    with pytest.raises(ValueError, match="augment='x' is not allowed"):
        train_transform(32, "x")


def test_mixup_cutmix_give_soft_targets_that_the_loss_handles():
    n_cls = 5
    images = torch.rand(8, 3, 16, 16)
    labels = torch.arange(8) % n_cls
    mixer = batch_mixer(n_cls)
    x, y = mix_batch(mixer, images, labels, seed=3, step=7)
    x2, y2 = mix_batch(mixer, images, labels, seed=3, step=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # a pure function of (seed, step)
    assert x.shape == images.shape and y.shape == (8, n_cls) and y.is_floating_point()
    assert torch.allclose(y.sum(1), torch.ones(8))
    soft = [mix_batch(mixer, images, labels, seed=3, step=s)[1] for s in range(6)]
    assert any(((t > 0) & (t < 1)).any() for t in soft)  # mixed, not one-hot
    # Mixup alone: the image and the targets are the same convex mix of the batch and the batch rolled by one
    mx, my = mix_batch(batch_mixer(n_cls, cutmix_alpha=0.0), images, labels, seed=0, step=0)
    onehot = F.one_hot(labels, n_cls).float()
    lam = float(my[0, labels[0]])  # labels[0] = 0 and the rolled-in labels[-1] = 2 differ
    assert 0 < lam < 1
    assert torch.allclose(mx[0], lam * images[0] + (1 - lam) * images[-1], atol=1e-6)
    assert torch.allclose(my, lam * onehot + (1 - lam) * onehot.roll(1, 0), atol=1e-6)
    assert batch_mixer(n_cls, mixup_alpha=0.0, cutmix_alpha=0.0) is None


def test_the_task_loss_takes_soft_targets_with_label_smoothing(tmp_path, one_thread):
    data = write_fake_imagenet(tmp_path / "im", num_classes=4, train_per_class=6, val_per_class=2, size=40)
    config = resolve_config("adamw", {"task": "imagenet_vit_s", "size": "smoke", "data_dir": str(data)})
    inst = get_task("imagenet_vit_s").build(config, torch.device("cpu"))
    x, y = inst.train_batch(0)
    assert x.shape == (8, 3, 32, 32) and y.shape == (8, 4) and torch.allclose(y.sum(1), torch.ones(8))
    x_again, y_again = inst.train_batch(0)
    assert torch.equal(x, x_again) and torch.equal(y, y_again)  # resumable: a pure function of (seed, step)
    logits = torch.randn(8, 4)
    eps = 0.1
    smoothed = y * (1 - eps) + eps / 4
    expected = -(smoothed * logits.log_softmax(-1)).sum(1).mean()
    assert float(inst.criterion(logits, y)) == pytest.approx(float(expected), rel=1e-5)
    assert 0.0 <= accuracy(logits, y) <= 1.0 and accuracy(logits, y) == accuracy(logits, y.argmax(1))
    # a few real training steps of the smoke ViT with the DeiT pipeline and AdamW-IRE on top
    reports = list(Run("adamw_ire", {"task": "imagenet_vit_s", "size": "smoke", "data_dir": str(data)}).reports())
    assert reports[-1]["step"] == 3 and reports[-1]["diverged"] == 0.0
    assert 0.0 <= reports[-1]["train/accuracy"] <= 1.0 and 0.0 <= reports[-1]["val/accuracy"] <= 1.0


def test_stochastic_depth_only_in_training():
    torch.manual_seed(0)
    model = ViT(image_size=16, patch_size=4, num_classes=3, dim=16, depth=3, heads=2, drop_path_rate=0.5)
    assert [b.drop_path for b in model.blocks] == pytest.approx([0.0, 0.25, 0.5])
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, model(x))
    plain = ViT(image_size=16, patch_size=4, num_classes=3, dim=16, depth=3, heads=2)
    plain.train()
    assert torch.equal(plain(x), plain(x))  # rate 0: no randomness at all
