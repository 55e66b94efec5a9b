"""CIFAR-10 loading from torchvision's layout, on small files written in CIFAR's own
pickle format (dicts with ``data`` uint8 (n, 3072) and ``labels``), plus a check
against torchvision's own reader when it is installed (exact equality: both decode the
same bytes)."""
import pickle

import numpy as np
import pytest

from hydrattr.datasets import load_cifar10
from hydrattr._cifar import CIFAR10_FOLDER

PER_BATCH = 6


def _write_cifar(root, seed=0):
    rs = np.random.RandomState(seed)
    folder = root / CIFAR10_FOLDER
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rs.randint(0, 256, size=(PER_BATCH, 3072)).astype(np.uint8)
        labels = rs.randint(0, 10, size=PER_BATCH).tolist()
        with open(folder / name, "wb") as f:  # CIFAR's python files are protocol-2 pickles
            pickle.dump({"batch_label": name, "data": data, "labels": labels,
                         "filenames": [f"{name}_{k}.png" for k in range(PER_BATCH)]}, f,
                        protocol=2)
        batches[name] = (data, np.asarray(labels))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                     "frog", "horse", "ship", "truck"],
                     "num_cases_per_batch": PER_BATCH, "num_vis": 3072}, f, protocol=2)
    return batches


def test_load_cifar10_layout_values_and_split(tmp_path):
    batches = _write_cifar(tmp_path)
    n_total = 5 * PER_BATCH
    s = load_cifar10(tmp_path, n_train=20, n_valid=6, random_state=0)
    assert s.X_train.shape == (20, 3, 32, 32) and s.X_train.dtype == np.float32
    assert s.X_test.shape == (PER_BATCH, 3, 32, 32)
    assert s.classes[1] == "automobile" and s.name == "cifar10"
    data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    # row-major channel planes: data[k, c*1024 + h*32 + w] == image[c, h, w]
    ref = data.reshape(-1, 3, 32, 32)[s.train_index].astype(np.float32) / 255
    np.testing.assert_array_equal(s.X_train, ref)
    np.testing.assert_array_equal(s.y_train, labels[s.train_index])
    assert s.X_train[0, 2, 5, 7] == data[s.train_index[0], 2 * 1024 + 5 * 32 + 7] / np.float32(255)
    np.testing.assert_array_equal(s.y_test, batches["test_batch"][1])
    assert len(set(s.train_index) | set(s.valid_index)) == 26 and s.train_index.max() < n_total
    # the folder itself also works; uint8 kept with dtype=None
    raw = load_cifar10(tmp_path / CIFAR10_FOLDER, n_train=5, n_valid=0, dtype=None)
    assert raw.X_train.dtype == np.uint8


def test_load_cifar10_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("HYDRATTR_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="root"):
        load_cifar10()
    with pytest.raises(FileNotFoundError, match=CIFAR10_FOLDER):
        load_cifar10(tmp_path)
    _write_cifar(tmp_path)
    with pytest.raises(ValueError, match="n_train"):
        load_cifar10(tmp_path, n_train=25, n_valid=10)


def test_matches_torchvision_reader(tmp_path, monkeypatch):
    tv = pytest.importorskip("torchvision.datasets", reason="torchvision not installed")
    _write_cifar(tmp_path)
    # our small files have other checksums than the real distribution
    monkeypatch.setattr(tv.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    ds = tv.CIFAR10(str(tmp_path), train=True, download=False)
    s = load_cifar10(tmp_path, n_train=30, n_valid=0, random_state=None, dtype=None)
    order = np.argsort(s.train_index)
    np.testing.assert_array_equal(s.X_train[order].transpose(0, 2, 3, 1), ds.data)
    np.testing.assert_array_equal(s.y_train[order], np.asarray(ds.targets))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    # CIFAR files are pickles: one that would call os.system must not be executed
    import os

    from hydrattr._cifar import read_cifar_batch

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="not a CIFAR file.*refusing to load"):
        read_cifar_batch(path)
    assert not (tmp_path / "pwned").exists()
