"""LeaveOneOutAttributor: the finite version of HYDRA's derivative, and plain retraining.

1. order="same" vs exact HYDRA as the learning rate shrinks (BatchNorm + dropout MLP):
   C_loo = C_exact + O(lr^2) while C_exact = O(lr), so the relative error
   e(lr) = ||C_loo - C_exact||_F / ||C_exact||_F is O(lr): e(lr/4) / e(lr) must be near
   1/4 (we require < 0.35) and e at the small lr below 1%.
2. order="same" equals an independent same-order replay with the row's multiplier 0.
3. Parallel backends (threading, dask.distributed LocalCluster) give bit-identical C.
4. reshuffle / warm start on a convex problem: the contract's sign (a mislabelled copy of
   a test point hurts it, a correctly labelled copy helps) and correlation with exact.
"""
import numpy as np
import pytest
import torch
from joblib import parallel_config
from skorch import NeuralNetClassifier
from skorch.callbacks import LRScheduler
from torch.optim.lr_scheduler import StepLR

from hydrattr import HydraAttributor, LeaveOneOutAttributor
from hydrattr._core.replay import replay_training
from hydrattr._core.running_stats import BatchNormStats
from hydrattr._skorch import module_mode
from hydrattr.models import MLP, LogisticRegression

D, K = 4, 3


from _blobs import three_blobs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n, seed):
    return three_blobs(n, seed)


def _mlp_net(lr=0.05, **kw):
    params = dict(module=MLP, module__n_features=D, module__n_classes=K, module__hidden=(8,),
                  module__activation="tanh", module__dropout=0.2, module__batchnorm=True,
                  module__dtype=torch.float64, criterion=torch.nn.CrossEntropyLoss,
                  optimizer=torch.optim.SGD, lr=lr, optimizer__momentum=0.9,
                  optimizer__weight_decay=1e-3, batch_size=20, max_epochs=3,
                  train_split=None, verbose=0, iterator_train__shuffle=True,
                  callbacks=[("lr", LRScheduler(StepLR, step_size=1, gamma=0.5))])
    params.update(kw)
    return NeuralNetClassifier(**params)


def test_same_order_matches_exact_to_first_order_in_lr():
    X, y = _data(60, 0)
    Xt, yt = _data(8, 1)
    rows = np.arange(0, 60, 2)
    err = {}
    for lr in (0.025, 0.025 / 4):
        C_ex = HydraAttributor(_mlp_net(lr), mode="exact", random_state=0, verbose=0) \
            .fit(X, y).attribute(Xt, yt)[rows]
        C_loo = LeaveOneOutAttributor(_mlp_net(lr), track=rows, random_state=0, verbose=0) \
            .fit(X, y).attribute(Xt, yt)[rows]
        err[lr] = np.linalg.norm(C_loo - C_ex) / np.linalg.norm(C_ex)
    small, large = err[0.025 / 4], err[0.025]
    # first order: ratio ~ 1/4 (measured 0.22); a wrong sign, scale or missing term
    # (e.g. BatchNorm running statistics) would leave an O(1) relative error instead
    assert small / large < 0.35, err
    assert small < 0.01, err


@pytest.fixture(scope="module")
def same_fitted():
    torch.set_num_threads(1)
    X, y = _data(40, 2)
    Xt, yt = _data(6, 3)
    rows = np.array([3, 11, 17, 29, 35])
    loo = LeaveOneOutAttributor(_mlp_net(), track=rows, random_state=0, verbose=0).fit(X, y)
    return loo, X, y, Xt, yt, rows, loo.attribute(Xt, yt)


def test_same_order_equals_direct_replay_and_contract(same_fitted):
    loo, X, y, Xt, yt, rows, C = same_fitted
    assert C.shape == (40, 6)
    others = np.setdiff1d(np.arange(40), rows)
    assert np.all(np.isnan(C[others])) and np.all(np.isfinite(C[rows]))
    # independent same-order replay on a recorded run (HydraAttributor records the same run)
    ref = HydraAttributor(_mlp_net(), mode="exact", random_state=0, verbose=0).fit(X, y)
    bn = BatchNormStats(ref.net_.module_)
    loss_fn, data_fn = ref._loss_fn(), ref._data_fn()
    xt, ytt = ref._to_tensors(Xt, yt)

    def losses(mult):
        with module_mode(ref.net_.module_, training=True):
            th, R = replay_training(ref.trajectory_, loss_fn, data_fn, mult, bn=bn)
        with module_mode(ref.net_.module_, training=False), torch.no_grad():
            return bn.eval_loss(loss_fn)(th, R, xt, ytt).numpy()

    base = losses(np.ones(40))
    for i in rows[:2]:
        m = np.ones(40)
        m[i] = 0.0
        # same computation through different code: rounding only
        np.testing.assert_allclose(C[i], losses(m) - base, rtol=1e-10, atol=1e-14)
    Cm = loo.attribute(Xt, yt, objective="mean")
    np.testing.assert_allclose(Cm[rows, 0], C[rows].mean(axis=1), rtol=1e-12, atol=1e-15)
    assert np.all(np.isnan(Cm[others]))


def test_threading_backend_is_identical(same_fitted):
    loo, X, y, Xt, yt, rows, C = same_fitted
    with parallel_config(backend="threading"):
        par = LeaveOneOutAttributor(_mlp_net(), track=rows, n_jobs=2, random_state=0,
                                    verbose=0).fit(X, y)
    # dropout replays hold the RNG lock: the same numbers, bit for bit
    np.testing.assert_array_equal(par.attribute(Xt, yt), C)


def test_dask_backend_runs_on_local_cluster(same_fitted):
    distributed = pytest.importorskip(
        "distributed", reason="dask.distributed is not installed (pip install 'dask[distributed]')")
    loo, X, y, Xt, yt, rows, C = same_fitted
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=None) as client:
        with distributed.get_task_stream(client) as ts, parallel_config(backend="dask"):
            par = LeaveOneOutAttributor(_mlp_net(), track=rows, n_jobs=2, random_state=0,
                                        verbose=0).fit(X, y)
        n_tasks = len(ts.data)
    assert n_tasks > 0  # the retrainings ran as dask tasks
    np.testing.assert_array_equal(par.attribute(Xt, yt), C)


def _convex_net(**kw):
    # full-batch GD (batch = n) on L2-regularised logistic regression: retraining
    # without a row has no reshuffling noise, so LOO tracks the exact derivative
    params = dict(module=LogisticRegression, module__n_features=D, module__n_classes=K,
                  module__dtype=torch.float64, criterion=torch.nn.CrossEntropyLoss,
                  optimizer=torch.optim.SGD, lr=0.3, optimizer__momentum=0.5,
                  optimizer__weight_decay=3e-2, batch_size=40, max_epochs=60,
                  train_split=None, verbose=0)
    params.update(kw)
    return NeuralNetClassifier(**params)


@pytest.fixture(scope="module")
def convex():
    torch.set_num_threads(1)
    X, y = _data(40, 1)
    Xt, yt = _data(10, 4)
    X[0], y[0] = Xt[0], (yt[0] + 1) % K  # a mislabelled copy of test point 0
    X[1], y[1] = Xt[1], yt[1]  # a correctly labelled copy of test point 1
    rows = np.r_[0, 1, np.arange(2, 40, 4)]
    C_ex = HydraAttributor(_convex_net(), mode="exact", random_state=0, verbose=0) \
        .fit(X, y).attribute(Xt, yt)[rows]
    return X, y, Xt, yt, rows, C_ex


@pytest.mark.parametrize("order,warm_start", [("reshuffle", False), ("same", True),
                                              ("reshuffle", True)])
def test_retraining_variants_have_the_contract_sign(convex, order, warm_start):
    X, y, Xt, yt, rows, C_ex = convex
    loo = LeaveOneOutAttributor(_convex_net(), track=rows, order=order,
                                warm_start=warm_start, warm_start_epochs=30, random_state=0,
                                verbose=0).fit(X, y)
    C = loo.attribute(Xt, yt)
    assert C[0, 0] < 0 < C[1, 1]  # removing the mislabelled copy helps, the good one hurts
    r = np.corrcoef(C[rows].ravel(), C_ex.ravel())[0, 1]
    assert r > 0.9, r  # measured 0.98 for all three variants


def test_parameter_errors():
    X, y = _data(20, 0)
    for kw, match in [({"order": "random"}, "order"), ({"warm_start_epochs": 0},
                                                       "warm_start_epochs"),
                      ({"track": [1, 1]}, "track"), ({"track": 99}, "track"),
                      ({"n_jobs": 1.5}, "n_jobs")]:
        with pytest.raises(ValueError, match=match):
            LeaveOneOutAttributor(_convex_net(max_epochs=1), verbose=0, **kw).fit(X, y)
    too_many = LeaveOneOutAttributor(_convex_net(max_epochs=1, batch_size=10), warm_start=True,
                                     warm_start_epochs=3, verbose=0)
    with pytest.raises(ValueError, match="warm_start_epochs"):
        too_many.fit(X, y)


def test_indices_is_the_deprecated_name_of_track():
    X, y = _data(20, 0)
    new = LeaveOneOutAttributor(_convex_net(max_epochs=1), track=[2, 5], random_state=0,
                                verbose=0).fit(X, y)
    with pytest.warns(FutureWarning, match="track"):
        old = LeaveOneOutAttributor(_convex_net(max_epochs=1), indices=[2, 5], random_state=0,
                                    verbose=0).fit(X, y)
    np.testing.assert_array_equal(old.rows_, [2, 5])
    with pytest.warns(FutureWarning, match="rows_"):
        np.testing.assert_array_equal(old.indices_, new.rows_)
    np.testing.assert_array_equal(old.attribute(X[:3], y[:3]), new.attribute(X[:3], y[:3]))
    with pytest.raises(ValueError, match="track only"):
        LeaveOneOutAttributor(_convex_net(max_epochs=1), track=[1], indices=[2],
                              verbose=0).fit(X, y)
