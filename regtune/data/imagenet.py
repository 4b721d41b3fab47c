"""ImageNet (or any image-classification folder) in torchvision's ImageFolder layout.

Russakovsky et al., "ImageNet Large Scale Visual Recognition Challenge", IJCV
2015. Layout: ``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>``
(JPEG, PNG ... anything ``torchvision.datasets.folder`` reads), as produced by
the usual ImageNet preparation scripts. ``root``: the ``data_dir`` argument,
else ``$REGTUNE_DATA_DIR/imagenet``, else ``~/.cache/regtune/data/imagenet``.
Nothing is downloaded; a missing folder is an error that names it.

``prepare_imagenet`` (CLI ``python -m studies prepare imagenet --source DIR``)
checks an ImageFolder the user provides (train/ and val/ with the same class
folders, image files counted per class) and writes ``regtune_index.json`` into
the root the tasks read: in place when the source is that root, else into a new
root whose ``train`` / ``val`` are links to the source's (the source is never
written). The study driver checks the index before Ray starts (``problem``).

Training batches are a pure function of ``(seed, step)``: the step-th chunk of
a stream of per-epoch permutations, each image augmented under a torch seed
derived from ``(seed, step, position)``: ``basic`` = random-resized crop +
horizontal flip (torchvision's standard ImageNet recipe); ``deit`` = the DeiT
recipe's per-image part (bicubic crop + flip, RandAugment, random erasing;
torchvision transforms v2). ``batch_mixer`` / ``mix_batch``: DeiT's
Mixup / CutMix of a whole batch (soft targets), seeded by ``(seed, step)``. Loading runs in DataLoader worker
processes; a resumed run restarts the stream at its step.

``write_fake_imagenet`` writes a tiny folder in the same layout (smooth
per-class colour patterns + noise; PNG and JPEG files) for smoke studies and tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from regtune.data import DataMissing
from regtune.data.cifar import mix_seed, resolve_data_dir

INDEX = "regtune_index.json"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class ImageFolderMissing(DataMissing):
    """The ImageNet folder (or its train / val split) is not there."""


def resolve_imagenet_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` itself, else ``<regtune data dir>/imagenet``."""
    return Path(data_dir).expanduser() if data_dir else resolve_data_dir(None) / "imagenet"


def check_image_folder(root: Path) -> None:
    missing = [str(root / s) for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise ImageFolderMissing(
            f"ImageNet not found in data dir {str(root)!r}: missing {', '.join(missing)}. Expected torchvision"
            " ImageFolder layout <data_dir>/{train,val}/<class>/<image>; prepare it with: "
            f"{prepare_command(root)} (or set data_dir / $REGTUNE_DATA_DIR, which then holds an 'imagenet' folder)")


def prepare_command(root: Path, default: bool = False) -> str:
    """The command that indexes (or links and indexes) an ImageFolder at ``root``."""
    where = "" if default else f" --out-dir {root}"
    if (root / "train").is_dir() and (root / "val").is_dir():
        return f"python -m studies prepare imagenet{where} --source {root}"
    return f"python -m studies prepare imagenet{where} --source DIR (your ImageFolder with train/ and val/)"


# --------------------------------------------------------------------------
# the index: checked once by `studies prepare`, cheaply by the driver before Ray starts
def _is_image(name: str) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return name.lower().endswith(IMG_EXTENSIONS)


def scan_image_folder(source: Path) -> dict:
    """Classes and image counts of an ImageFolder's train/ and val/ (``ImageFolderMissing`` if it is not one)."""
    check_image_folder(source)
    counts: dict[str, dict[str, int]] = {}
    for split in ("train", "val"):
        per_class = {}
        for entry in sorted(os.scandir(source / split), key=lambda e: e.name):
            if entry.is_dir():
                per_class[entry.name] = sum(1 for _, _, files in os.walk(entry.path, followlinks=True)
                                            for f in files if _is_image(f))
        counts[split] = per_class
    train, val = counts["train"], counts["val"]
    if not train or set(train) != set(val):
        extra = sorted(set(train) ^ set(val))[:5]
        raise ImageFolderMissing(f"{source}: train/ and val/ must hold the same class folders (differ in: "
                                 f"{', '.join(extra) or 'no classes at all'})")
    empty = [f"{s}/{c}" for s in counts for c, n in counts[s].items() if n == 0]
    if empty:
        raise ImageFolderMissing(f"{source}: class folders without images: {', '.join(empty[:5])}")
    return {"format_version": 1, "classes": sorted(train), "images": {s: sum(counts[s].values()) for s in counts},
            "per_class": counts}


def problem(data_dir: str | os.PathLike | None = None, *, train: int = 1, val: int = 1) -> str | None:
    """What is wrong with the ImageFolder the tasks read (``data_dir`` or the default), or None: its index
    exists, every indexed class folder is there, and it counts enough images. Stats only, no listing."""
    root = resolve_imagenet_dir(data_dir)
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        return f"missing {', '.join(str(root / s) for s in missing)}"
    try:
        index = json.loads((root / INDEX).read_text())
    except (OSError, ValueError):
        return f"{root} has train/ and val/ but no {INDEX} (not checked by studies prepare)"
    gone = [f"{s}/{c}" for s in ("train", "val") for c in index.get("classes", []) if not (root / s / c).is_dir()]
    if gone:
        return f"{root}: {len(gone)} indexed class folders are gone (e.g. {gone[0]})"
    for split, need in (("train", train), ("val", val)):
        have = int(index.get("images", {}).get(split, 0))
        if have < need:
            return f"{root} has {have} {split} images, the task reads {need}"
    return None


def prepare_imagenet(source: str | os.PathLike | None = None, *, data_dir: str | os.PathLike | None = None,
                     out_dir: str | os.PathLike | None = None, log=print) -> Path:
    """Check and index the ImageFolder ``source`` for the tasks, which read ``out_dir`` (default
    ``<data dir>/imagenet``). ``source`` None or equal to it: index in place. Else a new root with links
    ``train`` / ``val`` to the source is built beside it and renamed into place, under a lock."""
    from regtune.data import store

    out = Path(out_dir).expanduser() if out_dir else resolve_data_dir(data_dir) / "imagenet"
    src = Path(source).expanduser().resolve() if source else out.resolve()
    with store.exclusive(out, log):
        index = scan_image_folder(src)
        index["source"] = str(src)
        text = json.dumps(index, indent=1) + "\n"
        if src == out.resolve():
            store.write_text_atomic(out / INDEX, text)
        else:
            if (out / "train").is_dir() and not (out / "train").is_symlink():
                raise ImageFolderMissing(f"{out} already holds an ImageFolder: index it with --source {out}, "
                                         "or give another --out-dir")
            with store.staging(out) as tmp:
                for split in ("train", "val"):
                    os.symlink(src / split, tmp / split)
                (tmp / INDEX).write_text(text, encoding="utf-8")
                store.publish(tmp, out)
    log(f"indexed ImageFolder {src} for the tasks in {out}: {len(index['classes'])} classes, "
        f"{index['images']['train']:,} train / {index['images']['val']:,} val images")
    return out


AUGMENTS = ("basic", "deit")


def train_transform(image_size: int, augment: str = "basic", *, randaugment_ops: int = 2,
                    randaugment_magnitude: int = 27, random_erasing: float = 0.25):
    """``basic``: random-resized crop + flip (torchvision's ImageNet recipe). ``deit``: the DeiT recipe's
    per-image part (Touvron et al., arXiv:2012.12877): bicubic random-resized crop + flip, RandAugment
    (``randaugment_ops`` ops at ``randaugment_magnitude`` of torchvision's 0..30 bins: DeiT's timm
    ``rand-m9`` is 9 on timm's 0..10 scale, i.e. 27 here), normalization, random erasing (per-pixel noise)."""
    from torchvision import transforms as T
    if augment == "basic":
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(MEAN, STD)])
    if augment != "deit":
        raise ValueError(f"augment={augment!r} is not allowed: expected one of {', '.join(AUGMENTS)}")
    from torchvision.transforms import v2
    ops = [v2.RandomResizedCrop(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
           v2.RandomHorizontalFlip()]
    if randaugment_ops > 0:
        ops.append(v2.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude,
                                  interpolation=v2.InterpolationMode.BICUBIC))
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if random_erasing > 0:
        ops.append(v2.RandomErasing(p=random_erasing, value="random"))
    return v2.Compose(ops)


def batch_mixer(num_classes: int, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5):
    """DeiT's batch mixing with torchvision's transforms v2: CutMix with probability ``switch_prob``, else Mixup,
    on every batch; targets become class probabilities. None when both alphas are 0."""
    from torchvision.transforms import v2
    mixers = []
    if cutmix_alpha > 0:
        mixers.append((v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes), switch_prob))
    if mixup_alpha > 0:
        mixers.append((v2.MixUp(alpha=mixup_alpha, num_classes=num_classes), 1.0 - switch_prob))
    if not mixers:
        return None
    if len(mixers) == 1:
        return mixers[0][0]
    return v2.RandomChoice([m for m, _ in mixers], p=[p for _, p in mixers])


def mix_batch(mixer, images: torch.Tensor, labels: torch.Tensor, seed: int, step: int):
    """``mixer`` applied under a CPU seed derived from ``(seed, step)`` (its draws are on the CPU), so the mixed
    batch of a step is a pure function of them wherever the tensors live."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed("imagenet-mix", seed, step))
        return mixer(images, labels)


def eval_transform(image_size: int):
    from torchvision import transforms as T
    resize = round(image_size * 256 / 224)  # the standard 256 -> 224 centre crop, scaled
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(MEAN, STD)])


class SeededImages(Dataset):
    """Items are ``(index, seed)`` keys: image ``index`` transformed under torch seed ``seed``."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        from torchvision.datasets.folder import default_loader
        index, seed = key
        path, label = self.samples[index]
        image = default_loader(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label


class StepBatches:
    """Batch sampler: the keys of steps ``start, start + 1, ...`` (endless)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(mix_seed("imagenet-order", self.seed, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def keys(self, step: int) -> list[tuple[int, int]]:
        out = []
        for j, pos in enumerate(range(step * self.batch_size, (step + 1) * self.batch_size)):
            epoch, within = divmod(pos, self.n)
            out.append((int(self._perm(epoch)[within]), mix_seed("imagenet-augment", self.seed, step, j)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while True:
            yield self.keys(step)
            step += 1


class ImageFolderData:
    """Train / val splits of an ImageFolder directory with deterministic, resumable batches."""

    def __init__(self, data_dir: str | None, *, image_size: int, batch_size: int, eval_batch_size: int,
                 seed: int, num_workers: int, train_limit: int | None = None, val_limit: int | None = None,
                 augment: str = "basic", randaugment_ops: int = 2, randaugment_magnitude: int = 27,
                 random_erasing: float = 0.25):
        from torchvision.datasets import ImageFolder
        self.root = resolve_imagenet_dir(data_dir)
        check_image_folder(self.root)
        train = ImageFolder(str(self.root / "train"))
        val = ImageFolder(str(self.root / "val"))
        if train.classes != val.classes:
            raise ValueError(f"{self.root}: train and val have different class folders")
        self.classes = train.classes
        self.train_samples = _subset(train.samples, train_limit)
        self.val_samples = _subset(val.samples, val_limit)
        self.image_size, self.batch_size, self.eval_batch_size = image_size, batch_size, eval_batch_size
        self.seed, self.num_workers = seed, num_workers
        self._train = SeededImages(self.train_samples, train_transform(
            image_size, augment, randaugment_ops=randaugment_ops, randaugment_magnitude=randaugment_magnitude,
            random_erasing=random_erasing))
        self._iter: Iterator | None = None
        self._next_step = -1

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _loader(self, dataset: Dataset, batch_sampler) -> DataLoader:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=False)

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None or step != self._next_step:
            self._iter = None  # lets the old workers shut down
            sampler = StepBatches(len(self.train_samples), self.batch_size, self.seed, step)
            self._iter = iter(self._loader(self._train, sampler))
        images, labels = next(self._iter)
        self._next_step = step + 1
        return images, labels

    def eval_batches(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if split != "val":
            raise ValueError(f"ImageNet tasks have split 'val', not {split!r}")
        n = len(self.val_samples)
        keys = [(i, 0) for i in range(n)]
        batches = [keys[i:i + self.eval_batch_size] for i in range(0, n, self.eval_batch_size)]
        yield from self._loader(SeededImages(self.val_samples, eval_transform(self.image_size)), batches)


def _subset(samples: list[tuple[str, int]], limit: int | None) -> list[tuple[str, int]]:
    """All samples, or ``limit`` of them evenly spaced (ImageFolder lists them class by class)."""
    if limit is None or limit >= len(samples):
        return list(samples)
    idx = np.linspace(0, len(samples) - 1, limit).round().astype(int)
    return [samples[i] for i in idx]


def write_fake_imagenet(root: str | os.PathLike, *, num_classes: int = 4, train_per_class: int = 6,
                        val_per_class: int = 2, size: int = 40, seed: int = 0) -> Path:
    """Write a tiny ImageFolder dataset (``train/`` and ``val/``) under ``root``; return ``root``.

    Each class is a smooth colour pattern plus noise; images alternate
    between PNG and JPEG so both decoders are exercised.
    """
    from PIL import Image
    rng = np.random.RandomState(seed)
    root = Path(root)
    templates = rng.randint(0, 6, size=(num_classes, 4, 4, 3)).astype(np.float32) * 40.0
    scale = -(-size // 4)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            base = templates[c].repeat(scale, axis=0).repeat(scale, axis=1)[:size, :size]
            for i in range(per_class):
                pixels = np.clip(base + rng.randint(0, 40, size=base.shape), 0, 255).astype(np.uint8)
                ext = "png" if i % 2 == 0 else "JPEG"
                Image.fromarray(pixels).save(folder / f"{split}_{c}_{i}.{ext}")
    from regtune.data.provenance import mark_generated

    mark_generated(root, by="regtune.data.imagenet.write_fake_imagenet",
                   what=f"{num_classes} classes x {train_per_class} train / {val_per_class} val images of {size} px")
    return root
