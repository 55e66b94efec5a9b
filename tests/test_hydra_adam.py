"""HydraAttributor with torch.optim.Adam / AdamW (float64, tiny MLP).

Ground truths:

1. Exact mode equals central finite differences of ``replay_training`` (the recorded run
   re-trained with sample ``i``'s loss weighted ``1 +- h``): ``C[i, j] = -d loss_j / d w_i``.
   Tolerance 1e-6 relative (observed ~1e-9: the O(h^2) truncation error with h = 1e-5
   and float64 rounding in the differences).
2. The replayed Adam primal reproduces skorch's training: the recorder's final weights
   equal a plain ``net.fit`` with the same seed (bitwise, training is untouched), and
   ``replay_training`` reproduces them to 1e-12 (float64; same operations in another order).
3. Fast mode is by definition the Hessian-free adjoint: it equals ``exact_adjoint`` with
   ``hessian=False`` (1e-10), computed by a different code path (per-coordinate
   coefficients accumulated into the per-sample store vs. one sweep per test block).
   Its documented difference from exact mode: the Hessian terms only; on this problem
   the columns correlate > 0.99 (asserted > 0.95).
4. A step algebra passed to the sweeps (``steps=``): Adam with its preconditioner held
   constant (``steps_for(traj, freeze_preconditioner=True)``) gives the same ``D`` by
   the adjoint and by the forward recurrence (1e-10), and another ``D`` than the default.
"""
import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier
from skorch.callbacks import LRScheduler
from torch.optim.lr_scheduler import StepLR

from hydrattr import HydraAttributor
from hydrattr._core.replay import replay_training
from hydrattr._core.steps import steps_for
from hydrattr._core.sweep import exact_adjoint, exact_forward
from hydrattr._skorch import flat_params, module_mode
from hydrattr.models import MLP

N, D, K = 48, 5, 3


def _data(n=N, seed=0):
    rs = np.random.RandomState(seed)
    X = rs.randn(n, D)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1).astype(np.int64)
    return X, y


CONFIGS = {
    # Adam, coupled weight decay, two param groups (biases without decay)
    "adam": dict(optimizer=torch.optim.Adam, lr=0.02, optimizer__weight_decay=1e-2,
                 optimizer__betas=(0.9, 0.99),
                 optimizer__param_groups=[("*bias", {"weight_decay": 0.0, "lr": 0.01})]),
    # AdamW, decoupled weight decay, a step LR schedule
    "adamw": dict(optimizer=torch.optim.AdamW, lr=0.02, optimizer__weight_decay=0.1,
                  optimizer__eps=1e-6,
                  callbacks=[("sched", LRScheduler(StepLR, step_size=1, gamma=0.5))]),
}


def _net(kind, **kw):
    params = dict(module=MLP, module__n_features=D, module__n_classes=K, module__hidden=(6,),
                  module__activation="tanh", module__dtype=torch.float64,
                  criterion=torch.nn.CrossEntropyLoss, batch_size=16, max_epochs=3,
                  train_split=None, verbose=0)
    params.update(CONFIGS[kind])
    params.update(kw)
    return NeuralNetClassifier(**params)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def fitted(request):
    X, y = _data()
    att = HydraAttributor(_net(request.param), mode="exact", random_state=0, verbose=0)
    att.fit(X, y)
    Xt, yt = X[:3] + 0.1, y[:3]
    return request.param, att, X, y, Xt, yt, att.attribute(Xt, yt)


def test_exact_matches_finite_differences(fitted):
    _, att, X, y, Xt, yt, C = fitted
    loss_fn, data_fn = att._loss_fn(), att._data_fn()
    xt, ytt = torch.as_tensor(Xt), torch.as_tensor(yt)
    h = 1e-5
    for i in (0, 17, 40):
        losses = []
        for sign in (1, -1):
            mult = np.ones(N)
            mult[i] = 1 + sign * h
            with module_mode(att.net_.module_, training=True):
                theta = replay_training(att.trajectory_, loss_fn, data_fn, multipliers=mult)
            with module_mode(att.net_.module_, training=False):
                losses.append(loss_fn(theta, xt, ytt).detach().numpy())
        fd = -(losses[0] - losses[1]) / (2 * h)
        np.testing.assert_allclose(C[i], fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())


def test_recorded_training_is_skorch_training_and_replay_reproduces_it(fitted):
    kind, att, X, y, *_ = fitted
    torch.manual_seed(0)
    plain = _net(kind).fit(X, y)
    theta_T = flat_params(att.net_, att.spec_)
    assert torch.equal(flat_params(plain, att.spec_), theta_T)
    with module_mode(att.net_.module_, training=True):
        theta = replay_training(att.trajectory_, att._loss_fn(), att._data_fn())
    np.testing.assert_allclose(theta.numpy(), theta_T.numpy(), rtol=1e-12, atol=1e-14)
    hyper = att.trajectory_.hyper
    assert hyper.step[0].tolist() == [1.0] * hyper.step.shape[1]  # bias-correction count
    assert bool(hyper.decoupled.all()) == (kind == "adamw")
    if kind == "adam":  # two groups: biases without decay at half the learning rate
        assert sorted(hyper.weight_decay[0].tolist()) == [0.0, 1e-2]
        assert sorted(hyper.lr[0].tolist()) == [0.01, 0.02]
    else:  # StepLR halves the rate every epoch (3 batches of 16)
        assert hyper.lr[:, 0].tolist() == [0.02] * 3 + [0.01] * 3 + [0.005] * 3


def test_forward_recurrence_equals_adjoint(fitted):
    _, att, X, y, Xt, yt, C = fitted
    rows = [2, 30]
    np.testing.assert_allclose(att.attribute_forward(Xt, yt, rows), C[rows], rtol=1e-9,
                               atol=1e-12)


def test_fast_mode_is_the_hessian_free_adjoint(fitted):
    kind, att, X, y, Xt, yt, C = fitted
    fast = HydraAttributor(_net(kind), mode="fast", random_state=0, verbose=0).fit(X, y)
    C_fast = fast.attribute(Xt, yt)
    replay = HydraAttributor(_net(kind), mode="fast", storage="replay", random_state=0,
                             verbose=0).fit(X, y)
    np.testing.assert_allclose(replay.attribute(Xt, yt), C_fast, rtol=1e-10, atol=1e-14)
    G = att._test_grads(torch.as_tensor(Xt), torch.as_tensor(yt), "per_sample")
    rows_map = np.arange(N)
    with module_mode(att.net_.module_, training=True):
        D_nohess = exact_adjoint(att.trajectory_, att._loss_fn(), att._data_fn(), G,
                                 rows_map, N, hessian=False)
    np.testing.assert_allclose(C_fast, -D_nohess.numpy(), rtol=1e-10, atol=1e-14)
    # the documented gap to exact mode: Hessian terms only
    for j in range(C.shape[1]):
        assert np.corrcoef(C[:, j], C_fast[:, j])[0, 1] > 0.95


def test_sweeps_take_a_step_algebra(fitted):
    _, att, X, y, Xt, yt, C = fitted
    traj, loss_fn, data_fn = att.trajectory_, att._loss_fn(), att._data_fn()
    G = att._test_grads(torch.as_tensor(Xt), torch.as_tensor(yt), "per_sample")
    rows = [2, 30]
    args = (traj, loss_fn, data_fn, G, np.arange(N), N)
    with module_mode(att.net_.module_, training=True):
        default = exact_adjoint(*args, hessian=False)
        same = exact_adjoint(*args, hessian=False, steps=steps_for(traj))
        frozen = exact_adjoint(*args, hessian=False,
                               steps=steps_for(traj, freeze_preconditioner=True))
        tangents = exact_forward(traj, loss_fn, data_fn, rows, hessian=False,
                                 steps=steps_for(traj, freeze_preconditioner=True))
        with pytest.raises(ValueError, match="steps: expected the step algebra of this"):
            exact_adjoint(*args, steps=steps_for(traj.head(3)))
    torch.testing.assert_close(same, default, rtol=0, atol=0)
    np.testing.assert_allclose(frozen[rows].numpy(), (tangents @ G.T).numpy(), rtol=1e-10,
                               atol=1e-12 * frozen.abs().max().item())
    assert (frozen - default).abs().max() > 1e-3 * default.abs().max()


def test_unsupported_optimizer_settings_are_named():
    X, y = _data(32)
    with pytest.raises(ValueError, match="amsgrad"):
        HydraAttributor(_net("adam", optimizer__amsgrad=True), verbose=0).fit(X, y)
    with pytest.raises(ValueError, match="maximize"):
        HydraAttributor(_net("adamw", optimizer__maximize=True), verbose=0).fit(X, y)
    with pytest.raises(TypeError, match="net.optimizer.*RMSprop"):
        HydraAttributor(_net("adamw", optimizer=torch.optim.RMSprop), verbose=0).fit(X, y)
