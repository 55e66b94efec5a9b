"""HydraAttributor(mode="exact", rank=...): exact sweeps on a low-rank basis of the test
gradients.

1. Float64 MLP with BatchNorm and dropout: with ``rank >= n_test`` (and with test points
   duplicated, at the rank of their span) ``C`` equals exact mode's to float rounding,
   the BatchNorm running-statistics part included, with fewer sweep columns.
2. Least squares, where the sweep's map ``A`` is known in closed form (an independent
   numpy recurrence): a truncated rank gives exactly ``-A (G Pi)^T`` for the projector
   ``Pi`` on the top singular directions of the unit-scaled gradients,
   ``truncation_error_`` is the discarded energy, and each column's error is within
   ``||A||_2 ||e_j||``.
3. Bad ranks are refused with errors naming the parameter.
"""
import numpy as np
import pytest
import torch
from skorch import NeuralNet
from skorch.callbacks import LRScheduler
from sklearn.utils._param_validation import InvalidParameterError
from torch.optim.lr_scheduler import StepLR

import hydrattr.hydra as hydra_module
from _blobs import bn_dropout_net, three_blobs
from hydrattr import HydraAttributor

pytestmark = pytest.mark.usefixtures("one_thread")

N, N_TEST = 60, 8


@pytest.fixture(scope="module")
def bn_fitted():
    torch.set_num_threads(1)
    X, y = three_blobs(N, 0)
    Xt, yt = three_blobs(N_TEST, 1)
    att = HydraAttributor(bn_dropout_net(), mode="exact", random_state=0, verbose=0)
    att.fit(X, y)
    return att, Xt, yt, att.attribute(Xt, yt)


@pytest.fixture
def swept(monkeypatch):
    """Counts the test-gradient columns the exact sweeps run on."""
    cols = []
    real = hydra_module.exact_adjoint

    def counting(traj, loss_fn, data_fn, test_grads, *a, **k):
        cols.append(test_grads.shape[0])
        return real(traj, loss_fn, data_fn, test_grads, *a, **k)

    monkeypatch.setattr(hydra_module, "exact_adjoint", counting)
    return cols


def test_rank_at_least_n_test_equals_exact_mode(bn_fitted, swept):
    att, Xt, yt, C = bn_fitted
    assert att.rank_ is None and att.truncation_error_ is None
    for rank in (N_TEST, 100):
        C_lr = att.set_params(rank=rank).attribute(Xt, yt)
        assert att.rank_ == N_TEST
        assert att.truncation_error_ < 1e-14
        assert att.truncation_error_per_test_.shape == (N_TEST,)
        # float64 module: the sweep on the basis rounds differently, nothing else
        np.testing.assert_allclose(C_lr, C, rtol=1e-9, atol=1e-11 * np.abs(C).max())
    att.set_params(rank=None)
    assert swept == [N_TEST, N_TEST]


def test_duplicated_test_points_cost_only_their_span(bn_fitted, swept):
    att, Xt, yt, C = bn_fitted
    k = 3
    pick = np.array([0, 1, 2, 1, 0, 2, 2, 0, 1])  # 9 test points, 3 distinct
    for rank in (k, 0.999999, 50):
        C_lr = att.set_params(rank=rank).attribute(Xt[pick], yt[pick])
        assert att.rank_ == k
        np.testing.assert_allclose(C_lr, C[:, pick], rtol=1e-9, atol=1e-11 * np.abs(C).max())
    att.set_params(rank=None)
    assert swept == [k, k, k]


def test_mean_objective_and_truncation_on_batchnorm_net(bn_fitted):
    att, Xt, yt, C = bn_fitted
    Cm = att.set_params(rank=1).attribute(Xt, yt, objective="mean")
    np.testing.assert_allclose(Cm[:, 0], C.mean(axis=1), rtol=1e-9,
                               atol=1e-11 * np.abs(C).max())
    assert att.rank_ == 1 and att.truncation_error_ < 1e-14
    C2 = att.set_params(rank=2).attribute(Xt, yt)
    att.set_params(rank=None)
    assert att.rank_ == 2 and 0 < att.truncation_error_ < 1
    assert np.all(np.isfinite(C2)) and not np.allclose(C2, C)
    # the per-test errors sum to the total in proportion to each gradient's energy
    assert att.truncation_error_per_test_.max() >= att.truncation_error_


class _LinearRegression(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d, 1, dtype=torch.float64)

    def forward(self, x):
        return self.lin(x).squeeze(-1)


def _least_squares_map(att, X, y):
    """The sweep's map ``A`` for ``loss = (x.w + b - y)^2``: ``dtheta_T / d multiplier_i``
    (n, P), by an independent float64 recurrence of torch's SGD (momentum, dampening,
    weight decay, the recorded batches and learning rates) with ``H`` in closed form."""
    traj, hyper = att.trajectory_, att.trajectory_.hyper
    theta = traj.theta(0).numpy().astype(np.float64)
    Z = np.hstack([X, np.ones((len(X), 1))])
    dth = np.zeros((len(X), theta.size))
    dv = np.zeros_like(dth)
    v = None
    for t in range(len(traj)):
        idx, w = traj.indices[t], traj.weights[t]
        lr, mom = float(hyper.lr[t, 0]), float(hyper.momentum[t, 0])
        damp, wd = float(hyper.dampening[t, 0]), float(hyper.weight_decay[t, 0])
        zb, r = Z[idx], Z[idx] @ theta - y[idx]
        g = 2 * w * (r[:, None] * zb).sum(0)
        dg = dth @ (2 * w * zb.T @ zb).T
        dg[idx] += 2 * w * r[:, None] * zb
        d, dd = g + wd * theta, dg + wd * dth
        if bool(hyper.first[t, 0]):
            v, dv = d.copy(), dd.copy()
        else:
            v, dv = mom * v + (1 - damp) * d, mom * dv + (1 - damp) * dd
        theta, dth = theta - lr * v, dth - lr * dv
    return dth, theta


def test_truncated_rank_is_the_projected_sweep_on_least_squares():
    d = 6
    rs = np.random.RandomState(5)
    X, Xt = rs.randn(30, d), rs.randn(10, d)
    wtrue = rs.randn(d)
    y, yt = X @ wtrue + 0.3 * rs.randn(30), Xt @ wtrue + 0.3 * rs.randn(10)
    net = NeuralNet(_LinearRegression, module__d=d, criterion=torch.nn.MSELoss,
                    optimizer=torch.optim.SGD, lr=0.05, optimizer__momentum=0.8,
                    optimizer__dampening=0.2, optimizer__weight_decay=1e-2, batch_size=8,
                    max_epochs=3, train_split=None, verbose=0, iterator_train__shuffle=True,
                    callbacks=[("lr", LRScheduler(StepLR, step_size=1, gamma=0.5))])
    att = HydraAttributor(net, mode="exact", random_state=0, verbose=0).fit(X, y)
    C = att.attribute(Xt, yt)
    A, theta = _least_squares_map(att, X, y)
    Zt = np.hstack([Xt, np.ones((len(Xt), 1))])
    G = 2 * (Zt @ theta - yt)[:, None] * Zt          # (10, 7): rank 7 < 10 test points
    np.testing.assert_allclose(C, -A @ G.T, rtol=1e-9, atol=1e-12 * np.abs(C).max())
    # the basis is of the test gradients scaled to unit norm (every test point alike)
    _, s, Vt = np.linalg.svd(G / np.linalg.norm(G, axis=1, keepdims=True),
                             full_matrices=False)
    norm_A = np.linalg.norm(A, 2)
    for r in (1, 3, 5, 7):
        C_r = att.set_params(rank=r).attribute(Xt, yt)
        assert att.rank_ == r
        Pi = Vt[:r].T @ Vt[:r]
        np.testing.assert_allclose(C_r, -A @ (G @ Pi).T, rtol=1e-9,
                                   atol=1e-12 * np.abs(C).max())
        discarded = (s[r:] ** 2).sum() / (s ** 2).sum()
        assert abs(att.truncation_error_ - discarded) <= 1e-10 * discarded + 1e-14
        # column j is off by A e_j: within ||A||_2 ||e_j||
        e = np.sqrt(att.truncation_error_per_test_ * (G ** 2).sum(1))
        err = np.linalg.norm(C_r - C, axis=0)
        assert np.all(err <= norm_A * e * (1 + 1e-8) + 1e-12 * np.abs(C).max())
        if r < 7:
            assert err.max() > 1e-6 * np.abs(C).max()  # the truncation shows
    # r = 7 spans every test gradient: exact mode's C
    np.testing.assert_allclose(C_r, C, rtol=1e-9, atol=1e-12 * np.abs(C).max())


@pytest.mark.parametrize("rank", [0, -1, 1.0, 0.0, 1.5, "8"])
def test_bad_rank_is_refused(rank):
    att = HydraAttributor(bn_dropout_net(), mode="exact", rank=rank, verbose=0)
    with pytest.raises(InvalidParameterError, match="'rank' parameter"):
        att.fit(*three_blobs(20, 0))


def test_bool_rank_and_rank_with_fast_mode_are_refused(bn_fitted):
    X, y = three_blobs(20, 0)
    with pytest.raises(InvalidParameterError, match="'rank' parameter .* not a bool"):
        HydraAttributor(bn_dropout_net(), mode="exact", rank=True, verbose=0).fit(X, y)
    with pytest.raises(ValueError, match="rank=4 applies only with mode='exact'"):
        HydraAttributor(bn_dropout_net(), mode="fast", rank=4, verbose=0).fit(X, y)
    att, Xt, yt, _ = bn_fitted  # switched to fast mode after fit: refused at attribute
    att.set_params(mode="fast", rank=4)
    try:
        with pytest.raises(ValueError, match="applies only with mode='exact'"):
            att.attribute(Xt, yt)
    finally:
        att.set_params(mode="exact", rank=None)
