"""Out-of-core arrays: releasing a memmap's pages keeps the data and drops the RSS.

* a memmap ``SampleStore`` whose pages are released after every few rows gives exactly
  the dense store's numbers (float32, same additions in the same order: tolerance 0);
* ``release`` takes the touched pages of a 64 MiB mapping out of the resident set
  (Linux ``/proc/self/status``; asserted drop of at least 48 MiB of ``RssFile``).
"""
import os

import numpy as np
import pytest
import torch

from hydrattr._core import outofcore
from hydrattr._core.store import SampleStore
from hydrattr._core.trajectory import Trajectory
from hydrattr._core.functional import ParamSpec

from _blobs import HAS_PROC_MAPS, mapped_files  # noqa: E402


# one recorded step's hyperparameters (plain SGD), as the recording callback writes them
_SGD_ROW = {"lr": [0.1], "momentum": [0.0], "dampening": [0.0], "weight_decay": [0.0],
            "nesterov": [False], "first": [True]}


def _rss_file_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    return None


def test_released_memmap_store_equals_dense(tmp_path, monkeypatch):
    monkeypatch.setattr(outofcore, "DEFAULT_BUDGET", 4096)  # release after every add
    gen = torch.Generator().manual_seed(0)
    dense = SampleStore(50, 300, kind="dense")
    disk = SampleStore(50, 300, kind="memmap", directory=str(tmp_path))
    for _ in range(20):
        rows = torch.randperm(50, generator=gen)[:7].numpy()
        vals = torch.randn(7, 300, generator=gen)
        dense.add(rows, vals)
        disk.add(rows, vals)
    G = torch.randn(3, 300, generator=gen)
    np.testing.assert_array_equal(disk.matmul_t(G, chunk_rows=8).numpy(),
                                  dense.matmul_t(G, chunk_rows=8).numpy())
    np.testing.assert_array_equal(np.asarray(disk.data), dense.data.numpy())


def test_memmap_trajectory_reads_survive_release(tmp_path, monkeypatch):
    monkeypatch.setattr(outofcore, "DEFAULT_BUDGET", 1)
    spec = ParamSpec(["w"], [torch.Size([40])], [40])
    traj = Trajectory(spec, 10, storage="memmap", directory=str(tmp_path))
    thetas = [torch.randn(40) for _ in range(5)]
    for th in thetas:
        traj.append(th, [0, 1], 0.5, _SGD_ROW)
    traj.finish(thetas[-1])
    for _ in range(2):
        for t, th in enumerate(thetas):
            assert torch.equal(traj.theta(t), th)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_release_drops_resident_pages(tmp_path):
    arr = np.lib.format.open_memmap(str(tmp_path / "a.npy"), mode="w+", dtype=np.float32,
                                    shape=(16, 2**20))  # 64 MiB
    arr[:] = 1.0
    before = _rss_file_kib()
    outofcore.release(arr)
    after = _rss_file_kib()
    assert before - after >= 48 * 1024
    assert float(arr[::4, ::4096].sum()) == 4 * 256  # the data survived


@pytest.mark.skipif(not HAS_PROC_MAPS, reason="needs /proc/self/maps (Linux)")
def test_files_in_a_given_directory_have_no_name_and_go_with_their_owner(tmp_path):
    """Memmap files in a user-given directory (``store_dir``) have no name on disk and
    live exactly as long as their object.

    A trajectory (with an optimizer-state series) and a store write into ``tmp_path``;
    while they live, the process maps three deleted files there and reads them back,
    and the directory lists nothing; after the objects are dropped nothing is mapped.
    (Before, every fit with ``store_dir`` left its files behind: gigabytes per fit at
    the paper's size; later a killed process still did.)
    """
    import gc

    spec = ParamSpec(["w"], [torch.Size([40])], [40])
    traj = Trajectory(spec, 10, storage="memmap", directory=str(tmp_path))
    for t in range(4):
        traj.append(torch.full((40,), float(t)), [t, t + 1], 0.5, _SGD_ROW,
                    opt_state=(torch.full((40,), -float(t)),))
    traj.finish(torch.zeros(spec.n_params))
    store = SampleStore(10, spec.n_params, kind="memmap", directory=str(tmp_path))
    store.add([1, 2], torch.ones(2, spec.n_params))
    mapped = set(mapped_files(tmp_path))  # thetas, one optimizer-state series, store
    assert len(mapped) == 3 and all(m.endswith("(deleted)") for m in mapped)
    assert os.listdir(tmp_path) == []
    assert float(traj.theta(3)[0]) == 3.0 and float(traj.opt_state(2)[0][0]) == -2.0
    assert float(store.matmul_t(torch.ones(1, spec.n_params))[1, 0]) == spec.n_params
    del traj, store
    gc.collect()
    assert mapped_files(tmp_path) == [] and os.listdir(tmp_path) == []
