"""HydraAttributor(mode="exact") against finite differences, closed forms and its twin paths.

1. Float64 MLP with BatchNorm and dropout (100 samples, momentum, weight decay, StepLR):
   exact C equals central finite differences of deterministic retraining (replay with
   eps_i = +-h, same batches and dropout masks, BatchNorm running statistics replayed
   too) for every sample and test point, to 1e-6 relative.
2. The forward (paper) recurrence and the adjoint sweep agree to rounding.
3. Fast mode differs from exact by the Hessian term only: equal when the loss is linear
   in the parameters (H = 0); on least squares (H known in closed form) exact and fast
   equal an independent numpy recurrence with and without H.
"""
import numpy as np
import pytest
import torch
from skorch import NeuralNet, NeuralNetClassifier
from skorch.callbacks import LRScheduler
from torch.optim.lr_scheduler import StepLR

from hydrattr import HydraAttributor
from hydrattr._core.replay import replay_training
from hydrattr._core.running_stats import BatchNormStats
from hydrattr._core.sweep import exact_adjoint
from hydrattr._skorch import module_mode

N, D, K, N_TEST = 100, 4, 3, 8


from _blobs import bn_dropout_net, three_blobs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n, seed):
    return three_blobs(n, seed)


@pytest.fixture(scope="module")
def bn_fitted():
    torch.set_num_threads(1)
    X, y = _data(N, 0)
    Xt, yt = _data(N_TEST, 1)
    att = HydraAttributor(bn_dropout_net(), mode="exact", random_state=0, verbose=0)
    att.fit(X, y)
    return att, X, y, Xt, yt, att.attribute(Xt, yt)


def _replayed_test_losses(att, Xt, yt, multipliers):
    """Eval-mode test losses after replaying training with per-row loss multipliers."""
    bn = BatchNormStats(att.net_.module_)
    loss_fn = att._loss_fn()
    with module_mode(att.net_.module_, training=True):
        theta, R = replay_training(att.trajectory_, loss_fn, att._data_fn(), multipliers,
                                   bn=bn)
    xt, ytt = att._to_tensors(Xt, yt)
    with module_mode(att.net_.module_, training=False), torch.no_grad():
        return bn.eval_loss(loss_fn)(theta, R, xt, ytt).numpy()


def test_exact_equals_central_finite_differences_every_entry(bn_fitted):
    att, X, y, Xt, yt, C = bn_fitted
    assert np.all(np.isfinite(C))
    # sample i's loss multiplier is 1 + N eps_i; C = -(1/N) dL/deps = -dL/d(multiplier)
    h = 1e-4
    C_fd = np.empty_like(C)
    for i in range(N):
        m = np.ones(N)
        m[i] = 1 + h
        lp = _replayed_test_losses(att, Xt, yt, m)
        m[i] = 1 - h
        lm = _replayed_test_losses(att, Xt, yt, m)
        C_fd[i] = -(lp - lm) / (2 * h)
    # central differences: truncation O(h^2) ~ 1e-8 relative, rounding ~ 1e-16 / h ~
    # 1e-12 absolute (smallest |C| here is ~1e-6), so 1e-6 relative per entry (with a
    # 1e-12 absolute floor for rounding) leaves a wide margin yet fails on any missing term
    err = np.abs(C - C_fd)
    assert np.all(err <= 1e-6 * np.abs(C_fd) + 1e-12), (err / np.abs(C_fd)).max()

    # the test can fail: holding BatchNorm running statistics fixed (dropping the path
    # eps -> theta_t -> batch statistics -> running statistics) misses the FD by far more
    G = att._test_grads(*att._to_tensors(Xt, yt), "per_sample")
    with module_mode(att.net_.module_, training=True):
        D_fixed = exact_adjoint(att.trajectory_, att._loss_fn(), att._data_fn(), G,
                                np.arange(N), N)
    rel_fixed = np.abs(-D_fixed.numpy() - C_fd).max() / np.abs(C_fd).max()
    assert rel_fixed > 1e-3, rel_fixed


def test_forward_recurrence_equals_adjoint(bn_fitted):
    att, X, y, Xt, yt, C = bn_fitted
    rows = np.array([0, 7, 42, 99])
    C_fwd = att.attribute_forward(Xt, yt, rows)
    # same derivative, evaluated in the opposite order: rounding only (float64)
    np.testing.assert_allclose(C_fwd, C[rows], rtol=1e-10, atol=1e-13 * np.abs(C).max())


@pytest.mark.parametrize("test_batch_size", [256, 3])
def test_mean_objective_is_mean_of_columns(bn_fitted, test_batch_size):
    att, X, y, Xt, yt, C = bn_fitted
    # test_batch_size=3 < N_TEST: the mean test gradient is summed over test batches
    Cm = att.set_params(test_batch_size=test_batch_size).attribute(Xt, yt, objective="mean")
    att.set_params(test_batch_size=256)
    assert Cm.shape == (N, 1)
    # one sweep with the averaged test gradient vs averaging columns: linear, rounding only
    np.testing.assert_allclose(Cm[:, 0], C.mean(axis=1), rtol=1e-10,
                               atol=1e-13 * np.abs(C).max())


def test_auto_sweep_blocks_give_the_same_C(bn_fitted, monkeypatch):
    """test_batch_size="auto" splits exact mode's sweep by adjoint entries; with the
    budget cut to 3 columns' worth (and the floor of 8 columns lowered) the 8 test points
    take 3 sweeps (blocks of 3, 3, 2) and C is the
    one-sweep C to float64 rounding (each column's sweep is independent of the others)."""
    att, X, y, Xt, yt, C = bn_fitted
    n_params = att.spec_.n_params
    monkeypatch.setattr(HydraAttributor, "EXACT_SWEEP_ENTRIES", 3 * n_params)
    monkeypatch.setattr(HydraAttributor, "EXACT_SWEEP_MIN", 1)
    att.set_params(test_batch_size="auto")
    assert att._sweep_bs(n_params) == 3
    blocks = [b.shape[0] for b in att._blocks(torch.zeros(N_TEST, n_params))]
    C_auto = att.attribute(Xt, yt)
    monkeypatch.undo()
    assert blocks == [3, 3, 2]
    np.testing.assert_allclose(C_auto, C, rtol=1e-10, atol=1e-13 * np.abs(C).max())
    assert att._sweep_bs(n_params) == min(256, max(8, 4_000_000 // n_params))


def test_sweep_block_sizes(bn_fitted, monkeypatch):
    """"auto": 4e6 adjoint entries per sweep on the CPU (8 to 256 columns), 256 on another
    device and in fast mode; an int is used as given."""
    att = bn_fitted[0]
    try:
        att.set_params(test_batch_size="auto")
        assert att._sweep_bs(10**6) == 8 and att._sweep_bs(10**3) == 256
        assert att._sweep_bs(50_000) == 80
        monkeypatch.setattr(HydraAttributor, "_device", property(
            lambda self: torch.device("meta")))
        assert att._sweep_bs(50_000) == 256
        monkeypatch.undo()
        att.set_params(mode="fast")
        assert att._sweep_bs(50_000) == 256 and att._test_bs() == 256
        att.set_params(mode="exact", test_batch_size=5)
        assert att._sweep_bs(50_000) == 5 and att._test_bs() == 5
    finally:
        att.set_params(mode="exact", test_batch_size="auto")


class _LinearLoss(torch.nn.Module):
    """``-logit of the true class``: linear in the logits, so in a linear model's parameters."""

    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, y_pred, y):
        loss = -y_pred.gather(1, y.view(-1, 1)).squeeze(1)
        if self.reduction == "mean":
            return loss.mean()
        return loss.sum() if self.reduction == "sum" else loss


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D, K, dtype=torch.float64)

    def forward(self, x):
        return self.lin(x)


def test_fast_equals_exact_when_loss_is_linear_in_parameters():
    X, y = _data(40, 2)
    Xt, yt = _data(5, 3)
    net = NeuralNetClassifier(_Linear, criterion=_LinearLoss, optimizer=torch.optim.SGD,
                              lr=0.05, optimizer__momentum=0.9, optimizer__dampening=0.1,
                              optimizer__weight_decay=1e-2, batch_size=10, max_epochs=3,
                              train_split=None, verbose=0, iterator_train__shuffle=True,
                              callbacks=[("lr", LRScheduler(StepLR, step_size=1, gamma=0.5))])
    C = {mode: HydraAttributor(net, mode=mode, random_state=0, verbose=0).fit(X, y)
         .attribute(Xt, yt) for mode in ("fast", "exact")}
    # H = 0 on every batch: the Hessian term, the only difference, vanishes (rounding)
    np.testing.assert_allclose(C["exact"], C["fast"], rtol=1e-10,
                               atol=1e-13 * np.abs(C["fast"]).max())
    assert np.abs(C["fast"]).max() > 1e-4


class _LinearRegression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D, 1, dtype=torch.float64)

    def forward(self, x):
        return self.lin(x).squeeze(-1)


def _numpy_least_squares_C(att, X, y, Xt, yt, hessian, start=0):
    """Independent float64 recurrence for ``loss = (x.w + b - y)^2`` with torch SGD rules.

    Simulates training from the recorded start, batches and learning rates, with the
    Hessian ``H_t = 2 sum_k w_t z_k z_k^T`` (z = [x, 1]) known in closed form. The sample
    weights act from step ``start`` on (``last_epochs``).
    """
    traj = att.trajectory_
    hyper = traj.hyper
    theta = traj.theta(0).numpy().astype(np.float64)  # [w (1 x D), b]
    Z = np.hstack([X, np.ones((len(X), 1))])
    Zt = np.hstack([Xt, np.ones((len(Xt), 1))])
    n = len(X)
    dth = np.zeros((n, theta.size))  # d theta / d (multiplier of sample i)
    dv = np.zeros_like(dth)
    v = None
    for t in range(len(traj)):
        idx = traj.indices[t]
        w = traj.weights[t]
        lr, mom = float(hyper.lr[t, 0]), float(hyper.momentum[t, 0])
        damp, wd = float(hyper.dampening[t, 0]), float(hyper.weight_decay[t, 0])
        first = bool(hyper.first[t, 0])
        zb, yb = Z[idx], y[idx]
        r = zb @ theta - yb
        g = 2 * w * (r[:, None] * zb).sum(0)
        H = 2 * w * zb.T @ zb
        dg = dth @ H.T if hessian else np.zeros_like(dth)
        if t >= start:
            dg[idx] += 2 * w * r[:, None] * zb  # injection: the sample's own gradient
        d, dd = g + wd * theta, dg + wd * dth
        if first:
            v, dv = d.copy(), dd.copy()
        else:
            v, dv = mom * v + (1 - damp) * d, mom * dv + (1 - damp) * dd
        theta, dth = theta - lr * v, dth - lr * dv
    Gt = 2 * (Zt @ theta - yt)[:, None] * Zt  # test-loss gradients
    return -dth @ Gt.T


@pytest.mark.parametrize("last_epochs", [None, 1, 2])
def test_exact_and_fast_match_closed_form_least_squares_recurrence(last_epochs):
    rs = np.random.RandomState(5)
    X, Xt = rs.randn(30, D), rs.randn(4, D)
    wtrue = rs.randn(D)
    y, yt = X @ wtrue + 0.3 * rs.randn(30), Xt @ wtrue + 0.3 * rs.randn(4)
    # 1-d predictions and targets: (x.w + b - y)^2 per sample, no broadcasting
    net = NeuralNet(_LinearRegression, criterion=torch.nn.MSELoss, optimizer=torch.optim.SGD,
                    lr=0.05, optimizer__momentum=0.8, optimizer__dampening=0.2,
                    optimizer__weight_decay=1e-2, batch_size=8, max_epochs=3,
                    train_split=None, verbose=0, iterator_train__shuffle=True,
                    callbacks=[("lr", LRScheduler(StepLR, step_size=1, gamma=0.5))])
    # 30 rows in batches of 8: 4 steps per epoch, so the last k of 3 epochs start at 4 (3 - k)
    start = 0 if last_epochs is None else 4 * (3 - last_epochs)
    out = {}
    for mode in ("exact", "fast"):
        att = HydraAttributor(net, mode=mode, storage="replay", last_epochs=last_epochs,
                              random_state=0, verbose=0)
        att.fit(X, y)
        out[mode] = att.attribute(Xt, yt)
        ref = _numpy_least_squares_C(att, X, y, Xt, yt, hessian=(mode == "exact"),
                                     start=start)
        # independent float64 code, same math: rounding only
        np.testing.assert_allclose(out[mode], ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())
    # and the Hessian term is not negligible here, so the comparison separates the modes
    assert np.linalg.norm(out["exact"] - out["fast"]) > 1e-2 * np.linalg.norm(out["exact"])
