"""Tests for hydrattr.datasets.

Tests on the real (Fashion-)MNIST files need ``HYDRATTR_DATA`` (e.g.
``HYDRATTR_DATA=/work/shared/data``) and are skipped without it; everything else runs
on hand-built IDX files in ``tmp_path``.
"""
import gzip
import os
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chisquare
from sklearn.linear_model import LogisticRegression

from hydrattr.datasets import (
    IDX_FILES,
    load_digits_split,
    load_fashion_mnist,
    load_idx_dataset,
    load_mnist,
    load_mnist_split,
    make_label_noise,
    make_logistic_toy,
    read_idx_images,
    read_idx_labels,
)


# ----------------------------------------------------------------- fake IDX files

def _write_idx(path, array, magic):
    """Write ``array`` (uint8) as a gzipped IDX file with a big-endian header."""
    array = np.asarray(array, dtype=np.uint8)
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())


def _write_fake_dataset(folder, n_train=5, n_test=3, seed=0):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": rng.integers(0, 10, n_test),
    }
    for key, arr in arrays.items():
        _write_idx(folder / IDX_FILES[key], arr, 2051 if "images" in key else 2049)
    return arrays


def test_idx_parser_matches_hand_built_array(tmp_path):
    images = np.arange(3 * 2 * 4, dtype=np.uint8).reshape(3, 2, 4) * 10
    labels = np.array([7, 0, 255], dtype=np.uint8)
    _write_idx(tmp_path / "im.gz", images, 2051)
    _write_idx(tmp_path / "lb.gz", labels, 2049)
    X = read_idx_images(tmp_path / "im.gz")
    y = read_idx_labels(tmp_path / "lb.gz")
    assert X.shape == (3, 1, 2, 4) and X.dtype == np.float32
    # exact up to float32 rounding of k / 255
    np.testing.assert_allclose(X[:, 0], images / 255.0, rtol=1e-6, atol=0)
    assert X[2, 0, 1, 3] == pytest.approx(230 / 255, rel=1e-6)
    assert y.dtype == np.int64 and y.tolist() == [7, 0, 255]


def test_idx_wrong_magic_raises(tmp_path):
    _write_idx(tmp_path / "im.gz", np.zeros((2, 28, 28)), 2049)  # label magic on images
    with pytest.raises(ValueError, match="magic number 2049, expected 2051"):
        read_idx_images(tmp_path / "im.gz")
    _write_idx(tmp_path / "lb.gz", np.zeros(2), 2051)
    with pytest.raises(ValueError, match="magic number 2051, expected 2049"):
        read_idx_labels(tmp_path / "lb.gz")


def test_idx_size_mismatch_raises(tmp_path):
    header = np.array([2051, 4, 28, 28], dtype=">u4").tobytes()
    with gzip.open(tmp_path / "im.gz", "wb") as fh:
        fh.write(header + bytes(3 * 28 * 28))  # header says 4 images, payload has 3
    with pytest.raises(ValueError, match="implies"):
        read_idx_images(tmp_path / "im.gz")


def test_load_fake_dataset_direct_and_subfolder(tmp_path, monkeypatch):
    monkeypatch.delenv("HYDRATTR_DATA", raising=False)
    arrays = _write_fake_dataset(tmp_path / "fashion-mnist")
    # subfolder found from the parent directory, both via argument and env var
    X_tr, y_tr, X_te, y_te = load_idx_dataset("fashion-mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(np.rint(X_tr[:, 0] * 255), arrays["train_images"])
    np.testing.assert_array_equal(y_te, arrays["test_labels"])
    assert X_te.shape == (3, 1, 28, 28) and y_tr.dtype == np.int64
    monkeypatch.setenv("HYDRATTR_DATA", str(tmp_path))
    X, y = load_fashion_mnist(kind="test")
    np.testing.assert_array_equal(y, arrays["test_labels"])
    # files directly in data_dir
    X, y = load_fashion_mnist(data_dir=tmp_path / "fashion-mnist", kind="train")
    np.testing.assert_array_equal(y, arrays["train_labels"])
    # the mnist loader does not pick up the fashion-mnist subfolder
    with pytest.raises(FileNotFoundError):
        load_mnist(data_dir=tmp_path)


def test_missing_files_message(tmp_path, monkeypatch):
    monkeypatch.delenv("HYDRATTR_DATA", raising=False)
    with pytest.raises(FileNotFoundError) as err:
        load_mnist(data_dir=tmp_path)
    msg = str(err.value)
    for part in (str(tmp_path), "HYDRATTR_DATA", "data_dir", "train-images-idx3-ubyte.gz"):
        assert part in msg
    with pytest.raises(FileNotFoundError, match="HYDRATTR_DATA"):
        load_mnist()  # neither argument nor env var


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        load_mnist(data_dir=tmp_path, kind="valid")
    with pytest.raises(ValueError, match="name"):
        load_idx_dataset("cifar10", data_dir=tmp_path)


def test_split_on_fake_files(tmp_path):
    _write_fake_dataset(tmp_path / "mnist", n_train=20, n_test=4)
    s = load_mnist_split("mnist", data_dir=tmp_path, n_train=12, n_valid=5, random_state=3)
    assert s.X_train.shape == (12, 1, 28, 28) and s.X_valid.shape == (5, 1, 28, 28)
    assert s.X_test.shape == (4, 1, 28, 28)
    assert not set(s.train_index) & set(s.valid_index)
    X, y = load_mnist(data_dir=tmp_path)
    np.testing.assert_array_equal(s.y_valid, y[s.valid_index])
    s2 = load_mnist_split("mnist", data_dir=tmp_path, n_train=12, n_valid=5, random_state=3)
    np.testing.assert_array_equal(s.train_index, s2.train_index)
    with pytest.raises(ValueError, match="n_train \\+ n_valid"):
        load_mnist_split("mnist", data_dir=tmp_path, n_train=16, n_valid=5)
    with pytest.raises(ValueError, match="n_train"):
        load_mnist_split("mnist", data_dir=tmp_path, n_train=0)


# ------------------------------------------------------------------ real files

def _real_dir(name):
    root = os.environ.get("HYDRATTR_DATA")
    if not root:
        pytest.skip("HYDRATTR_DATA is not set (e.g. HYDRATTR_DATA=/work/shared/data)")
    for cand in (Path(root), Path(root) / name):
        if all((cand / f).is_file() for f in IDX_FILES.values()):
            return cand
    pytest.skip(f"{name} IDX files not found under HYDRATTR_DATA={root}")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_files(name):
    _real_dir(name)
    X_tr, y_tr, X_te, y_te = load_idx_dataset(name)
    assert X_tr.shape == (60000, 1, 28, 28) and X_te.shape == (10000, 1, 28, 28)
    assert X_tr.dtype == np.float32 and y_tr.dtype == np.int64
    assert X_tr.min() == 0.0 and X_tr.max() == 1.0
    assert set(np.unique(y_tr)) == set(range(10)) and set(np.unique(y_te)) == set(range(10))
    if name == "mnist":  # well-known first training labels of MNIST
        assert y_tr[:5].tolist() == [5, 0, 4, 1, 9]
    else:  # Fashion-MNIST's test set is balanced, 1000 per class
        assert np.bincount(y_te).tolist() == [1000] * 10


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_split(name):
    _real_dir(name)
    s = load_mnist_split(name, random_state=0)
    assert len(s.X_train) == 50000 and len(s.X_valid) == 10000 and len(s.X_test) == 10000
    assert len(np.intersect1d(s.train_index, s.valid_index)) == 0
    assert len(np.union1d(s.train_index, s.valid_index)) == 60000
    X, y = load_idx_dataset(name)[:2]
    np.testing.assert_array_equal(s.X_valid[:50], X[s.valid_index[:50]])
    small = load_mnist_split(name, random_state=0, n_train=1000, n_valid=200)
    assert small.X_train.shape == (1000, 1, 28, 28) and small.y_valid.shape == (200,)


# ------------------------------------------------------------------ digits

def test_digits_split():
    s = load_digits_split(test_size=0.25, valid_size=0.2, random_state=0)
    n = len(s.X_train) + len(s.X_valid) + len(s.X_test)
    assert n == 1797 and len(s.X_test) == 450  # ceil(0.25 * 1797)
    assert s.X_train.shape[1] == 64 and s.X_train.dtype == np.float32
    assert s.y_train.dtype == np.int64
    assert 0.0 <= s.X_train.min() and s.X_train.max() == 1.0
    # stratified: class proportions in test within 1 sample of the overall ones
    overall = np.bincount(np.concatenate([s.y_train, s.y_valid, s.y_test])) / n
    assert np.all(np.abs(np.bincount(s.y_test) - overall * len(s.y_test)) <= 1.0)
    s0 = load_digits_split(valid_size=0)
    assert s0.X_valid.shape == (0, 64) and len(s0.X_train) == 1797 - 450
    with pytest.raises(ValueError, match="test_size"):
        load_digits_split(test_size=1.5)


# ------------------------------------------------------------------ label noise

def test_label_noise_counts_and_reproducibility():
    y = np.random.default_rng(0).integers(0, 10, 1001)
    y_noisy, mask = make_label_noise(y, 0.3, random_state=1)
    assert mask.sum() == 300  # round(0.3 * 1001) = round(300.3)
    assert np.all(y_noisy[mask] != y[mask])
    np.testing.assert_array_equal(y_noisy[~mask], y[~mask])
    assert y_noisy.dtype == np.int64 and y_noisy.min() >= 0 and y_noisy.max() <= 9
    y2, m2 = make_label_noise(y, 0.3, random_state=1)
    np.testing.assert_array_equal(y2, y_noisy)
    np.testing.assert_array_equal(m2, mask)
    assert make_label_noise(y, 0.0)[1].sum() == 0
    all_flipped, m = make_label_noise(y, 1.0, random_state=0)
    assert m.all() and np.all(all_flipped != y)
    assert make_label_noise(np.arange(4) % 2, 0.125)[1].sum() == 1  # 0.5 rounds half up


def test_label_noise_uniform_over_other_classes():
    y = np.repeat(np.arange(10), 10000)
    y_noisy, mask = make_label_noise(y, 0.5, n_classes=10, random_state=0)
    # new class given the old one: offsets (new - old) mod 10 uniform on 1..9.
    # chi-square goodness of fit, loose threshold p > 1e-3 (seeded, deterministic)
    offsets = (y_noisy[mask] - y[mask]) % 10
    counts = np.bincount(offsets, minlength=10)
    assert counts[0] == 0
    assert chisquare(counts[1:]).pvalue > 1e-3
    # flipped positions uniform over the original classes (10 classes x 5000 expected)
    assert chisquare(np.bincount(y[mask], minlength=10)).pvalue > 1e-3


def test_label_noise_validation():
    with pytest.raises(ValueError, match="rate"):
        make_label_noise([0, 1], 1.5)
    with pytest.raises(ValueError, match="1-d"):
        make_label_noise(np.zeros((2, 2), dtype=int), 0.5)
    with pytest.raises(ValueError, match="integer"):
        make_label_noise([0.5, 1.0], 0.5)
    with pytest.raises(ValueError, match="n_classes"):
        make_label_noise([0, 3], 0.5, n_classes=2)


# ------------------------------------------------------------------ logistic toy

def test_logistic_toy_structure():
    toy = make_logistic_toy(200, random_state=0)
    assert toy.X.shape == (200, 2) and toy.X.dtype == np.float64
    assert toy.y.shape == (200,) and toy.y.dtype == np.int64
    assert set(np.unique(toy.y)) <= {0, 1}
    # the outlier is the point farthest from the mean of the other points
    others = np.delete(toy.X, toy.outlier_index, axis=0)
    dist = np.linalg.norm(toy.X - others.mean(axis=0), axis=1)
    assert np.argmax(dist) == toy.outlier_index
    assert np.bincount(toy.cluster[toy.cluster >= 0]).tolist() == [100, 99]
    np.testing.assert_array_equal(make_logistic_toy(200, random_state=0).X, toy.X)


def test_logistic_toy_follows_sigmoid_model():
    toy = make_logistic_toy(20001, random_state=0)
    keep = np.arange(len(toy.y)) != toy.outlier_index
    model = LogisticRegression(C=1e8, max_iter=2000, tol=1e-10).fit(toy.X[keep], toy.y[keep])
    # unpenalized MLE; over 20 seeds the estimates' std is ~0.035 for intercept/coefs,
    # so a 0.15 tolerance is > 4 standard errors
    np.testing.assert_allclose(model.coef_[0], toy.coef, atol=0.15)
    assert model.intercept_[0] == pytest.approx(toy.intercept, abs=0.15)
    # the empirical label rate matches the mean model probability (binomial sd ~ 0.0035)
    assert toy.y[keep].mean() == pytest.approx(toy.proba[keep].mean(), abs=0.02)
