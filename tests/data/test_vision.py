"""IDX reader/writer, Fashion-MNIST loading, subsets and dict datasets — on synthetic files only."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from kdforge.data.vision import (
    FASHION_MNIST_CLASSES,
    ImageClassificationDataset,
    load_fashion_mnist,
    normalize_images,
    read_idx,
    stratified_indices,
    write_idx,
    write_synthetic_fashion_mnist,
)
from kdforge.errors import DataError


def write_fake_fashion_mnist(folder, n_train=40, n_test=20, compress=True):
    return write_synthetic_fashion_mnist(folder, n_train=n_train, n_test=n_test, compress=compress)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
def test_idx_round_trip_preserves_values_shape_and_dtype(tmp_path, dtype, name):
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    write_idx(tmp_path / name, array)
    back = read_idx(tmp_path / name)
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, array)


def test_idx_header_is_big_endian_mnist_layout(tmp_path):
    write_idx(tmp_path / "labels", np.array([7, 2, 1], dtype=np.uint8))
    raw = (tmp_path / "labels").read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x01"
    assert raw[4:8] == (3).to_bytes(4, "big")
    assert raw[8:] == bytes([7, 2, 1])


def test_gzip_detected_by_content_not_name(tmp_path):
    write_idx(tmp_path / "plain", np.ones((2, 2), np.uint8))
    (tmp_path / "misnamed").write_bytes(gzip.compress((tmp_path / "plain").read_bytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "misnamed"), np.ones((2, 2), np.uint8))


def test_truncated_idx_raises_data_error(tmp_path):
    write_idx(tmp_path / "x", np.ones((4, 4), np.uint8))
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(tmp_path / "x")


def test_non_idx_file_raises_data_error(tmp_path):
    (tmp_path / "x").write_bytes(b"hello world")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "x")


@pytest.mark.parametrize("compress", [True, False])
def test_load_fashion_mnist_reads_four_files_gz_or_raw(tmp_path, compress):
    write_fake_fashion_mnist(tmp_path, compress=compress)
    splits = load_fashion_mnist(tmp_path)
    assert splits.train_images.shape == (40, 28, 28) and splits.train_images.dtype == torch.uint8
    assert splits.test_labels.tolist() == [i % 10 for i in range(20)]
    assert splits.classes == FASHION_MNIST_CLASSES and splits.num_classes == 10


def test_load_fashion_mnist_missing_file_names_it(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(tmp_path)


def test_load_fashion_mnist_count_mismatch_raises(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(39, np.uint8))
    with pytest.raises(DataError, match="do not match"):
        load_fashion_mnist(tmp_path)


def test_stratified_indices_balances_classes_and_respects_exclude():
    labels = torch.arange(1000) % 10
    first = stratified_indices(labels, 200, seed=1)
    assert torch.bincount(labels[first], minlength=10).tolist() == [20] * 10
    second = stratified_indices(labels, 300, seed=1, exclude=first)
    assert not set(first.tolist()) & set(second.tolist())
    assert torch.equal(stratified_indices(labels, 200, seed=1), first)  # deterministic per seed
    assert not torch.equal(stratified_indices(labels, 200, seed=2), first)


def test_stratified_indices_gives_unused_quota_of_rare_class_to_others():
    labels = torch.tensor([0] * 2 + [1] * 50 + [2] * 50)
    idx = stratified_indices(labels, 30, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [2, 14, 14]


def test_stratified_indices_too_many_raises():
    with pytest.raises(DataError, match="only 10"):
        stratified_indices(torch.arange(10), 11)


def test_normalize_images_adds_channel_axis_and_standardises():
    x = normalize_images(torch.tensor([[[0, 255]]], dtype=torch.uint8), mean=0.5, std=0.5)
    assert x.shape == (1, 1, 1, 2)
    assert x.flatten().tolist() == [-1.0, 1.0]


def test_dataset_yields_dict_items_with_optional_teacher_logits():
    x, y, t = torch.zeros(3, 1, 28, 28), torch.tensor([1, -100, 2]), torch.randn(3, 10)
    batch = torch.utils.data.default_collate([ImageClassificationDataset(x, y, t)[i] for i in range(3)])
    assert set(batch) == {"inputs", "labels", "teacher_logits"}
    assert batch["labels"].tolist() == [1, -100, 2] and torch.equal(batch["teacher_logits"], t)
    assert set(ImageClassificationDataset(x, y)[0]) == {"inputs", "labels"}
    with pytest.raises(DataError):
        ImageClassificationDataset(x, y[:2])


def test_fashion_mnist_is_a_preset_of_the_data_layer(tmp_path, monkeypatch):
    """The asset read by the data layer gives the same images and labels as load_fashion_mnist."""
    import dataclasses

    from kdforge.data import PRESETS, load

    write_fake_fashion_mnist(tmp_path)
    monkeypatch.setitem(PRESETS, "fashion-mnist", dataclasses.replace(PRESETS["fashion-mnist"], folder=lambda: tmp_path))
    dd = load({"path": "fashion-mnist", "eval_split": "test"})
    splits = load_fashion_mnist(tmp_path)
    assert len(dd["train"]) == 40 and len(dd["eval"]) == 20
    assert np.array_equal(np.asarray(dd["train"]["image"], dtype=np.uint8), splits.train_images.numpy())
    assert dd["eval"]["label"] == splits.test_labels.tolist()
    assert dd["train"].features["label"].names == list(FASHION_MNIST_CLASSES)
