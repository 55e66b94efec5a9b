"""HydraAttributor(last_epochs=k): the hypergradient truncated to the last k epochs.

Sample weights act only in the steps of the last ``k`` epochs. Checked against:

1. central finite differences of deterministic retraining in which the loss multipliers
   apply only from the window's first step on (float64 MLP with BatchNorm, dropout,
   momentum, weight decay and a StepLR schedule), exact mode, to 1e-6 relative;
2. the closed-form least-squares recurrence with the injection started at the window
   (``test_hydra_exact.py``, parametrized over ``last_epochs``);
3. its own paths: dense store, replay and the forward recurrence agree in fast mode; the
   windows of all epochs add up to the whole run in fast mode (fast contributions are a
   sum over steps); ``last_epochs`` of at least the number of epochs is the whole run.
"""
import numpy as np
import pytest
import torch
from skorch.callbacks import LRScheduler
from torch.optim.lr_scheduler import MultiStepLR, StepLR

from hydrattr import HydraAttributor
from hydrattr._core.replay import replay_training
from hydrattr._core.running_stats import BatchNormStats
from hydrattr._skorch import module_mode

from _blobs import bn_dropout_net, three_blobs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

N, N_TEST, EPOCHS, BATCH = 60, 5, 3, 20  # bn_dropout_net: batches of 20, 3 epochs


@pytest.fixture(scope="module")
def fitted():
    torch.set_num_threads(1)
    X, y = three_blobs(N, 0)
    Xt, yt = three_blobs(N_TEST, 1)
    att = HydraAttributor(bn_dropout_net(), mode="exact", last_epochs=1, random_state=0, verbose=0)
    att.fit(X, y)
    return att, X, y, Xt, yt


def test_epoch_boundaries_are_recorded(fitted):
    att = fitted[0]
    steps = -(-N // BATCH)
    assert att.trajectory_.epoch_starts == [steps * e for e in range(EPOCHS)]
    assert att.window_start_ == steps * (EPOCHS - 1)


def _losses(att, Xt, yt, multipliers, start):
    bn = BatchNormStats(att.net_.module_)
    loss_fn = att._loss_fn()
    with module_mode(att.net_.module_, training=True):
        theta, R = replay_training(att.trajectory_, loss_fn, att._data_fn(), multipliers,
                                   bn=bn, start=start)
    xt, ytt = att._to_tensors(Xt, yt)
    with module_mode(att.net_.module_, training=False), torch.no_grad():
        return bn.eval_loss(loss_fn)(theta, R, xt, ytt).numpy()


def test_exact_window_equals_finite_differences_of_late_reweighting(fitted):
    att, X, y, Xt, yt = fitted
    C = att.attribute(Xt, yt)
    rows = np.arange(0, N, 6)
    h = 1e-4
    C_fd = np.empty((len(rows), N_TEST))
    for k, i in enumerate(rows):
        m = np.ones(N)
        m[i] = 1 + h
        lp = _losses(att, Xt, yt, m, att.window_start_)
        m[i] = 1 - h
        lm = _losses(att, Xt, yt, m, att.window_start_)
        C_fd[k] = -(lp - lm) / (2 * h)
    # central differences in float64: truncation O(h^2) ~ 1e-8 relative, rounding ~ 1e-12
    # absolute, so 1e-6 relative (1e-12 floor) has margin yet fails on any missing term
    err = np.abs(C[rows] - C_fd)
    assert np.all(err <= 1e-6 * np.abs(C_fd) + 1e-12), (err / np.abs(C_fd)).max()
    # the test can fail: the whole run's derivative is a different quantity here
    C_all = att.set_params(last_epochs=None).attribute(Xt, yt)
    att.set_params(last_epochs=1)
    assert np.abs(C_all[rows] - C_fd).max() > 0.1 * np.abs(C_fd).max()


def test_exact_window_forward_recurrence_equals_adjoint(fitted):
    att, X, y, Xt, yt = fitted
    rows = np.array([1, 17, 59])
    np.testing.assert_allclose(att.attribute_forward(Xt, yt, rows), att.attribute(Xt, yt)[rows],
                               rtol=1e-10, atol=1e-14)


def test_fast_windows_add_up_to_the_whole_run():
    X, y = three_blobs(N, 0)
    Xt, yt = three_blobs(N_TEST, 1)
    att = HydraAttributor(bn_dropout_net(), storage="replay", random_state=0, verbose=0).fit(X, y)
    C_all = att.attribute(Xt, yt)
    windows = [att.set_params(last_epochs=k).attribute(Xt, yt) for k in range(1, EPOCHS + 2)]
    # fast mode's contributions are a sum over steps (coefficients fixed by the whole run):
    # the last k epochs' window minus the last k-1's is epoch E-k+1's share; rounding only
    np.testing.assert_allclose(windows[EPOCHS - 1], C_all, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(windows[EPOCHS], windows[EPOCHS - 1])  # k > E: whole run
    assert np.abs(windows[0] - C_all).max() > 0.05 * np.abs(C_all).max()
    # and against the forward recurrence without the Hessian, a separate code path
    rows = np.array([0, 30, 59])
    att.set_params(last_epochs=2)
    np.testing.assert_allclose(att.attribute_forward(Xt, yt, rows, hessian=False),
                               windows[1][rows], rtol=1e-10, atol=1e-14)


def test_fast_store_is_filled_for_the_window_and_keeps_it():
    X, y = three_blobs(N, 0)
    Xt, yt = three_blobs(N_TEST, 1)
    dense = HydraAttributor(bn_dropout_net(), last_epochs=2, random_state=0, verbose=0).fit(X, y)
    replay = HydraAttributor(bn_dropout_net(), storage="replay", last_epochs=2, random_state=0,
                             verbose=0).fit(X, y)
    # same training (same seed), two code paths: store at fit vs replay at attribute
    np.testing.assert_allclose(dense.attribute(Xt, yt), replay.attribute(Xt, yt),
                               rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="last_epochs=None.*last_epochs=2.*storage='replay'"):
        dense.set_params(last_epochs=None).attribute(Xt, yt)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", "final"])
def test_bad_last_epochs_is_named(bad):
    X, y = three_blobs(N, 0)
    with pytest.raises(ValueError, match="'last_epochs' parameter of HydraAttributor must be"):
        HydraAttributor(bn_dropout_net(max_epochs=1), last_epochs=bad, verbose=0).fit(X, y)


@pytest.mark.parametrize("schedule, expected", [
    # StepLR(step_size=2) over 5 epochs: rates change at epochs 2 and 4 -> the last epoch
    ((StepLR, dict(step_size=2, gamma=0.5)), 4),
    # a drop after epoch 1 only (MultiStepLR): epochs 1..4
    ((MultiStepLR, dict(milestones=[1], gamma=0.1)), 1),
    (None, 0),  # constant rate: the whole run
])
def test_final_lr_window_starts_at_the_last_rate_change(schedule, expected):
    X, y = three_blobs(N, 0)
    callbacks = [] if schedule is None else [("lr", LRScheduler(schedule[0], **schedule[1]))]
    att = HydraAttributor(bn_dropout_net(max_epochs=5, callbacks=callbacks), storage="replay",
                          last_epochs="final_lr", random_state=0, verbose=0).fit(X, y)
    steps = -(-N // BATCH)
    assert att.window_start_ == steps * expected
    lr = att.trajectory_.hyper.lr[:, 0].numpy()
    # the window is one constant rate, and the step before it (if any) had another
    assert np.all(lr[att.window_start_:] == lr[-1])
    if expected:
        assert lr[att.window_start_ - 1] != lr[-1]


def test_adam_window_exact_equals_finite_differences_and_fast_paths_agree():
    # Adam's fast coefficients are computed last step first; the window must cut that
    # backward pass at its start, and exact mode must differentiate the moments from there
    X, y = three_blobs(N, 0)
    Xt, yt = three_blobs(N_TEST, 1)
    net = bn_dropout_net(momentum=None, optimizer=torch.optim.Adam, lr=0.01,
                         optimizer__weight_decay=1e-3, module__dropout=0.0,
                         module__batchnorm=False, callbacks=[])
    for k in (1, 2):
        att = HydraAttributor(net, mode="exact", last_epochs=k, random_state=0,
                              verbose=0).fit(X, y)
        C = att.attribute(Xt, yt)
        loss_fn, data_fn = att._loss_fn(), att._data_fn()
        xt, ytt = att._to_tensors(Xt, yt)
        rows, h = np.array([3, 33, 50]), 1e-5
        C_fd = np.empty((len(rows), N_TEST))
        for r, i in enumerate(rows):
            losses = []
            for sign in (1, -1):
                m = np.ones(N)
                m[i] = 1 + sign * h
                with module_mode(att.net_.module_, training=True):
                    theta = replay_training(att.trajectory_, loss_fn, data_fn, m,
                                            start=att.window_start_)
                with module_mode(att.net_.module_, training=False), torch.no_grad():
                    losses.append(loss_fn(theta, xt, ytt).numpy())
            C_fd[r] = -(losses[0] - losses[1]) / (2 * h)
        # float64 central differences (Adam's sqrt(v) is smooth away from v = 0): 1e-5
        np.testing.assert_allclose(C[rows], C_fd, rtol=1e-5, atol=1e-10)
        # fast mode: the backward coefficient pass (replay) against the forward
        # recurrence without the Hessian, which starts at the window
        att.set_params(mode="fast", storage="replay")
        np.testing.assert_allclose(att.attribute(Xt, yt)[rows],
                                   att.attribute_forward(Xt, yt, rows, hessian=False),
                                   rtol=1e-9, atol=1e-13)
