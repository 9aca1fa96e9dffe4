"""Dataset registry: ``digits`` (bundled), ``synthetic`` (seeded), and ``mnist``,
``fashion-mnist``, ``cifar10`` read from ``--data-dir`` (downloaded only when asked).

Files are read by plain byte parsers (nothing is unpickled): MNIST and Fashion-MNIST from their
IDX files (raw or ``.gz``) under ``DATA_DIR/MNIST/raw`` and ``DATA_DIR/FashionMNIST/raw`` (the
layout torchvision uses), CIFAR-10 from its *binary* distribution under
``DATA_DIR/cifar-10-batches-bin``. Every loader returns the data set's own held-out
test split, identical on every node.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class DatasetBundle:
    """A data set in memory: train and test tensors, input shape and class count."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int


class DatasetUnavailableError(ValueError):
    """The data set's files are not in ``--data-dir`` and no download was asked for."""


DatasetLoader = Callable[[str | None, bool, int], DatasetBundle]
_DATASETS: dict[str, DatasetLoader] = {}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: make ``loader(data_dir, download, seed) -> DatasetBundle`` available
    as ``--dataset name``."""

    def deco(loader: DatasetLoader) -> DatasetLoader:
        _DATASETS[name] = loader
        return loader

    return deco


def available_datasets() -> list[str]:
    """Names of every registered data set."""
    return sorted(_DATASETS)


def load_dataset(name: str, *, data_dir: str | None = None, download: bool = False,
                 seed: int = 0) -> DatasetBundle:
    """Load a registered data set."""
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(available_datasets())}")
    return _DATASETS[name](data_dir, download, seed)


def make_dataset(name: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, num_classes: int) -> DatasetBundle:
    """A ``DatasetBundle`` from numpy arrays (inputs as float32, labels 0..num_classes-1):
    what a registered loader returns (docs/extending.md)."""
    return DatasetBundle(
        name=name,
        train_x=torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32)),
        train_y=torch.from_numpy(np.ascontiguousarray(train_y, dtype=np.int64)),
        test_x=torch.from_numpy(np.ascontiguousarray(test_x, dtype=np.float32)),
        test_y=torch.from_numpy(np.ascontiguousarray(test_y, dtype=np.int64)),
        input_shape=tuple(train_x.shape[1:]),
        num_classes=num_classes,
    )


@register_dataset("digits")
def digits(data_dir: str | None, download: bool, seed: int) -> DatasetBundle:
    """scikit-learn's 1,797 bundled 8x8 digits; a fixed stratified 20% test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    y = data.target.astype(np.int64)
    # The split seed is fixed, not --seed: every node must evaluate on the same test set.
    tx, vx, ty, vy = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    mean, std = float(tx.mean()), float(tx.std())
    return make_dataset("digits", (tx - mean) / std, ty, (vx - mean) / std, vy, 10)


@register_dataset("synthetic")
def synthetic(data_dir: str | None, download: bool, seed: int, *, features: int = 20,
              classes: int = 10, train: int = 4000, test: int = 1000) -> DatasetBundle:
    """Gaussian clusters (one centre per class) in 20 dimensions, generated from ``seed``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(classes, features))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, size=n)
        return centres[y] + rng.normal(size=(n, features)), y

    tx, ty = sample(train)
    vx, vy = sample(test)
    return make_dataset("synthetic", tx, ty, vx, vy, classes)


def _download(name: str, fetch: Callable[[], object]) -> None:
    """Run a torchvision download; a network or checksum failure becomes a
    ``DatasetUnavailableError`` (a ValueError the CLI reports in one line)."""
    try:
        fetch()
    except (OSError, RuntimeError) as exc:
        raise DatasetUnavailableError(f"{name}: download failed ({exc})") from exc


# ---- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------


def _open_maybe_gz(path: Path) -> bytes:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.exists():
            raw = candidate.read_bytes()
            if candidate.suffix != ".gz":
                return raw
            try:
                return gzip.decompress(raw)
            except (OSError, EOFError, zlib.error) as exc:
                raise ValueError(f"{candidate}: corrupt gzip file ({exc})") from None
    raise FileNotFoundError(path)


def read_idx(data: bytes) -> np.ndarray:
    """Parse an IDX file (unsigned bytes only, as MNIST uses); ValueError if corrupt."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError("not an IDX file of unsigned bytes")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError("truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise ValueError(f"IDX body has {body.size} bytes, header says {shape}")
    return body.reshape(shape)


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_dataset(name: str, folder: str, mean: float, std: float, data_dir: str | None,
                 download: bool) -> DatasetBundle:
    if data_dir is None:
        raise DatasetUnavailableError(f"{name} needs --data-dir (add --download to fetch it)")
    raw = Path(data_dir) / folder / "raw"
    missing = [f for f in _IDX_FILES
               if not (raw / f).exists() and not (raw / f"{f}.gz").exists()]
    if missing and download:
        import torchvision

        cls = torchvision.datasets.MNIST if folder == "MNIST" else torchvision.datasets.FashionMNIST
        # torchvision fetches (and md5-checks) all four files into DATA_DIR/<folder>/raw.
        _download(name, lambda: cls(data_dir, train=True, download=True))
        missing = [f for f in _IDX_FILES
                   if not (raw / f).exists() and not (raw / f"{f}.gz").exists()]
    if missing:
        raise DatasetUnavailableError(
            f"{name}: missing {', '.join(missing)} under {raw}; add --download to fetch them")
    tx, ty, vx, vy = (read_idx(_open_maybe_gz(raw / f)) for f in _IDX_FILES)
    if tx.ndim != 3 or vx.ndim != 3 or ty.ndim != 1 or vy.ndim != 1:
        raise ValueError(f"{name}: IDX images must be N x H x W and labels a vector")
    if tx.shape[1:] != vx.shape[1:]:
        raise ValueError(f"{name}: train and test images differ in size")
    if len(tx) != len(ty) or len(vx) != len(vy):
        raise ValueError(f"{name}: image and label counts differ")
    if max(ty.max(initial=0), vy.max(initial=0)) > 9:
        raise ValueError(f"{name}: IDX label out of range 0..9")

    def norm(a: np.ndarray) -> np.ndarray:
        return ((a.astype(np.float32) / 255.0 - mean) / std)[:, None, :, :]

    return make_dataset(name, norm(tx), ty, norm(vx), vy, 10)


@register_dataset("mnist")
def mnist(data_dir: str | None, download: bool, seed: int) -> DatasetBundle:
    """MNIST from ``DATA_DIR/MNIST/raw`` (IDX files, raw or gzipped)."""
    return _idx_dataset("mnist", "MNIST", 0.1307, 0.3081, data_dir, download)


@register_dataset("fashion-mnist")
def fashion_mnist(data_dir: str | None, download: bool, seed: int) -> DatasetBundle:
    """Fashion-MNIST from ``DATA_DIR/FashionMNIST/raw`` (IDX files, raw or gzipped)."""
    return _idx_dataset("fashion-mnist", "FashionMNIST", 0.2860, 0.3530, data_dir, download)


# ---- CIFAR-10 (binary version) ---------------------------------------------------------

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # published on the CIFAR page
_CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST = ("test_batch.bin",)
_CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)[None, :, None, None]
_CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)[None, :, None, None]


def read_cifar_batch(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Records of 1 label byte + 3,072 pixel bytes (3x32x32); ValueError if corrupt."""
    rec = 1 + 3 * 32 * 32
    if len(data) == 0 or len(data) % rec:
        raise ValueError(f"CIFAR-10 batch of {len(data)} bytes is not a whole number of records")
    arr = np.frombuffer(data, dtype=np.uint8).reshape(-1, rec)
    labels = arr[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ValueError("CIFAR-10 label out of range")
    return arr[:, 1:].reshape(-1, 3, 32, 32), labels


@register_dataset("cifar10")
def cifar10(data_dir: str | None, download: bool, seed: int) -> DatasetBundle:
    """CIFAR-10 from ``DATA_DIR/cifar-10-batches-bin`` (the binary distribution)."""
    if data_dir is None:
        raise DatasetUnavailableError("cifar10 needs --data-dir (add --download to fetch it)")
    folder = Path(data_dir) / "cifar-10-batches-bin"
    names = _CIFAR_TRAIN + _CIFAR_TEST
    missing = [f for f in names if not (folder / f).exists()]
    if missing and download:
        from torchvision.datasets.utils import download_and_extract_archive

        _download("cifar10", lambda: download_and_extract_archive(CIFAR_URL, data_dir,
                                                                  md5=CIFAR_MD5))
        missing = [f for f in names if not (folder / f).exists()]
    if missing:
        raise DatasetUnavailableError(
            f"cifar10: missing {', '.join(missing)} under {folder}; add --download to fetch"
            " the binary version")
    train = [read_cifar_batch((folder / f).read_bytes()) for f in _CIFAR_TRAIN]
    tx = np.concatenate([x for x, _ in train])
    ty = np.concatenate([y for _, y in train])
    vx, vy = read_cifar_batch((folder / _CIFAR_TEST[0]).read_bytes())

    def norm(a: np.ndarray) -> np.ndarray:
        return (a.astype(np.float32) / 255.0 - _CIFAR_MEAN) / _CIFAR_STD

    return make_dataset("cifar10", norm(tx), ty, norm(vx), vy, 10)
