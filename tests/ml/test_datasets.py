"""Data sets: bundled digits, seeded synthetic, and pickle-free MNIST / Fashion-MNIST /
CIFAR-10 readers fed with tiny hand-written files (no downloads)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ml.datasets import (
    DatasetUnavailableError,
    available_datasets,
    load_dataset,
    read_cifar_batch,
    read_idx,
)
from ml.models import build_model
from ml.training import evaluate, train_local

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return (bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
            + arr.tobytes())


def tiny_idx_set(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([3, 1, 4, 1, 5], np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([9, 2, 6], np.uint8),
    }


def write_idx_set(raw: Path, arrays: dict[str, np.ndarray], *, gz: bool) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (raw / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (raw / name).write_bytes(data)


# ---- digits --------------------------------------------------------------------------


def test_digits_has_1797_images_of_8x8_in_10_classes() -> None:
    d = load_dataset("digits")
    assert len(d.train_x) + len(d.test_x) == 1797
    assert len(d.train_y) == len(d.train_x) and len(d.test_y) == len(d.test_x)
    assert len(d.test_x) == 360  # a 20% held-out split
    assert d.input_shape == (1, 8, 8) and d.train_x.shape[1:] == (1, 8, 8)
    assert d.num_classes == 10
    assert set(d.train_y.tolist()) == set(range(10)) == set(d.test_y.tolist())
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    # Standardised with train statistics.
    assert abs(float(d.train_x.mean())) < 1e-4 and abs(float(d.train_x.std()) - 1) < 1e-2


def test_digits_test_split_is_the_same_for_every_seed() -> None:
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=12345)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.test_y, b.test_y)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)


# ---- synthetic -----------------------------------------------------------------------


def test_synthetic_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    a, b, c = (load_dataset("synthetic", seed=s) for s in (3, 3, 4))
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.train_x, c.train_x)
    assert a.input_shape == (20,) and a.num_classes == 10
    assert len(a.train_x) == 4000 and len(a.test_x) == 1000


def test_a_linear_model_learns_synthetic_data() -> None:
    d = load_dataset("synthetic", seed=0)
    torch.manual_seed(0)
    model = build_model("linear", d.input_shape, d.num_classes)
    before = evaluate(model, d.test_x, d.test_y).accuracy
    train_local(model, d.train_x, d.train_y, epochs=3, batch_size=64, lr=0.05, seed=0)
    after = evaluate(model, d.test_x, d.test_y).accuracy
    assert after > 0.8 > before


def test_unknown_dataset_error_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as info:
        load_dataset("imagenet")
    for name in ("cifar10", "digits", "fashion-mnist", "mnist", "synthetic"):
        assert name in available_datasets()
        assert name in str(info.value)


# ---- IDX: MNIST / Fashion-MNIST ------------------------------------------------------


@pytest.mark.parametrize(("name", "folder", "gz", "mean", "std"), [
    ("mnist", "MNIST", True, 0.1307, 0.3081),
    ("fashion-mnist", "FashionMNIST", False, 0.2860, 0.3530),
])
def test_idx_datasets_load_labels_and_images_from_data_dir(
        tmp_path: Path, name: str, folder: str, gz: bool, mean: float, std: float) -> None:
    arrays = tiny_idx_set(seed=1)
    write_idx_set(tmp_path / folder / "raw", arrays, gz=gz)
    d = load_dataset(name, data_dir=str(tmp_path))
    assert d.name == name
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert d.train_x.shape == (5, 1, 28, 28) and d.test_x.shape == (3, 1, 28, 28)
    assert d.train_y.tolist() == [3, 1, 4, 1, 5]
    assert d.test_y.tolist() == [9, 2, 6]
    expected = (arrays["train-images-idx3-ubyte"].astype(np.float32) / 255.0 - mean) / std
    np.testing.assert_allclose(d.train_x[:, 0].numpy(), expected, rtol=1e-6, atol=1e-6)
    expected = (arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255.0 - mean) / std
    np.testing.assert_allclose(d.test_x[:, 0].numpy(), expected, rtol=1e-6, atol=1e-6)


def test_idx_dataset_without_data_dir_says_how_to_get_it() -> None:
    with pytest.raises(DatasetUnavailableError, match="--data-dir.*--download"):
        load_dataset("mnist")


def test_missing_idx_files_are_named_and_download_is_suggested(tmp_path: Path) -> None:
    arrays = tiny_idx_set(seed=1)
    partial = {k: arrays[k] for k in IDX_NAMES[:2]}
    write_idx_set(tmp_path / "MNIST" / "raw", partial, gz=False)
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("mnist", data_dir=str(tmp_path))
    msg = str(info.value)
    assert "t10k-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "train-images-idx3-ubyte" not in msg
    assert "--download" in msg
    assert isinstance(info.value, ValueError)  # the CLI reports ValueErrors cleanly


def test_fashion_mnist_does_not_read_mnist_files(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "MNIST" / "raw", tiny_idx_set(seed=1), gz=False)
    with pytest.raises(DatasetUnavailableError, match="FashionMNIST"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def _corrupt_wrong_magic(data: bytes) -> bytes:
    return b"\x00\x00\x0d" + data[3:]  # 0x0D = float32 IDX, not unsigned bytes


def _corrupt_truncated_body(data: bytes) -> bytes:
    return data[:-10]


def _corrupt_truncated_header(data: bytes) -> bytes:
    return data[:9]


@pytest.mark.parametrize("corrupt", [_corrupt_wrong_magic, _corrupt_truncated_body,
                                     _corrupt_truncated_header])
def test_corrupt_idx_file_is_a_value_error(tmp_path: Path, corrupt) -> None:  # type: ignore[no-untyped-def]
    raw = tmp_path / "MNIST" / "raw"
    write_idx_set(raw, tiny_idx_set(seed=1), gz=False)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ValueError, match="IDX"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_read_idx_rejects_bad_inputs() -> None:
    good = idx_bytes(np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert read_idx(good).tolist() == [[0, 1, 2], [3, 4, 5]]
    for bad in (b"", b"\x00\x00", b"\x01" + good[1:], good[:-1], good + b"\x00", good[:7]):
        with pytest.raises(ValueError):
            read_idx(bad)


def test_image_and_label_count_mismatch_is_a_value_error(tmp_path: Path) -> None:
    arrays = tiny_idx_set(seed=1)
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:4]
    write_idx_set(tmp_path / "MNIST" / "raw", arrays, gz=False)
    with pytest.raises(ValueError, match="counts differ"):
        load_dataset("mnist", data_dir=str(tmp_path))


@pytest.mark.parametrize("damage", ["truncated", "not-gzip"])
def test_corrupt_gzipped_idx_file_is_a_value_error(tmp_path: Path, damage: str) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_idx_set(raw, tiny_idx_set(seed=1), gz=True)
    path = raw / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20] if damage == "truncated" else b"garbage, not gzip")
    with pytest.raises(ValueError):
        load_dataset("mnist", data_dir=str(tmp_path))


# ---- CIFAR-10 (binary) ---------------------------------------------------------------

REC = 1 + 3 * 32 * 32
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))


def cifar_records(labels: list[int], seed: int) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    recs = b"".join(bytes([lab]) + pixels[i].tobytes() for i, lab in enumerate(labels))
    return recs, pixels


def write_cifar(root: Path) -> tuple[list[int], np.ndarray, list[int], np.ndarray]:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    train_labels: list[int] = []
    train_pixels = []
    for i, name in enumerate(CIFAR_TRAIN):
        labels = [(2 * i) % 10, (2 * i + 1) % 10]
        data, pixels = cifar_records(labels, seed=i)
        (folder / name).write_bytes(data)
        train_labels += labels
        train_pixels.append(pixels)
    test_labels = [7, 0, 9]
    data, test_pixels = cifar_records(test_labels, seed=99)
    (folder / "test_batch.bin").write_bytes(data)
    return train_labels, np.concatenate(train_pixels), test_labels, test_pixels


def test_cifar10_loads_binary_batches_in_order(tmp_path: Path) -> None:
    train_labels, train_pixels, test_labels, test_pixels = write_cifar(tmp_path)
    d = load_dataset("cifar10", data_dir=str(tmp_path))
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10
    assert d.train_x.shape == (10, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
    assert d.train_y.tolist() == train_labels == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert d.test_y.tolist() == test_labels
    mean = np.array([0.4914, 0.4822, 0.4465], np.float32)[None, :, None, None]
    std = np.array([0.2470, 0.2435, 0.2616], np.float32)[None, :, None, None]
    np.testing.assert_allclose(d.train_x.numpy(), (train_pixels / 255.0 - mean) / std,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d.test_x.numpy(), (test_pixels / 255.0 - mean) / std,
                               rtol=1e-5, atol=1e-5)


def test_cifar10_batch_with_a_partial_record_is_a_value_error(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="not a whole number of records"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_read_cifar_batch_rejects_empty_and_bad_labels() -> None:
    with pytest.raises(ValueError):
        read_cifar_batch(b"")
    data, _ = cifar_records([1, 10], seed=0)
    with pytest.raises(ValueError, match="label out of range"):
        read_cifar_batch(data)


def test_missing_cifar10_files_are_named_and_download_is_suggested(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").unlink()
    (tmp_path / "cifar-10-batches-bin" / "data_batch_5.bin").unlink()
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("cifar10", data_dir=str(tmp_path))
    msg = str(info.value)
    assert "test_batch.bin" in msg and "data_batch_5.bin" in msg
    assert "data_batch_1.bin" not in msg
    assert "--download" in msg
    with pytest.raises(DatasetUnavailableError, match="--data-dir"):
        load_dataset("cifar10")


# ---- empty folders and --download (no network: torchvision is replaced) ---------------


def test_mnist_in_an_empty_data_dir_names_all_four_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("mnist", data_dir=str(tmp_path))
    msg = str(info.value)
    assert all(name in msg for name in IDX_NAMES)
    assert str(tmp_path / "MNIST" / "raw") in msg and "--download" in msg


def test_download_fetches_mnist_through_torchvision_then_reads_the_idx_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    calls: list[tuple[str, bool]] = []

    class FakeMNIST:
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            calls.append((root, download))
            write_idx_set(Path(root) / "MNIST" / "raw", tiny_idx_set(seed=2), gz=False)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    d = load_dataset("mnist", data_dir=str(tmp_path), download=True)
    assert calls == [(str(tmp_path), True)]
    assert d.train_y.tolist() == [3, 1, 4, 1, 5]
    load_dataset("mnist", data_dir=str(tmp_path), download=True)
    assert len(calls) == 1  # files present: no second download


def test_failed_download_is_a_dataset_unavailable_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision
    import torchvision.datasets.utils

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DatasetUnavailableError,
                       match="fashion-mnist: download failed.*unreachable"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path), download=True)

    seen: list[tuple[object, ...]] = []

    def offline_archive(url: str, root: str, **kwargs: object) -> None:
        seen.append((url, root, kwargs.get("md5")))
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive",
                        offline_archive)
    with pytest.raises(DatasetUnavailableError, match="cifar10: download failed"):
        load_dataset("cifar10", data_dir=str(tmp_path), download=True)
    # The binary (pickle-free) archive, checked against its published md5.
    assert seen == [("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", str(tmp_path),
                     "c32a1d4ab5d03f1284b67883e8d87530")]


def test_idx_labels_beyond_nine_are_a_value_error(tmp_path: Path) -> None:
    arrays = tiny_idx_set(seed=1)
    arrays["t10k-labels-idx1-ubyte"] = np.array([9, 2, 200], np.uint8)
    write_idx_set(tmp_path / "MNIST" / "raw", arrays, gz=False)
    with pytest.raises(ValueError, match="label out of range"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_idx_images_that_are_not_n_x_h_x_w_are_a_value_error(tmp_path: Path) -> None:
    arrays = tiny_idx_set(seed=1)
    arrays["train-images-idx3-ubyte"] = arrays["train-images-idx3-ubyte"].reshape(5, 784)
    write_idx_set(tmp_path / "MNIST" / "raw", arrays, gz=False)
    with pytest.raises(ValueError, match="N x H x W"):
        load_dataset("mnist", data_dir=str(tmp_path))
