"""Devices: computation runs where the skorch net's ``device`` says; the trajectory, the
optimizer-state snapshots and the per-sample store stay on the CPU.

The CUDA tests are marked ``gpu`` and skipped without CUDA. They compare a float64 fit on
``device="cuda"`` with the same fit on the CPU: same seed, same batches, same
initialisation (skorch initialises on the CPU and moves the module), so the contribution
matrices agree up to the rounding differences of the GPU kernels amplified by a few
dozen optimizer steps (tolerance 1e-8 relative to the largest entry).
"""
import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier

from hydrattr import HydraAttributor
from hydrattr.models import MLP

N, D, K = 48, 5, 3
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA (no GPU on this machine)")


def _data(n=N, seed=0):
    rs = np.random.RandomState(seed)
    X = rs.randn(n, D)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1).astype(np.int64)
    return X, y


def _net(device, optimizer=torch.optim.Adam, **kw):
    return NeuralNetClassifier(MLP, module__n_features=D, module__n_classes=K,
                               module__hidden=(6,), module__activation="tanh",
                               module__dtype=torch.float64, criterion=torch.nn.CrossEntropyLoss,
                               optimizer=optimizer, lr=0.02, batch_size=16, max_epochs=2,
                               train_split=None, verbose=0, device=device,
                               iterator_train__shuffle=True, **kw)


def _check_on_cpu(att):
    traj = att.trajectory_
    if traj is not None:
        assert traj.theta(0).device.type == "cpu"
        state = traj.opt_state(0)
        assert state is None or all(s.device.type == "cpu" for s in state)
    if getattr(att, "store_", None) is not None:
        data = att.store_.data
        assert isinstance(data, np.ndarray) or data.device.type == "cpu"


@pytest.mark.parametrize("mode,storage", [("exact", "dense"), ("fast", "dense"),
                                          ("fast", "memmap")])
def test_cpu_net_keeps_everything_on_cpu(mode, storage):
    X, y = _data()
    att = HydraAttributor(_net("cpu"), mode=mode, storage=storage, random_state=0,
                          verbose=0).fit(X, y)
    assert att._device.type == "cpu"
    _check_on_cpu(att)
    assert np.isfinite(att.attribute(X[:2], y[:2])).all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("mode,storage", [("exact", "dense"), ("fast", "dense"),
                                          ("fast", "replay")])
def test_cuda_matches_cpu(optimizer, mode, storage):
    X, y = _data()
    Xt, yt = X[:3] + 0.1, y[:3]
    kw = {"optimizer__momentum": 0.9} if optimizer is torch.optim.SGD else {}
    C = {}
    for device in ("cpu", "cuda"):
        att = HydraAttributor(_net(device, optimizer, **kw), mode=mode, storage=storage,
                              random_state=0, verbose=0).fit(X, y)
        assert att._device.type == device
        _check_on_cpu(att)
        C[device] = att.attribute(Xt, yt)
    scale = np.abs(C["cpu"]).max()
    np.testing.assert_allclose(C["cuda"], C["cpu"], rtol=0, atol=1e-8 * scale)


@pytest.mark.gpu
@needs_cuda
def test_cuda_torch_inputs_on_device():
    X, y = _data()
    Xc, yc = torch.as_tensor(X, device="cuda"), torch.as_tensor(y, device="cuda")
    att = HydraAttributor(_net("cuda"), mode="fast", random_state=0, verbose=0).fit(Xc, yc)
    ref = HydraAttributor(_net("cuda"), mode="fast", random_state=0, verbose=0).fit(X, y)
    np.testing.assert_allclose(att.attribute(Xc[:2], yc[:2]), ref.attribute(X[:2], y[:2]),
                               rtol=1e-12, atol=1e-15)
