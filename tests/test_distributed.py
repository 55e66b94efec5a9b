"""Exact-mode sweeps over test chunks as parallel tasks, on joblib threads and on a dask
``LocalCluster`` (``processes=False``: worker threads in this process, so the test is
fast; the tasks still read the trajectory and training data only through the files
written once to the shared directory; threads in one process run their sweeps one at a
time, see hydrattr/distributed.py).

Ground truth: ``att.attribute`` on all test points at once. Each task runs the same code
on its chunk, so the chunked matrix equals it to rounding (rtol 1e-12: per-chunk vmap
batches only change summation order inside the test gradients).
"""
import os
import pickle

import joblib
import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier

from hydrattr import HydraAttributor
from hydrattr.distributed import load_shared, parallel_attribute, share_attributor
from hydrattr.models import MLP

N, D, K = 40, 5, 3


def _data(n, seed):
    rs = np.random.RandomState(seed)
    X = rs.randn(n, D)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1).astype(np.int64)
    return X, y


@pytest.fixture(scope="module")
def fitted():
    X, y = _data(N, 0)
    net = NeuralNetClassifier(MLP, module__n_features=D, module__n_classes=K,
                              module__hidden=(6,), module__activation="tanh",
                              module__dtype=torch.float64, criterion=torch.nn.CrossEntropyLoss,
                              optimizer=torch.optim.Adam, lr=0.02, batch_size=16, max_epochs=2,
                              train_split=None, verbose=0)
    att = HydraAttributor(net, mode="exact", random_state=0, verbose=0).fit(X, y)
    Xt, yt = _data(7, 1)
    return att, Xt, yt, att.attribute(Xt, yt)


def test_shared_files_are_memory_mapped(fitted, tmp_path):
    att, Xt, yt, C = fitted
    share_attributor(att, str(tmp_path))
    assert {"attributor.pkl", "trajectory", "data"} <= set(os.listdir(tmp_path))
    # the pickled attributor holds neither the snapshots nor the data
    with open(tmp_path / "attributor.pkl", "rb") as f:
        shell = pickle.load(f)["attributor"]
    assert shell.trajectory_ is None and shell._X is None
    # the fitted net keeps no recording callback (it would hold both)
    assert "hydrattr_recorder" not in dict(shell.net_.callbacks_)
    loaded = load_shared(str(tmp_path))
    assert isinstance(loaded.trajectory_._thetas, np.memmap)
    assert all(isinstance(s._rows, np.memmap) for s in loaded.trajectory_._opt_series)
    np.testing.assert_allclose(loaded.attribute(Xt, yt), C, rtol=1e-12, atol=1e-15)
    # the caller's attributor is intact
    assert att.trajectory_ is not None and att._X is not None


def test_joblib_threads(fitted, tmp_path):
    att, Xt, yt, C = fitted
    with joblib.parallel_config(backend="threading"):
        got = parallel_attribute(att, Xt, yt, chunk_size=3, n_jobs=2,
                                 shared_dir=str(tmp_path))
    np.testing.assert_allclose(got, C, rtol=1e-12, atol=1e-15)
    mean = parallel_attribute(att, Xt, yt, objective="mean", chunk_size=3, n_jobs=1)
    np.testing.assert_allclose(mean, att.attribute(Xt, yt, objective="mean"), rtol=1e-10,
                               atol=1e-15)


def test_dask_local_cluster(fitted, tmp_path):
    distributed = pytest.importorskip(
        "dask.distributed", reason="dask.distributed is not installed: "
                                   "pip install 'dask[distributed]' (in the dev extra)")
    att, Xt, yt, C = fitted
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        with joblib.parallel_config(backend="dask"):
            got = parallel_attribute(att, Xt, yt, chunk_size=2, shared_dir=str(tmp_path))
        assert len(client.scheduler_info()["workers"]) == 2
    np.testing.assert_allclose(got, C, rtol=1e-12, atol=1e-15)


def test_parameter_errors(fitted):
    att, Xt, yt, _ = fitted
    with pytest.raises(ValueError, match="chunk_size"):
        parallel_attribute(att, Xt, yt, chunk_size=0)
    with pytest.raises(ValueError, match="objective"):
        parallel_attribute(att, Xt, yt, objective="sum")


# ------------------------------------------------------------- what is shared is checked
def test_shared_dir_of_another_attributor_is_refused(fitted, tmp_path):
    att, Xt, yt, C = fitted
    other = HydraAttributor(att.net, mode="exact", random_state=1, verbose=0).fit(*_data(N, 0))
    parallel_attribute(other, Xt, yt, chunk_size=4, n_jobs=1, shared_dir=str(tmp_path))
    with pytest.raises(ValueError, match="already holds another attributor"):
        parallel_attribute(att, Xt, yt, chunk_size=4, n_jobs=1, shared_dir=str(tmp_path))
    # the same attributor with another mode is another attributor too
    with pytest.raises(ValueError, match="fingerprint"):
        parallel_attribute(other.set_params(mode="fast"), Xt, yt, n_jobs=1,
                           shared_dir=str(tmp_path))
    other.set_params(mode="exact")
    # reuse by the attributor that wrote it gives its own C
    np.testing.assert_allclose(
        parallel_attribute(other, Xt, yt, chunk_size=4, n_jobs=1, shared_dir=str(tmp_path)),
        other.attribute(Xt, yt), rtol=1e-12, atol=1e-15)


def test_a_task_checks_what_it_loads(fitted, tmp_path):
    from hydrattr.distributed import _chunk_task, fingerprint

    att, Xt, yt, C = fitted
    share_attributor(att, str(tmp_path))
    with pytest.raises(ValueError, match="holds another attributor than the one"):
        _chunk_task(str(tmp_path), "0" * 64, Xt, yt, "per_sample")
    np.testing.assert_allclose(_chunk_task(str(tmp_path), fingerprint(att), Xt, yt,
                                           "per_sample"), C, rtol=1e-12, atol=1e-15)


def test_an_interrupted_share_leaves_nothing(fitted, tmp_path, monkeypatch):
    att, Xt, yt, C = fitted

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pickle, "dump", interrupted)  # while writing attributor.pkl
    with pytest.raises(KeyboardInterrupt):
        share_attributor(att, str(tmp_path))
    assert os.listdir(tmp_path) == []


_SIGTERM_SCRIPT = """
import os, signal, sys
sys.path[:0] = [{tests!r}]
import joblib
import hydrattr.distributed as d
from test_distributed import _data, fitted
att, Xt, yt, C = fitted.__wrapped__()

def killed(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    import time
    time.sleep(5)

d._chunk_task = killed
with joblib.parallel_config(backend="threading"):
    d.parallel_attribute(att, Xt, yt, n_jobs=1)
"""


def test_temporary_shared_dir_is_removed_on_sigterm(tmp_path):
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "term.py"
    script.write_text(_SIGTERM_SCRIPT.format(tests=tests))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env={**os.environ, "TMPDIR": str(tmp)})
    assert out.returncode == 128 + 15, out.stderr[-2000:]
    assert [p for p in os.listdir(tmp) if p.startswith("hydrattr-shared-")] == []
