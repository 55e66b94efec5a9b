"""HydraAttributor (fast mode) against independent ground truths.

1. A dense, naive float64 implementation of the fast recurrence (per-sample dv and grad
   states, per-sample gradients by plain autograd, torch SGD semantics written out here).
2. Leave-one-out retraining with the same batch order on a small convex problem.
3. Training is unperturbed: identical weights to a plain skorch fit with the same seed.
"""

import os

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from sklearn.base import clone
from skorch import NeuralNetClassifier
from skorch.callbacks import LRScheduler
from torch.optim.lr_scheduler import StepLR

from hydrattr import HydraAttributor
from hydrattr._core.replay import replay_training
from hydrattr._skorch import module_mode
from hydrattr.models import MLP, LogisticRegression

from _blobs import HAS_PROC_MAPS, groups_nesterov_plateau, mapped_files  # noqa: E402

N, D, K = 200, 6, 3
LR, MOM, DAMP, WD, BS, EPOCHS, STEP, GAMMA = 0.05, 0.9, 0.1, 1e-3, 32, 4, 2, 0.5


def _data(n=N, seed=0):
    rs = np.random.RandomState(seed)
    X = rs.randn(n, D)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1).astype(np.int64)
    return X, y


def _net(module=MLP, **kw):
    params = dict(module=module, module__n_features=D, module__n_classes=K,
                  module__dtype=torch.float64, criterion=torch.nn.CrossEntropyLoss,
                  optimizer=torch.optim.SGD, lr=LR, optimizer__momentum=MOM,
                  optimizer__dampening=DAMP, optimizer__weight_decay=WD, batch_size=BS,
                  max_epochs=EPOCHS, train_split=None, verbose=0, iterator_train__shuffle=True,
                  callbacks=[("sched", LRScheduler(StepLR, step_size=STEP, gamma=GAMMA))])
    if module is MLP:
        params["module__hidden"] = (10,)
        params["module__activation"] = "tanh"
    params.update(kw)
    return NeuralNetClassifier(**params)


def _naive_fast_C(att, X, y, X_test, y_test):
    """Textbook forward recurrence, dense over all samples, float64, no shared code."""
    traj, net = att.trajectory_, att.net_
    names = att.spec_.names
    module = net.module_
    Xt = torch.as_tensor(X)
    yt = torch.as_tensor(y)
    P = att.spec_.n_params
    dv = torch.zeros(N, P, dtype=torch.float64)
    gr = torch.zeros(N, P, dtype=torch.float64)
    steps_per_epoch = int(np.ceil(N / BS))

    def sample_grad(theta, i):
        params = dict(zip(names, torch.split(theta, att.spec_.numels)))
        params = {n: p.view(s) for (n, p), s in zip(params.items(), att.spec_.shapes)}
        t = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        out = torch.func.functional_call(module, t, (Xt[i:i + 1],))
        loss = torch.nn.functional.cross_entropy(out, yt[i:i + 1])
        gs = torch.autograd.grad(loss, [t[n] for n in names])
        return torch.cat([g.reshape(-1) for g in gs])

    for t in range(len(traj)):
        lr = LR * GAMMA ** ((t // steps_per_epoch) // STEP)  # StepLR per epoch
        theta = traj.theta(t)
        batch = traj.indices[t]
        B = len(batch)
        inj = torch.zeros(N, P, dtype=torch.float64)
        for i in batch:
            inj[i] = (N / B) * sample_grad(theta, int(i))
        d = WD * gr + inj  # d/d eps of (batch gradient + weight decay * theta)
        dv = d if t == 0 else MOM * dv + (1 - DAMP) * d  # torch: first buffer undampened
        gr = gr - lr * dv
    with module_mode(module, training=False):
        G = []
        for j in range(len(X_test)):
            out = module(torch.as_tensor(X_test[j:j + 1]))
            loss = torch.nn.functional.cross_entropy(out, torch.as_tensor(y_test[j:j + 1]))
            G.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                loss, [dict(module.named_parameters())[n] for n in names])]))
    G = torch.stack(G)
    return (-(1.0 / N) * gr @ G.T).numpy()


@pytest.fixture(scope="module")
def fitted():
    X, y = _data()
    att = HydraAttributor(_net(), storage="replay", random_state=0, verbose=0).fit(X, y)
    return att, X, y


def test_fast_equals_naive_dense_recurrence(fitted):
    att, X, y = fitted
    X_test, y_test = _data(5, seed=1)
    C = att.attribute(X_test, y_test)
    C_naive = _naive_fast_C(att, X, y, X_test, y_test)
    # both float64; only summation order differs -> 1e-10 relative
    np.testing.assert_allclose(C, C_naive, rtol=1e-10, atol=1e-10 * np.abs(C_naive).max())


@pytest.mark.parametrize("storage", ["dense", "half", "memmap"])
def test_storage_strategies_agree(fitted, storage, tmp_path):
    att, X, y = fitted
    X_test, y_test = _data(4, seed=2)
    C_ref = att.attribute(X_test, y_test)
    other = HydraAttributor(_net(), storage=storage, store_dir=str(tmp_path), random_state=0,
                            verbose=0).fit(X, y)
    C = other.attribute(X_test, y_test)
    # float64 stores agree to rounding; float16 keeps ~3 significant digits
    rtol = 2e-3 if storage == "half" else 1e-10
    np.testing.assert_allclose(C, C_ref, rtol=0, atol=rtol * np.abs(C_ref).max())
    # test_batch_size=3 < 4 test points: the mean test gradient is summed batch by batch
    Cm = other.set_params(test_batch_size=3).attribute(X_test, y_test, objective="mean")
    np.testing.assert_allclose(Cm[:, 0], C.mean(axis=1), atol=1e-12 * np.abs(C).max() + 1e-3 *
                               (storage == "half") * np.abs(C).max())


def test_switching_modes_after_fit(fitted):
    """A replay fit keeps the trajectory, so mode='exact' after a fast fit is the exact
    attribution of a fresh exact fit; a store-backed fast fit cannot give it and must say
    so instead of silently returning fast-mode numbers."""
    att, X, y = fitted
    X_test, y_test = _data(4, seed=3)
    C_fast = att.attribute(X_test, y_test)
    C_exact_fresh = HydraAttributor(_net(), mode="exact", random_state=0,
                                    verbose=0).fit(X, y).attribute(X_test, y_test)
    switched = clone(att).fit(X, y).set_params(mode="exact")
    C_switched = switched.attribute(X_test, y_test)
    # same float64 trajectory and sweep: rounding only
    np.testing.assert_allclose(C_switched, C_exact_fresh, rtol=0,
                               atol=1e-10 * np.abs(C_exact_fresh).max())
    # the Hessian term matters on this tanh MLP, so a silent fast result would differ
    assert np.abs(C_fast - C_exact_fresh).max() > 1e-3 * np.abs(C_exact_fresh).max()
    # and back: an exact fit answers in fast mode through the kept trajectory
    back = switched.set_params(mode="fast").attribute(X_test, y_test)
    np.testing.assert_allclose(back, C_fast, rtol=0, atol=1e-10 * np.abs(C_fast).max())

    dense = HydraAttributor(_net(), storage="dense", random_state=0, verbose=0).fit(X, y)
    dense.set_params(mode="exact")
    with pytest.raises(ValueError, match="mode='exact' needs the recorded trajectory.*"
                                         "storage='dense'"):
        dense.attribute(X_test, y_test)


def test_training_is_unperturbed():
    X, y = _data()
    X32 = X.astype(np.float32)
    net = _net(module__dtype=torch.float32, train_split=None)
    att = HydraAttributor(net, random_state=7, verbose=0).fit(X32, y)
    torch.manual_seed(7)
    plain = clone(net).fit(X32, y)
    for (n, p), (_, q) in zip(att.net_.module_.named_parameters(),
                              plain.module_.named_parameters()):
        assert torch.equal(p, q), n  # bit-identical: same seed, batches and updates
    assert not hasattr(net, "module_")  # the caller's net was not fitted


@pytest.mark.skipif(not HAS_PROC_MAPS, reason="needs /proc/self/maps (Linux)")
def test_store_dir_files_have_no_name_and_live_as_long_as_the_attributor(tmp_path):
    """With ``store_dir`` the memmap trajectory and store go in the user's directory as
    files without a name: the directory looks empty, the process maps a deleted file
    there while the attributor lives, and nothing once it is gone.

    Fast mode drops the trajectory once the store is filled, so only the store is mapped
    after fit. Before, both files stayed on disk for good (and later, on SIGKILL). The
    scores are those of the in-memory attributor (float64 throughout: 1e-10).
    """
    import gc

    X, y = _data()
    X_test, y_test = _data(3, seed=3)
    att = HydraAttributor(_net(max_epochs=2), storage="memmap", trajectory="memmap",
                          store_dir=str(tmp_path), random_state=0, verbose=0).fit(X, y)
    assert os.listdir(tmp_path) == []
    mapped = mapped_files(tmp_path)
    assert len(set(mapped)) == 1 and mapped[0].endswith("(deleted)")  # the store only
    C = att.attribute(X_test, y_test)
    ref = HydraAttributor(_net(max_epochs=2), random_state=0, verbose=0).fit(X, y)
    np.testing.assert_allclose(C, ref.attribute(X_test, y_test), rtol=0,
                               atol=1e-10 * np.abs(C).max())
    del att
    gc.collect()
    assert mapped_files(tmp_path) == [] and os.listdir(tmp_path) == []


def test_killed_fit_leaves_nothing_in_store_dir(tmp_path):
    """A process killed with SIGKILL (no cleanup code runs) while it holds a memmapped
    trajectory and store leaves ``store_dir`` empty. Before, the files stayed."""
    import signal
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal, numpy as np, torch
        from torch import nn
        from skorch import NeuralNetClassifier
        from hydrattr import HydraAttributor
        from hydrattr.models import MLP
        rng = np.random.RandomState(0)
        X = rng.randn(40, 5).astype(np.float32); y = rng.randint(0, 2, 40)
        net = NeuralNetClassifier(MLP, module__n_features=5, module__n_classes=2,
                                  module__hidden=(4,), criterion=nn.CrossEntropyLoss,
                                  optimizer=torch.optim.SGD, lr=0.1, max_epochs=2,
                                  batch_size=8, train_split=None, verbose=0)
        att = HydraAttributor(net, mode="exact", storage="replay", trajectory="memmap",
                              store_dir={str(tmp_path)!r}, random_state=0, verbose=0)
        att.fit(X, y)
        att2 = HydraAttributor(net, storage="memmap", store_dir={str(tmp_path)!r},
                               random_state=0, verbose=0).fit(X, y)
        assert att.trajectory_._thetas.shape[0] == 10 and att2 is not None
        print("fitted", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "fitted" in proc.stdout
    assert os.listdir(tmp_path) == []


def test_fitted_net_does_not_keep_the_trajectory():
    """Fast mode drops the trajectory once the store is filled; nothing else may hold it.

    The recording callback used to stay in ``net_.callbacks_`` with the trajectory and
    the training data, so a fast attributor kept (and pickled) a copy of every parameter
    snapshot: 1.5 GiB per LeNet-5 run at 20,000 rows. Here the trajectory is 28 steps x
    P float64 against a store of 200 x P float32, so a pickle that still held it would be
    over 0.14 x 28 x P x 8 bytes larger than the bound below.
    """
    import pickle

    X, y = _data()
    net = _net(max_epochs=4)
    user_callbacks = list(net.callbacks)
    att = HydraAttributor(net, storage="dense", random_state=0, verbose=0).fit(X, y)
    assert att.trajectory_ is None
    assert all(name != "hydrattr_recorder" for name, _ in att.net_.callbacks_)
    # the fitted net has the user's callbacks (as its own clones) and nothing more; the
    # caller's callback objects were never initialised
    assert [n for n, _ in att.net_.callbacks] == [n for n, _ in user_callbacks]
    assert all(a is not b for (_, a), (_, b) in zip(att.net_.callbacks, user_callbacks))
    assert net.callbacks == user_callbacks
    assert not any(hasattr(cb, "lr_scheduler_") for _, cb in user_callbacks)
    P = sum(p.numel() for p in att.net_.module_.parameters())
    steps = 4 * int(np.ceil(N / BS))
    store_bytes = N * P * 4
    size = len(pickle.dumps(att))
    assert size < store_bytes + 0.5 * steps * P * 8 + 200_000, (size, store_bytes)
    # the fitted net still predicts and can be refitted (without the recorder)
    assert att.net_.predict(X[:3]).shape == (3,)
    att.net_.partial_fit(X, y)


def test_replay_reproduces_recorded_training(fitted):
    att, X, y = fitted
    with module_mode(att.net_.module_, training=True):
        theta = replay_training(att.trajectory_, att._loss_fn(), att._data_fn())
    # our SGD step vs torch's, float64, ~25 steps: rounding only
    torch.testing.assert_close(theta, att.trajectory_.theta_final, rtol=1e-12, atol=1e-13)


def test_convex_fast_mode_tracks_same_order_leave_one_out():
    """Logistic regression, small lr: C ~ LOO retraining with the same batch order."""
    X, y = _data(120, seed=3)
    net = _net(module=LogisticRegression, lr=0.01, optimizer__momentum=0.9,
               optimizer__dampening=0.0, max_epochs=3, callbacks=[], batch_size=20)
    att = HydraAttributor(net, storage="replay", random_state=0, verbose=0).fit(X, y)
    X_test, y_test = _data(6, seed=4)
    C = att.attribute(X_test, y_test)
    loss_fn, data_fn = att._loss_fn(), att._data_fn()
    xt, yt = torch.as_tensor(X_test), torch.as_tensor(y_test)
    with module_mode(att.net_.module_, training=True):
        base = replay_training(att.trajectory_, loss_fn, data_fn)
        rows = np.arange(0, len(X), 3)  # 40 of the 120 rows keep the test quick
        C = C[rows]
        loo = np.empty_like(C)
        for k, i in enumerate(rows):
            m = np.ones(len(X))
            m[i] = 0.0
            th = replay_training(att.trajectory_, loss_fn, data_fn, multipliers=m)
            loo[k] = (loss_fn(th, xt, yt) - loss_fn(base, xt, yt)).detach().numpy()
    r = pearsonr(C.ravel(), loo.ravel())[0]
    assert r > 0.95, r
    top = np.argsort(-np.abs(loo), axis=0)[:5]
    for j in range(C.shape[1]):  # signs of the 5 largest LOO effects per test point agree
        assert np.all(np.sign(C[top[:, j], j]) == np.sign(loo[top[:, j], j]))


def test_train_split_rows_get_zero_and_warning():
    X, y = _data(100)
    net = _net(train_split=__import__("skorch").dataset.ValidSplit(5), max_epochs=1,
               callbacks=[])
    with pytest.warns(UserWarning, match="never entered a gradient step"):
        att = HydraAttributor(net, random_state=0, verbose=0).fit(X, y)
    C = att.attribute(X[:3], y[:3])
    assert (~att.trained_mask_).sum() == 20
    assert np.all(C[~att.trained_mask_] == 0) and np.all(C[att.trained_mask_] != 0)


def test_track_subset_rows_nan_elsewhere(fitted):
    att, X, y = fitted
    sub = HydraAttributor(_net(), track=np.array([3, 10, 50]), random_state=0,
                          verbose=0).fit(X, y)
    C_sub = sub.attribute(X[:2], y[:2])
    C_all = att.attribute(X[:2], y[:2])
    assert np.isnan(C_sub[np.setdiff1d(np.arange(N), [3, 10, 50])]).all()
    np.testing.assert_allclose(C_sub[[3, 10, 50]], C_all[[3, 10, 50]], rtol=1e-10)


def test_errors_name_the_problem():
    X, y = _data(40)
    adagrad = NeuralNetClassifier(MLP, module__n_features=D, module__n_classes=K,
                                  optimizer=torch.optim.Adagrad, criterion=torch.nn.CrossEntropyLoss,
                                  train_split=None, max_epochs=1, verbose=0)
    with pytest.raises(TypeError, match="net.optimizer.*Adagrad"):
        HydraAttributor(adagrad, verbose=0).fit(X.astype(np.float32), y)
    with pytest.raises(ValueError, match="mode"):
        HydraAttributor(_net(), mode="slow").fit(X, y)
    with pytest.raises(ValueError, match="storage"):
        HydraAttributor(_net(), storage="disk").fit(X, y)
    with pytest.raises(TypeError, match="net.*must be an instance of .skorch.net.NeuralNet"):
        HydraAttributor(object()).fit(X, y)
    Xn = X.copy()
    Xn[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        HydraAttributor(_net(), verbose=0).fit(Xn, y)
    from sklearn.exceptions import NotFittedError
    with pytest.raises(NotFittedError):
        HydraAttributor(_net()).attribute(X, y)
    att = HydraAttributor(_net(max_epochs=1, callbacks=[]), verbose=0).fit(X, y)
    with pytest.raises(ValueError, match="features|shape"):
        att.attribute(X[:, :3], y)
    with pytest.raises(ValueError, match="objective"):
        att.attribute(X, y, objective="sum")


def test_exact_adjoint_equals_forward_recurrence_param_groups_nesterov():
    """Exact mode with two param groups (own lr and weight decay), Nesterov and a
    plateau schedule: the adjoint sweep (in place, per-group scalars) equals the paper's
    forward recurrence (tangent_step, per-coordinate vectors: other code) for every
    tracked row, to float64 rounding; a wrong group coefficient is off by O(1)."""
    X, y = _data(64)
    Xt, yt = _data(5, seed=3)
    net = _net(**groups_nesterov_plateau(max_epochs=3))
    att = HydraAttributor(net, mode="exact", test_batch_size=2, random_state=0,
                          verbose=0).fit(X, y)
    assert att.spec_.n_groups == 2
    C = att.attribute(Xt, yt)  # 3 sweeps of at most 2 columns
    rows = np.array([0, 17, 63])
    np.testing.assert_allclose(att.attribute_forward(Xt, yt, rows), C[rows], rtol=1e-9,
                               atol=1e-12 * np.abs(C).max())


def test_recorded_hyperparameters_are_those_used_param_groups_plateau_nesterov():
    """Two param groups, Nesterov, ReduceLROnPlateau: replaying the recorded steps with
    our SGD algebra reproduces skorch's trained weights, so every recorded lr/momentum/
    first-step flag was the one actually used (a wrong lr would move the weights)."""
    X, y = _data(96)
    net = _net(**groups_nesterov_plateau(max_epochs=6))
    att = HydraAttributor(net, storage="replay", random_state=0, verbose=0).fit(X, y)
    lrs = att.trajectory_.hyper.lr.numpy()
    assert att.spec_.n_groups == 2
    # mode="max" on a falling loss: a plateau after every epoch but the first
    assert all(len(np.unique(lrs[:, k])) >= 4 for k in range(2))
    assert sorted(lrs[0]) == sorted([LR, 0.2])
    with module_mode(att.net_.module_, training=True):
        theta = replay_training(att.trajectory_, att._loss_fn(), att._data_fn())
    torch.testing.assert_close(theta, att.trajectory_.theta_final, rtol=1e-12, atol=1e-13)
