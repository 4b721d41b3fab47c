"""CIFAR-10 / CIFAR-100 from torchvision's on-disk format, with on-device augmentation.

Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009. The
files are the original "python version" batches that
``torchvision.datasets.CIFAR10/CIFAR100`` download into a data dir:
``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``cifar-100-python/{train, test, meta}``; each holds a pickled dict with
``data`` (N x 3072 uint8, channel planes R, G, B of 32x32) and ``labels``
(CIFAR-10) or ``fine_labels`` (CIFAR-100).

Data dir: the ``data_dir`` argument, else ``$REGTUNE_DATA_DIR``, else
``~/.cache/regtune/data``. Trials never download: ``prepare_cifar`` (CLI
``python -m studies prepare cifar10|cifar100``) fetches the archive once with
torchvision's own downloader and md5 checks (from ``--mirror URL`` or a local
``--archive`` where there is no network), extracts it in a temporary directory
and renames the folder into place under a lock (``regtune.data.store``), then
writes ``regtune_manifest.json`` (file sizes, image counts) into the folder. The
study driver checks that manifest before Ray starts (``problem``). Without the
files a trial's error names the directory, the files and the prepare command.

Where we knowingly differ from torchvision: we read the pickles ourselves
instead of through ``torchvision.datasets.CIFAR10`` because its constructor
md5-checks every file, which rejects the small files ``write_fake_cifar``
generates for smoke studies and tests. The format read is the same.

Protocol of the implicit-regularization paper (Novack et al.,
arXiv:2211.15853): the first 40000 training images train, the last 10000 are
the validation set, the official test set is "test". Augmentation: random crop
32 with padding 4 (zero padding, or reflect for the CPR task) + horizontal
flip, then per-channel normalization; done on the device, from a generator
seeded by (seed, step), so a training batch is a pure function of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from regtune.data import DataMissing
from regtune.space import ConfigError

PAD = 4
MANIFEST = "regtune_manifest.json"
CROP = 32


@dataclass(frozen=True)
class CifarSpec:
    kind: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


SPECS = {
    "cifar10": CifarSpec(
        "cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
        "batches.meta", "labels", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": CifarSpec(
        "cifar100", "cifar-100-python", ("train",), ("test",),
        "meta", "fine_labels", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class CifarFilesMissing(DataMissing):
    """The data dir lacks the CIFAR files (trials never download them)."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir``, else ``$REGTUNE_DATA_DIR``, else ``~/.cache/regtune/data``."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("REGTUNE_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "regtune" / "data"


def _spec(kind: str) -> CifarSpec:
    if kind not in SPECS:
        raise ValueError(f"unknown CIFAR kind {kind!r}: expected one of {', '.join(SPECS)}")
    return SPECS[kind]


def missing_files(root: Path, kind: str) -> list[Path]:
    spec = _spec(kind)
    return [root / spec.folder / f for f in spec.train_files + spec.test_files if not (root / spec.folder / f).is_file()]


def prepare_command(kind: str, root: Path) -> str:
    return f"python -m studies prepare {kind} --data-dir {root}"


def ensure_cifar(kind: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Return the data dir holding ``kind``'s files, or raise ``CifarFilesMissing`` naming the prepare command."""
    root = resolve_data_dir(data_dir)
    spec = _spec(kind)
    if not missing_files(root, kind):
        return root
    expected = ", ".join(spec.train_files + spec.test_files)
    raise CifarFilesMissing(
        f"{kind} not found in data dir {str(root)!r}: expected {spec.folder}/{{{expected}}}"
        f" (missing: {', '.join(p.name for p in missing_files(root, kind))}); trials never download: prepare it"
        f" with: {prepare_command(kind, root)} (or set data_dir / $REGTUNE_DATA_DIR to where it is)"
    )


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry = {(k.decode() if isinstance(k, bytes) else k): v for k, v in entry.items()}
    data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


_CACHE: dict[tuple[str, str], dict[str, torch.Tensor]] = {}


def load_cifar(kind: str, data_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """All images as uint8 (N, 3, 32, 32) tensors and int64 labels: keys train_x, train_y, test_x, test_y.

    Read once per process and data dir (cached).
    """
    root = ensure_cifar(kind, data_dir)
    key = (str(root.resolve()), kind)
    if key not in _CACHE:
        spec = _spec(kind)
        out = {}
        for split, files in (("train", spec.train_files), ("test", spec.test_files)):
            parts = [_read_batch(root / spec.folder / f, spec.label_key) for f in files]
            out[f"{split}_x"] = torch.from_numpy(np.concatenate([p[0] for p in parts]))
            out[f"{split}_y"] = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        if len(_CACHE) >= 2:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = out
    return _CACHE[key]


def write_fake_cifar(root: str | os.PathLike, kind: str, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write a small ``kind`` dataset in torchvision's on-disk format under ``root``; return ``root``.

    Images are a per-class smooth pattern plus noise, so a small model can
    learn them; labels cycle through all classes. For smoke studies and tests.
    """
    spec = _spec(kind)
    rng = np.random.RandomState(seed)
    folder = Path(root) / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    coarse = rng.randint(0, 8, size=(spec.num_classes, 3, 4, 4)).astype(np.float32)
    templates = coarse.repeat(8, axis=2).repeat(8, axis=3) * 32.0  # (C, 3, 32, 32) in [0, 224]

    def make(n: int) -> tuple[np.ndarray, list[int]]:
        labels = rng.permutation(np.arange(n) % spec.num_classes)
        noise = rng.randint(0, 32, size=(n, 3, 32, 32))
        images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
        return images.reshape(n, 3072), [int(v) for v in labels]

    def dump(name: str, data: np.ndarray, labels: list[int]) -> None:
        entry = {"batch_label": name, "data": data, spec.label_key: labels,
                 "filenames": [f"fake_{i}.png" for i in range(len(labels))]}
        if kind == "cifar100":
            entry["coarse_labels"] = [v % 20 for v in labels]
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    data, labels = make(n_train)
    chunks = np.array_split(np.arange(n_train), len(spec.train_files))
    for name, idx in zip(spec.train_files, chunks):
        dump(name, data[idx], [labels[i] for i in idx])
    data, labels = make(n_test)
    dump(spec.test_files[0], data, labels)
    names = [f"class_{i}" for i in range(spec.num_classes)]
    meta = {"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072} if kind == "cifar10" else {
        "fine_label_names": names, "coarse_label_names": [f"super_{i}" for i in range(20)]}
    with open(folder / spec.meta_file, "wb") as f:
        pickle.dump(meta, f, protocol=2)
    write_manifest(folder, kind, {"train": n_train, "test": n_test}, source="synthetic (write_fake_cifar)")
    from regtune.data.provenance import mark_generated

    mark_generated(folder, by="regtune.data.cifar.write_fake_cifar",
                   what=f"{n_train} train / {n_test} test images of class patterns plus noise (seed {seed})",
                   train_count=n_train)
    return Path(root)


# --------------------------------------------------------------------------
# preparing (once, before any trial): torchvision's download, a manifest, the driver's check
def write_manifest(folder: Path, kind: str, images: dict[str, int], source: str) -> None:
    """``regtune_manifest.json`` in ``folder``: the size of every file and the images of each split."""
    from regtune.data.store import write_text_atomic

    spec = _spec(kind)
    files = {f: (folder / f).stat().st_size for f in spec.train_files + spec.test_files + (spec.meta_file,)}
    write_text_atomic(folder / MANIFEST, json.dumps(
        {"format_version": 1, "dataset": kind, "files": files, "images": images, "source": source}, indent=2) + "\n")


def problem(kind: str, data_dir: str | os.PathLike | None = None, *, train: int = 1, test: int = 1) -> str | None:
    """What is wrong with ``kind`` in the data dir for a task reading ``train`` / ``test`` images, or None.

    Cheap (no file is read but the manifest): the files exist with the sizes the manifest records, and
    the manifest counts enough images."""
    root = resolve_data_dir(data_dir)
    folder = root / _spec(kind).folder
    missing = missing_files(root, kind)
    if missing:
        return f"missing {folder}/{{{', '.join(p.name for p in missing)}}}"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"{folder} holds files but no {MANIFEST} (not made or checked by studies prepare)"
    for name, size in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{path} is incomplete ({path.stat().st_size if path.is_file() else 0} of {size} bytes)"
    have = manifest.get("images", {})
    for split, need in (("train", train), ("test", test)):
        if int(have.get(split, 0)) < need:
            return f"{folder} has {int(have.get(split, 0))} {split} images, the task reads {need}"
    return None


def _torchvision_class(kind: str, mirror: str | None):
    from torchvision import datasets

    cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
    if mirror:  # same archive and checksums, another server (a local mirror, a cluster's file server)
        cls = type(f"{cls.__name__}Mirror", (cls,), {"url": f"{mirror.rstrip('/')}/{cls.filename}"})
    return cls


def prepare_cifar(kind: str, data_dir: str | os.PathLike | None = None, *, mirror: str | None = None,
                  archive: str | os.PathLike | None = None, log=print) -> Path:
    """Put ``kind`` into the data dir once: torchvision's downloader (``mirror``: a base URL holding the same
    archive) or a local copy of the archive (``archive``), its md5 checks, then an atomic rename, all under
    the data set's lock. Files already there without a manifest are md5-checked and kept. Returns the folder."""
    from regtune.data import store

    spec = _spec(kind)
    root = resolve_data_dir(data_dir)
    final = root / spec.folder
    with store.exclusive(final, log):
        if problem(kind, root) is None:
            log(f"{kind} is already prepared in {final}")
            return final
        cls = _torchvision_class(kind, mirror)
        if not missing_files(root, kind) and _md5_ok(cls, root):
            write_manifest(final, kind, _count(cls, root), source="existing files (md5 checked)")
            log(f"{kind}: the files in {final} pass torchvision's md5 checks; indexed them")
            return final
        with store.staging(final) as tmp:
            if archive:
                shutil.copyfile(archive, tmp / cls.filename)  # torchvision md5-checks it and skips the download
                source = f"archive {Path(archive).resolve()}"
            else:
                source = cls.url
                log(f"downloading {kind} from {cls.url}")
            try:
                cls(str(tmp), train=True, download=True)  # download, md5 of the archive, extract, md5 of each file
            except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad checksum a RuntimeError
                raise DataMissing(f"could not prepare {kind} from {source}: {e}; give --mirror URL (a server "
                                  f"holding {cls.filename}) or --archive PATH") from None
            write_manifest(tmp / spec.folder, kind, _count(cls, tmp), source=source)
            store.publish(tmp / spec.folder, final)
    log(f"prepared {kind} in {final}")
    return final


def _md5_ok(cls, root: Path) -> bool:
    """torchvision's own checksums of every data file (what its constructor checks)."""
    from torchvision.datasets.utils import check_integrity

    return all(check_integrity(os.path.join(root, cls.base_folder, f), md5) for f, md5 in cls.train_list + cls.test_list)


def _count(cls, root: Path) -> dict[str, int]:
    return {"train": len(cls(str(root), train=True).data), "test": len(cls(str(root), train=False).data)}


# --------------------------------------------------------------------------
# seeding, batches and augmentation
def mix_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and platforms)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def augment(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Random-crop (pad 4) + horizontal flip of uint8 (B, 3, 32, 32) images, as float pixel values.

    ``offsets`` (B, 2) are the crop's (row, col) corner in the padded image
    (0..8); ``flips`` (B,) bool. Zero padding pads black pixels (torchvision's
    ``RandomCrop(32, padding=4)``); ``reflect`` mirrors the border.
    """
    if padding_mode not in ("zeros", "reflect"):
        raise ValueError(f"padding_mode={padding_mode!r} is not allowed: expected 'zeros' or 'reflect'")
    x = images.float()
    mode = "constant" if padding_mode == "zeros" else "reflect"
    xp = F.pad(x, (PAD, PAD, PAD, PAD), mode=mode)
    b = x.shape[0]
    ar = torch.arange(CROP, device=x.device)
    rows = offsets[:, 0:1].to(x.device) + ar  # (B, 32)
    col_ar = torch.where(flips.to(x.device)[:, None], CROP - 1 - ar, ar)
    cols = offsets[:, 1:2].to(x.device) + col_ar
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class CifarData:
    """Device-resident CIFAR splits with the paper's protocol.

    ``train``: the first ``n_train`` training images; ``val``: the last
    ``n_val``; ``test``: the official test set (its first ``n_test`` when given).
    ``full_train``: ``train`` is the whole training set (``val`` then lies inside it).
    """

    def __init__(self, kind: str, *, data_dir: str | None, n_train: int, n_val: int,
                 n_test: int | None, device: torch.device, seed: int, augment: bool = True,
                 padding_mode: str = "zeros", full_train: bool = False):
        spec = _spec(kind)
        raw = load_cifar(kind, data_dir)
        total = raw["train_x"].shape[0]
        if full_train:  # every training image trains (the papers' protocol); val = the last n_val of them
            n_train, n_val = total, min(n_val, total)
        elif n_train + n_val > total:
            raise ConfigError(
                f"n_train={n_train} + n_val={n_val} is not allowed: the {kind} training set at"
                f" {str(resolve_data_dir(data_dir))!r} has only {total} images")
        self.spec, self.device, self.seed = spec, device, seed
        self.augment, self.padding_mode = augment, padding_mode
        self.train_x, self.train_y = raw["train_x"][:n_train].to(device), raw["train_y"][:n_train].to(device)
        self.val_x, self.val_y = raw["train_x"][total - n_val:].to(device), raw["train_y"][total - n_val:].to(device)
        nt = raw["test_x"].shape[0] if n_test is None else min(n_test, raw["test_x"].shape[0])
        self.test_x, self.test_y = raw["test_x"][:nt].to(device), raw["test_y"][:nt].to(device)
        self.mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1) * 255.0
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() - self.mean) / self.std

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(mix_seed("cifar-order", self.seed, epoch))
            self._perms[epoch] = torch.randperm(self.train_x.shape[0], generator=g).to(self.device)
        return self._perms[epoch]

    def train_indices(self, step: int, batch_size: int) -> torch.Tensor:
        """Indices of step ``step``: the step-th ``batch_size`` chunk of a stream of per-epoch permutations."""
        n = self.train_x.shape[0]
        pos = torch.arange(step * batch_size, (step + 1) * batch_size)
        epochs, within = pos // n, pos % n
        out = torch.empty(batch_size, dtype=torch.long, device=self.device)
        for e in epochs.unique().tolist():
            mask = epochs == e
            out[mask.to(self.device)] = self._perm(e)[within[mask].to(self.device)]
        return out

    def train_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.train_indices(step, batch_size)
        images = self.train_x[idx]
        if self.augment:
            g = torch.Generator().manual_seed(mix_seed("cifar-augment", self.seed, step))
            offsets = torch.randint(0, 2 * PAD + 1, (batch_size, 2), generator=g)
            flips = torch.rand(batch_size, generator=g) < 0.5
            pixels = augment(images, offsets, flips, self.padding_mode)
        else:
            pixels = images.float()
        return self.normalize(pixels), self.train_y[idx]

    def eval_batches(self, split: str, batch_size: int):
        x, y = {"val": (self.val_x, self.val_y), "test": (self.test_x, self.test_y)}[split]
        for i in range(0, x.shape[0], batch_size):
            yield self.normalize(x[i:i + batch_size]), y[i:i + batch_size]
