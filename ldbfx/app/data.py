"""Datasets for the trainer: one embedded real dataset, and the usual ones from local files.

``digits`` is the UCI handwritten-digits set (1,797 8x8 grey images, 10 classes) that
scikit-learn ships *inside its wheel*: it needs no download, so ``ldbfx demo`` runs anywhere.
The others read local files only and never download (a download that hangs on a machine without
network is worse than a clear error).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..errors import LdbfxError

__all__ = ["DataError", "Splits", "load"]

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")


class DataError(LdbfxError):
    """A dataset is missing or unknown; the message says where to put the files."""


@dataclass
class Splits:
    train: Dataset
    test: Dataset
    num_classes: int
    image_size: int
    random_augmentation: bool  # True when the training transform is random


def _digits(image_size: int, seed: int) -> Splits:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = ((images - images.mean()) / images.std()).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = len(labels) // 5
    test, train = order[:n_test], order[n_test:]
    return Splits(TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test]),
                  10, image_size, False)


def _torchvision(name: str, data_dir: str | None, image_size: int) -> Splits:
    import torchvision
    from torchvision import transforms as T

    if data_dir is None:
        raise DataError(f"--data {name} reads local files: pass --data-dir PATH")
    normalize = T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    train_tf = T.Compose([T.RandomResizedCrop(image_size, scale=(0.6, 1.0)), T.RandomHorizontalFlip(),
                          T.ToTensor(), normalize])
    test_tf = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(), normalize])
    if name == "imagefolder":
        train_dir, test_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
        if not (os.path.isdir(train_dir) and os.path.isdir(test_dir)):
            raise DataError(
                f"--data imagefolder expects {train_dir}/<class>/*.jpg and {test_dir}/<class>/*.jpg"
            )
        train = torchvision.datasets.ImageFolder(train_dir, train_tf)
        return Splits(train, torchvision.datasets.ImageFolder(test_dir, test_tf), len(train.classes),
                      image_size, True)
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    if not os.path.isdir(os.path.join(data_dir, folder)):
        raise DataError(
            f"{name} not found: expected the extracted python version at "
            f"{os.path.join(data_dir, folder)} (from https://www.cs.toronto.edu/~kriz/cifar.html). "
            "ldbfx never downloads data."
        )
    train = cls(data_dir, train=True, transform=train_tf, download=False)
    test = cls(data_dir, train=False, transform=test_tf, download=False)
    return Splits(train, test, 10 if name == "cifar10" else 100, image_size, True)


def load(name: str, data_dir: str | None = None, *, image_size: int = 32, seed: int = 0) -> Splits:
    """Loads a dataset by name: ``digits`` (embedded), ``cifar10``, ``cifar100``, ``imagefolder``.

    Raises:
        DataError: unknown name, or the files are not at ``data_dir`` (the message says where).
    """
    if name == "digits":
        return _digits(image_size, seed)
    if name in DATASETS:
        return _torchvision(name, data_dir, image_size)
    raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


@dataclass
class Text:
    """Bytes of real text as token ids (0-255), split into training and validation files."""

    train: torch.Tensor  # uint8
    validation: torch.Tensor  # uint8
    files: int
    fingerprint: str  # Python version and a hash of the file list: the corpus is pinned by it


def stdlib_text(domain: str = "library", holdout_every: int = 20, max_bytes: int | None = None) -> Text:
    """The Python standard library's own ``.py`` files as bytes: real text every machine has.

    Files are read in sorted order; every ``holdout_every``-th file goes to validation.

    Args:
        domain: ``"library"`` (everything but the ``test`` package) or ``"tests"`` (the ``test``
            package alone: a held-out domain for fine-tuning).
        holdout_every: every n-th file is a validation file.
        max_bytes: stop adding training files past this many bytes (validation keeps its share).

    Raises:
        DataError: ``domain="tests"`` on a Python installed without its ``test`` package.

    Example:
        >>> text = stdlib_text(max_bytes=100_000)
        >>> text.train.dtype, len(text.train) >= 100_000, text.fingerprint.startswith("python")
        (torch.uint8, True, True)
    """
    import hashlib
    import sys
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.relpath(os.path.join(folder, n), root) for n in names if n.endswith(".py")]
    in_tests = [f.startswith("test" + os.sep) for f in sorted(files)]
    files = [f for f, t in zip(sorted(files), in_tests) if t == (domain == "tests")]
    if domain not in ("library", "tests"):
        raise DataError(f"domain must be 'library' or 'tests', got {domain!r}")
    if not files:
        raise DataError(f"no .py files for domain {domain!r} under {root} (a Python without its test package?)")
    parts: dict[bool, list[bytes]] = {True: [], False: []}
    size = 0
    for i, name in enumerate(files):
        held_out = i % holdout_every == holdout_every - 1
        if not held_out and max_bytes is not None and size >= max_bytes:
            continue
        with open(os.path.join(root, name), "rb") as f:
            content = f.read()
        parts[held_out].append(content)
        size += 0 if held_out else len(content)
    digest = hashlib.sha256("\n".join(files).encode()).hexdigest()[:12]
    version = "python{}.{}.{}".format(*sys.version_info[:3])

    def joined(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8)

    return Text(joined(parts[False]), joined(parts[True]), len(files), f"{version}-{domain}-{digest}")
