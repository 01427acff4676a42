"""Data sets that ship with packages (no downloads): Fashion-MNIST from Debian's
``dataset-fashion-mnist`` package, natural images from scikit-image / scikit-learn."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "fashion_mnist_dir",
    "load_fashion_mnist",
    "load_dataset",
    "resolve_dataset",
]

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetNotFoundError(FileNotFoundError):
    """The data set's files are not on this machine; the message says how to install them."""


def fashion_mnist_dir() -> Path:
    """Folder holding the Fashion-MNIST ``*.gz`` files (``CIRCUITS_FASHION_MNIST`` overrides)."""
    candidates = [os.environ["CIRCUITS_FASHION_MNIST"]] if os.environ.get("CIRCUITS_FASHION_MNIST") else []
    candidates += list(FASHION_MNIST_DIRS)
    for c in candidates:
        p = Path(c)
        if all((p / f).is_file() for pair in _FILES.values() for f in pair):
            return p
    raise DatasetNotFoundError(
        "Fashion-MNIST not found in " + ", ".join(candidates)
        + ". Install it with `apt-get install dataset-fashion-mnist` (Debian) or point "
        "CIRCUITS_FASHION_MNIST at a folder with the four idx .gz files."
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images [N, 1, 28, 28] float32 in [0, 1], labels [N] int64)`` for ``"train"`` or ``"test"``."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = fashion_mnist_dir()
    images = _read_idx(root / _FILES[split][0]).astype(np.float32) / 255.0
    labels = _read_idx(root / _FILES[split][1]).astype(np.int64)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)


#: Named data sets for dataset examples (named, so that a plan or a Ray worker can load them).
DATASETS = ("fashion-mnist-test", "fashion-mnist-train")
DATASET_TITLES = {"fashion-mnist-test": "Fashion-MNIST test", "fashion-mnist-train": "Fashion-MNIST train"}


def resolve_dataset(input_shape: tuple[int, ...], dataset: "str | bool | None") -> "str | None":
    """The named data set to take dataset examples from, or ``None`` for none.

    ``"auto"``/``True``: Fashion-MNIST test for models with ``1×28×28`` inputs when it is
    installed, else none; ``None``/``False``: none; a name from :data:`DATASETS`: that one.
    """
    if dataset is None or dataset is False:
        return None
    if dataset is True or dataset == "auto":
        if tuple(input_shape) != (1, 28, 28):
            return None
        try:
            fashion_mnist_dir()
        except DatasetNotFoundError:
            return None
        return "fashion-mnist-test"
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be 'auto', None or one of {', '.join(DATASETS)}; got {dataset!r}")
    return str(dataset)


def load_dataset(name: str, size: int) -> torch.Tensor:
    """Images ``[size, C, H, W]`` in ``[0, 1]`` of a named data set (:data:`DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    images, _ = load_fashion_mnist(name.rsplit("-", 1)[-1])
    return images[:size]
