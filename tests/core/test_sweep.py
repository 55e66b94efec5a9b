"""Exact-mode building blocks: BatchNorm running statistics, stats-aware products, sweeps.

* ``batch_products`` (the alpha trick) against plain autograd: ``J_l v``, ``H v + J_S^T rho``
  and ``J_S v``.
* Running statistics rebuilt by ``replay_training`` equal torch's own buffers after a
  skorch fit (momentum and cumulative ``momentum=None`` layers).
* With dropout, the vmapped adjoint (``randomness="same"``) equals the per-vector loop
  that replays the RNG state for each vector.
* ``exact_adjoint(hessian=False)`` equals the fast-mode store: the two modes differ by
  the Hessian term only.
* ``exact_adjoint``'s per-step hook ``on_step`` (a loss at an intermediate checkpoint
  added to the adjoint, the per-sample terms sorted by epoch), and the sweep of
  ``Trajectory.head(k)``, against finite differences of training replayed for ``k`` steps.
"""
import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier
from skorch.callbacks import LRScheduler
from torch.func import functional_call
from torch.optim.lr_scheduler import StepLR

from hydrattr import HydraAttributor
from hydrattr._core.functional import batch_products
from hydrattr._core.replay import replay_training
from hydrattr._core.running_stats import BatchNormStats
from hydrattr._core.store import SampleStore
from hydrattr._core.sweep import build_fast_store, exact_adjoint
from hydrattr._core.trajectory import Steps
from hydrattr._skorch import module_mode
from hydrattr.models import MLP


pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 6, dtype=torch.float64),
                            torch.nn.BatchNorm1d(6, dtype=torch.float64), torch.nn.Tanh(),
                            torch.nn.Dropout(0.3), torch.nn.Linear(6, 3, dtype=torch.float64))
    names = [n for n, _ in m.named_parameters()]
    from hydrattr._core.functional import ParamSpec

    spec = ParamSpec(names, [p.shape for p in m.parameters()],
                     [sum(p.numel() for p in m.parameters())])
    theta = spec.flatten(dict(m.named_parameters())).detach()

    def loss_fn(t, x, y):
        out = functional_call(m, spec.unflatten(t), (x,))
        return torch.nn.functional.cross_entropy(out, y, reduction="none")

    return m, spec, theta, loss_fn


def test_batch_products_alpha_trick_matches_autograd():
    m, spec, theta, loss_fn = _bn_model()
    bn = BatchNormStats(m)
    stats_fn = bn.loss_and_stats(loss_fn)
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0, 2, 1])
    w = torch.full((7,), 1 / 7, dtype=torch.float64)
    V = torch.randn(3, spec.n_params, dtype=torch.float64)
    rho = torch.randn(3, bn.n_stats, dtype=torch.float64)
    rng = (torch.get_rng_state(), None)
    with module_mode(m, training=True):
        dots, hv, ds = batch_products(loss_fn, theta, x, y, w, V, stats_fn=stats_fn,
                                      stats_cotangents=rho, rng_state=rng)
        dots2, _, ds2 = batch_products(loss_fn, theta, x, y, w, V, hessian=False,
                                       stats_fn=stats_fn, rng_state=rng)

        def run(t):  # reference: plain autograd with the same dropout masks
            torch.set_rng_state(rng[0])
            return stats_fn(t, x, y)

        for k in range(3):
            t = theta.clone().requires_grad_(True)
            lv, S = run(t)
            (g,) = torch.autograd.grad((w * lv).sum(), t, create_graph=True)
            (h,) = torch.autograd.grad(g @ V[k], t, retain_graph=True)
            (jts,) = torch.autograd.grad(S @ rho[k], t, retain_graph=True)
            J = torch.stack([torch.autograd.grad(lv[b], t, retain_graph=True)[0]
                             for b in range(7)])
            JS = torch.stack([torch.autograd.grad(S[s], t, retain_graph=True)[0]
                              for s in range(bn.n_stats)])
            # float64, a handful of ops: agreement to rounding
            torch.testing.assert_close(dots[k], J @ V[k], rtol=1e-11, atol=1e-13)
            torch.testing.assert_close(hv[k], h + jts, rtol=1e-11, atol=1e-13)
            torch.testing.assert_close(ds[k], JS @ V[k], rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(dots2, dots, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ds2, ds, rtol=1e-12, atol=1e-14)


def test_evaluate_with_matches_torch_eval_batchnorm():
    m, spec, theta, loss_fn = _bn_model()
    bn = BatchNormStats(m)
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    with module_mode(m, training=False):
        ref = loss_fn(theta, x, y)
        got = bn.eval_loss(loss_fn)(theta, bn.flat(), x, y)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-14)


def _data(n=60, seed=0):
    rs = np.random.RandomState(seed)
    X = rs.randn(n, 4)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 0.8).astype(np.int64)
    return X, y


def _net(**kw):
    params = dict(module=MLP, module__n_features=4, module__n_classes=3, module__hidden=(6,),
                  module__activation="tanh", module__dropout=0.25, module__batchnorm=True,
                  module__dtype=torch.float64, criterion=torch.nn.CrossEntropyLoss,
                  optimizer=torch.optim.SGD, lr=0.1, optimizer__momentum=0.9,
                  optimizer__weight_decay=1e-3, batch_size=15, max_epochs=2, train_split=None,
                  verbose=0, iterator_train__shuffle=True,
                  callbacks=[("lr", LRScheduler(StepLR, step_size=1, gamma=0.5))])
    params.update(kw)
    return NeuralNetClassifier(**params)


@pytest.fixture(scope="module")
def fitted():
    X, y = _data()
    att = HydraAttributor(_net(), mode="exact", random_state=0, verbose=0).fit(X, y)
    return att, X, y


class _CumulativeMLP(MLP):
    """BatchNorm with ``momentum=None``: cumulative average, ``f_t = 1 / num_batches_tracked``."""

    def __init__(self, **kw):
        super().__init__(**kw)
        for mod in self.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.momentum = None


@pytest.mark.parametrize("momentum", [0.1, None])
def test_replayed_running_stats_equal_torch_buffers(momentum):
    X, y = _data()
    module = MLP if momentum == 0.1 else _CumulativeMLP
    att = HydraAttributor(_net(module=module), mode="exact", random_state=0, verbose=0)
    att.fit(X, y)
    bn = BatchNormStats(att.net_.module_)
    with module_mode(att.net_.module_, training=True):
        theta, R = replay_training(att.trajectory_, att._loss_fn(), att._data_fn(), bn=bn)
    # float64, 8 steps: our moving average vs torch's kernel, rounding only
    torch.testing.assert_close(R, bn.flat(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(theta, att.trajectory_.theta_final, rtol=1e-12, atol=1e-13)
    # and the statistics moved: the check is not vacuous
    assert (R - bn.flat(att.trajectory_.buffers0)).abs().max() > 1e-2


def test_vectorized_adjoint_with_dropout_equals_per_vector_loop(fitted):
    att, X, y = fitted
    Xt, yt = att._to_tensors(*_data(5, seed=1))
    G, GR = att._exact_test_grads(Xt, yt, "per_sample")
    bn = BatchNormStats(att.net_.module_)
    rows_map = np.arange(len(X))
    with module_mode(att.net_.module_, training=True):
        args = (att.trajectory_, att._loss_fn(), att._data_fn(), G, rows_map, len(X))
        a = exact_adjoint(*args, bn=bn, stats_grads=GR, vectorize=True)
        b = exact_adjoint(*args, bn=bn, stats_grads=GR, vectorize=False)
    # same masks, same math, different batching of the vectors: rounding only
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-13 * a.abs().max().item())


def test_adjoint_without_hessian_is_fast_mode(fitted):
    att, X, y = fitted
    Xt, yt = att._to_tensors(*_data(5, seed=1))
    G = att._test_grads(Xt, yt, "per_sample")
    rows_map = np.arange(len(X))
    with module_mode(att.net_.module_, training=True):
        D = exact_adjoint(att.trajectory_, att._loss_fn(), att._data_fn(), G, rows_map,
                          len(X), hessian=False)
        store = SampleStore(len(X), att.spec_.n_params, dtype=torch.float64)
        build_fast_store(att.trajectory_, att._loss_fn(), att._data_fn(), store, rows_map,
                         independent=False)
    # both drop the Hessian; they differ only in summation order
    np.testing.assert_allclose(D.numpy(), store.matmul_t(G).numpy(), rtol=1e-9,
                               atol=1e-12 * D.abs().max().item())


def _checkpoint_hook(k, g, cols, D_split):
    """An ``on_step`` hook that adds ``g`` (m, P) to the adjoint at step ``k`` (a loss at
    the checkpoint ``theta(k)``) and sorts each step's terms into ``D_split[..., cols[t]]``."""
    def on_step(t, theta_bar, slots, terms):
        D_split[torch.as_tensor(slots), :, cols[t]] += terms
        if t == k:
            return theta_bar + g.to(theta_bar.device, theta_bar.dtype)
        return None
    return on_step


def test_adjoint_hook_adds_checkpoint_objectives_and_splits_steps(fitted):
    """``on_step`` adds a loss at an intermediate checkpoint and sorts the steps' terms.

    Ground truth: central finite differences of the replayed training stopped at the
    checkpoint (``replay_training(n_steps=k)``) with row ``i``'s loss multiplier moved by
    +-h; ``D[i] = (1/N) d obj / d eps_i = d obj / d multiplier_i``.
    """
    att, X, y = fitted
    traj, loss_fn, data_fn = att.trajectory_, att._loss_fn(), att._data_fn()
    Xt, yt = att._to_tensors(*_data(5, seed=1))
    k, T = 4, len(traj)  # the end of the first epoch (60 rows, batch 15), of 8 steps
    assert traj.epoch_starts[1] == k

    def objective(theta):  # eval-mode test loss with the net's buffers held fixed
        with module_mode(att.net_.module_, training=False):
            return loss_fn(theta, Xt, yt).mean()

    def theta_k(mult=None):
        with module_mode(att.net_.module_, training=True):
            return replay_training(traj, loss_fn, data_fn, multipliers=mult, n_steps=k)

    t = theta_k().clone().requires_grad_(True)
    (g_k,) = torch.autograd.grad(objective(t), t)
    G_T = att._test_grads(Xt, yt, "mean")
    zeros = torch.zeros_like(G_T)
    rows_map = np.arange(len(X))
    cols = np.repeat([0, 1], [k, T - k])  # the epoch of each step
    Ds = torch.zeros(len(X), 2, 2, dtype=torch.float64)
    seen = []
    hook = _checkpoint_hook(k, torch.cat([zeros, g_k[None]]), cols, Ds)
    with module_mode(att.net_.module_, training=True):
        args = (traj, loss_fn, data_fn, torch.cat([G_T, zeros]), rows_map, len(X))
        D = exact_adjoint(*args, on_step=lambda t, *a: seen.append(t) or hook(t, *a))
        D_final = exact_adjoint(traj, loss_fn, data_fn, G_T, rows_map, len(X))
        D_late = exact_adjoint(traj, loss_fn, data_fn, G_T, rows_map, len(X), start=k)
        D_head = exact_adjoint(traj.head(k), loss_fn, data_fn, g_k[None], rows_map, len(X))
        # a hook at the window's first step changes nothing: the sweep ends there
        D_late_hooked = exact_adjoint(
            traj, loss_fn, data_fn, G_T, rows_map, len(X), start=k,
            on_step=lambda t, tb, *a: tb + 1.0 if t == k else None)
    assert seen == list(range(T - 1, -1, -1))  # every step, last first
    torch.testing.assert_close(D_late_hooked, D_late, rtol=0, atol=0)

    h = 1e-5
    for i in [0, 7, 19, 33, 58]:
        m = np.ones(len(X))
        m[i] = 1 + h
        up = objective(theta_k(m))
        m[i] = 1 - h
        fd = (up - objective(theta_k(m))) / (2 * h)
        # float64, central differences: truncation ~h^2, rounding ~1e-16 / h
        np.testing.assert_allclose(D[i, 1].item(), fd.item(), rtol=1e-6,
                                   atol=1e-9 * D[:, 1].abs().max().item())
    assert D[:, 1].abs().max() > 1e-4  # the checkpoint objective depends on the rows
    # the same objective by sweeping the trajectory's first k steps as a run of their own
    head = traj.head(k)  # the per-step records stop at k too
    assert (len(head), len(head.hyper.lr), head.epoch_starts) == (k, k, [0])
    assert len(traj) == T and traj.epoch_starts == [0, k]  # the original is untouched
    # (theta_final is the recorded checkpoint; the replay rounds in the last bits)
    torch.testing.assert_close(head.theta_final, theta_k(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(D_head[:, 0].numpy(), D[:, 1].numpy(), rtol=1e-12,
                               atol=1e-14 * D[:, 1].abs().max().item())
    # the final objective's row is the plain sweep's, untouched by the added loss
    np.testing.assert_allclose(D[:, 0].numpy(), D_final[:, 0].numpy(), rtol=1e-12,
                               atol=1e-14 * D_final.abs().max().item())
    # the terms sorted by epoch: the columns sum to D; the later epoch's column is the
    # window sweep from ``start=k``; steps after the checkpoint do not move theta_k
    scale = D.abs().max().item()
    np.testing.assert_allclose(Ds.sum(-1).numpy(), D.numpy(), rtol=1e-12, atol=1e-14 * scale)
    np.testing.assert_allclose(Ds[:, 0, 1].numpy(), D_late[:, 0].numpy(), rtol=1e-12,
                               atol=1e-14 * scale)
    assert Ds[:, 1, 1].abs().max() == 0
    assert Ds[:, 0, 0].abs().max() > 1e-4  # both epochs carry part of the final objective


def test_adjoint_and_head_reject_bad_arguments(fitted):
    att, X, y = fitted
    G = att._test_grads(*att._to_tensors(*_data(2, seed=1)), "mean")
    args = (att.trajectory_, att._loss_fn(), att._data_fn(), G, np.arange(len(X)), len(X))
    with module_mode(att.net_.module_, training=True), \
            pytest.raises(ValueError, match=r"on_step must return the adjoint's shape \(1, "):
        exact_adjoint(*args, on_step=lambda t, tb, *a: tb[0])
    for n in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match=r"n: expected an int in \[1, 8\]"):
            att.trajectory_.head(n)
    assert att.trajectory_.head(8) is att.trajectory_


def test_derived_records_are_steps(fitted):
    """A head and a continuation carry everything a sweep reads (the ``Steps`` protocol)."""
    traj = fitted[0].trajectory_
    head, cont = traj.head(3), traj.continued(5, traj.theta(5), traj.hyper)
    for rec in (traj, head, cont):
        assert isinstance(rec, Steps) and rec.dtype == traj.dtype
    assert (len(head), len(cont)) == (3, 3)


def test_float64_adjoint_keeps_what_float32_rounds_away():
    """A float32 run of 1,200 steps: its ``lr * weight_decay`` increment (1e-9 per step,
    1e-8 with momentum's 1 / (1 - 0.9)) is below float32's resolution (6e-8), and the
    momentum adjoint's sums round at every step.

    Reference: ``fast_replay``, whose per-step adjoint coefficients are computed in
    float64 (then one float32 rounding of ``coef * G`` per step). The sweep with the
    Hessian dropped is the same quantity. Carried in float64 it agrees to float32 product
    rounding (measured 1.4e-8 of the largest score; bound 2e-7); carried in float32 its
    error grows with the steps (measured 4.8e-6 here, 8.5e-7 at 300 steps; checked to
    exceed 1e-6 so the test can fail).
    """
    from _blobs import three_blobs

    from hydrattr._core.sweep import fast_replay

    X, y = three_blobs(60, 0)
    net = NeuralNetClassifier(
        module=MLP, module__n_features=4, module__n_classes=3, module__hidden=(8,),
        module__activation="tanh", criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.SGD, lr=0.01, optimizer__momentum=0.9,
        optimizer__weight_decay=1e-7, batch_size=20, max_epochs=400, train_split=None,
        verbose=0, iterator_train__shuffle=True)
    att = HydraAttributor(net, mode="exact", random_state=0, verbose=0)
    att.fit(X.astype(np.float32), y)
    assert att.param_dtype_ == torch.float32 and len(att.trajectory_) == 1200
    Xt, yt = att._to_tensors(*three_blobs(4, 1))
    G = att._test_grads(Xt, yt, "per_sample")
    rows_map = np.arange(len(X))
    with module_mode(att.net_.module_, training=True):
        args = (att.trajectory_, att._loss_fn(), att._data_fn(), G, rows_map, len(X))
        ref = fast_replay(*args, independent=True).numpy()
        d64 = exact_adjoint(*args, hessian=False, adjoint_dtype=torch.float64).numpy()
        d32 = exact_adjoint(*args, hessian=False).numpy()
    scale = np.abs(ref).max()
    assert np.abs(d64 - ref).max() < 2e-7 * scale
    assert np.abs(d32 - ref).max() > 1e-6 * scale
