"""InfluenceFunctionAttributor: closed forms, the trained-row bookkeeping, warnings, errors.

The convex end-to-end validation against leave-one-out retraining lives in
tests/test_logistic_toy.py.
"""
import warnings

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier, NeuralNetRegressor
from skorch.dataset import ValidSplit
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from torch import nn
from torch.func import functional_call

from hydrattr import InfluenceFunctionAttributor
from hydrattr._core.solvers import LissaDivergenceError

N, D, LAM = 30, 3, 0.1


@pytest.fixture(scope="module")
def ridge_data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, D))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.5 * rng.standard_normal(N)
    Xt = rng.standard_normal((4, D))
    yt = Xt @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.5 * rng.standard_normal(4)
    return X, y, Xt, yt


def ridge_net(reduction="mean", **kw):
    # lr and momentum fit the spectrum of 2 A^T A / N + lam (about [1, 3.5] here):
    # contraction < 0.6 per full-batch step, rounding level after 200 epochs.
    lr = 0.4 if reduction == "mean" else 0.4 / N  # a sum loss is N times larger
    params = dict(module=nn.Sequential(nn.Linear(D, 1, dtype=torch.float64), nn.Flatten(0)),
                  criterion=nn.MSELoss, criterion__reduction=reduction,
                  optimizer=torch.optim.SGD, lr=lr, optimizer__momentum=0.1,
                  optimizer__weight_decay=LAM, batch_size=-1, train_split=None,
                  max_epochs=200, verbose=0)
    params.update(kw)
    return NeuralNetRegressor(**params)


def _design(X):
    return np.hstack([X, np.ones((len(X), 1))])  # flat order: [0.weight (3), 0.bias]


def _ridge_theta(X, y, m, reduction):
    """Exact minimiser of sum_k c m_k (a_k.theta - y_k)^2 + lam/2 ||theta||^2.

    c = 1/N for a mean loss. For a sum loss trained full batch, one step per epoch,
    the SGD fixed point is sum_k m_k grad l_k + lam theta = 0, i.e. c = 1.
    """
    A = _design(X)
    c = 1.0 / len(X) if reduction == "mean" else 1.0
    lhs = 2 * c * (A.T * m) @ A + LAM * np.eye(A.shape[1])
    return np.linalg.solve(lhs, 2 * c * (A.T * m) @ y)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ridge_matches_derivative_of_exact_minimiser(ridge_data, reduction):
    """C[i, j] = -d loss_j / d m_i at m = 1 (m_i = sample i's loss multiplier), by
    central finite differences of the closed-form ridge minimiser: no Hessian, no
    gradient code from hydrattr, weight decay entering through the exact optimum."""
    X, y, Xt, yt = ridge_data
    att = InfluenceFunctionAttributor(ridge_net(reduction), random_state=0, verbose=0)
    C = att.fit(X, y).attribute(Xt, yt)
    theta_star = _ridge_theta(X, y, np.ones(N), reduction)
    np.testing.assert_allclose(att._theta.cpu().numpy(), theta_star, atol=1e-10)

    def test_losses(m):
        return (_design(Xt) @ _ridge_theta(X, y, m, reduction) - yt) ** 2

    h = 1e-5
    C_fd = np.empty((N, len(yt)))
    for i in range(N):
        e = np.zeros(N)
        e[i] = h
        C_fd[i] = -(test_losses(1 + e) - test_losses(1 - e)) / (2 * h)
    # central differences of a smooth rational function in float64: error ~h^2 + eps/h
    # ~1e-10 relative to the largest entry
    np.testing.assert_allclose(C, C_fd, rtol=0, atol=1e-7 * np.abs(C_fd).max())
    expected_wd = LAM if reduction == "mean" else LAM / N  # lam / batch size (N)
    np.testing.assert_allclose(att.weight_decay_, [expected_wd])
    # objective="mean" is the mean of the per-point columns (linear in the test gradient)
    np.testing.assert_allclose(att.attribute(Xt, yt, objective="mean")[:, 0], C.mean(axis=1),
                               rtol=1e-10, atol=1e-14)


def test_solvers_agree_on_ridge(ridge_data):
    X, y, Xt, yt = ridge_data
    C = InfluenceFunctionAttributor(ridge_net(), verbose=0, random_state=0).fit(X, y) \
        .attribute(Xt, yt)
    cg = InfluenceFunctionAttributor(ridge_net(), solver="cg", cg_tol=1e-12, block_size=3,
                                     verbose=0, random_state=0).fit(X, y)
    # 4 SPD systems of size 4, tol 1e-12 (blocks of 3 + 1 test points)
    np.testing.assert_allclose(cg.attribute(Xt, yt), C, rtol=0, atol=1e-9 * np.abs(C).max())
    assert len(cg.solver_info_) == 2
    # damping shifts the answer: (H + d I)^{-1} is smaller
    Cd = InfluenceFunctionAttributor(ridge_net(), damping=10.0, verbose=0, random_state=0) \
        .fit(X, y).attribute(Xt, yt)
    assert np.abs(Cd).max() < 0.5 * np.abs(C).max()


def test_arnoldi_full_rank_equals_direct(ridge_data):
    """solver="arnoldi" with rank = n_params (4) is the exact inverse: equal to the
    direct solver to float64 rounding. Rank 1 keeps only the top eigenpair, and equals
    the direct solve projected on the top eigenvector of ``hessian_``."""
    X, y, Xt, yt = ridge_data
    direct = InfluenceFunctionAttributor(ridge_net(), verbose=0, random_state=0).fit(X, y)
    C = direct.attribute(Xt, yt)
    full = InfluenceFunctionAttributor(ridge_net(), solver="arnoldi", arnoldi_rank=4,
                                       verbose=0, random_state=0).fit(X, y)
    np.testing.assert_allclose(full.attribute(Xt, yt), C, rtol=0, atol=1e-9 * np.abs(C).max())
    np.testing.assert_allclose(full.hessian_eigenvalues_, direct.hessian_eigenvalues_,
                               rtol=1e-9)
    one = InfluenceFunctionAttributor(ridge_net(), solver="arnoldi", arnoldi_rank=1,
                                      arnoldi_iter=4, verbose=0, random_state=0).fit(X, y)
    # independent algebra: per-sample gradients by plain autograd, numpy inverses;
    # C = G_train M G_test^T / N with M = H^-1 (direct) or u u^T / w_max (rank 1)
    w, U = np.linalg.eigh(direct.hessian_)
    u = U[:, -1]
    G_te, G_tr = _grads(direct, Xt, yt), _grads(direct, X, y)
    np.testing.assert_allclose(G_tr @ np.linalg.inv(direct.hessian_) @ G_te.T / N, C,
                               rtol=1e-8, atol=1e-12)
    proj = np.outer(u, u) / w[-1]
    np.testing.assert_allclose(one.attribute(Xt, yt), G_tr @ proj @ G_te.T / N,
                               rtol=1e-8, atol=1e-12)


def _grads(att, X, y):
    """Per-sample loss gradients at the trained weights, flat order, by autograd."""
    module = att.net_.module_
    out = []
    for xi, yi in zip(torch.as_tensor(X), torch.as_tensor(y)):
        module.zero_grad()
        loss = nn.functional.mse_loss(module(xi[None]), yi[None])
        loss.backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in module.parameters()]).numpy())
    return np.array(out)


def test_arnoldi_warns_on_negative_ritz_values():
    X, y = _softmax_data()
    with pytest.warns(UserWarning, match="Ritz values.*damping"):
        att = InfluenceFunctionAttributor(_softmax_net(optimizer__weight_decay=0.0),
                                          solver="arnoldi", arnoldi_rank=30,
                                          verbose=0, random_state=0).fit(X, y)
    assert np.all(np.isfinite(att.attribute(X[:3], y[:3])))


def test_rows_held_out_by_train_split_are_zero(ridge_data):
    X, y, Xt, yt = ridge_data
    net = ridge_net(train_split=ValidSplit(3))  # KFold: first third held out, deterministic
    att = InfluenceFunctionAttributor(net, verbose=0, random_state=0)
    with pytest.warns(UserWarning, match="never entered a gradient step"):
        att.fit(X, y)
    mask = att.trained_mask_
    assert att.n_trained_ == mask.sum() == 20
    C = att.attribute(Xt, yt)
    assert np.all(C[~mask] == 0)
    # the trained rows get exactly what training on those rows alone gives: H and N are
    # over the 20 trained rows (same convex optimum, reached by both runs)
    ref = InfluenceFunctionAttributor(ridge_net(), verbose=0, random_state=0) \
        .fit(X[mask], y[mask]).attribute(Xt, yt)
    np.testing.assert_allclose(C[mask], ref, rtol=0, atol=1e-9 * np.abs(ref).max())


def _softmax_data():
    rng = np.random.default_rng(1)
    X = np.vstack([rng.normal(-1, 1, (15, 2)), rng.normal(1, 1, (15, 2))])
    y = np.repeat([0, 1], 15)
    return X, y


def _softmax_net(**kw):
    # two logits and no weight decay: adding the same vector to both rows of the weight
    # (and to both biases) changes nothing, so H has a 3-dimensional null space
    # module given as a class: skorch builds it after the attributor seeds torch
    return NeuralNetClassifier(nn.Linear, module__in_features=2, module__out_features=2,
                               module__dtype=torch.float64, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.SGD,
                               lr=0.5, batch_size=-1, train_split=None, max_epochs=20,
                               verbose=0, **kw)


def test_direct_is_silent_on_exact_null_directions():
    # a softmax's logit shift makes H singular on every default fit; the gradients have no
    # component there, so the pseudo-inverse is exact and nothing is worth a warning
    X, y = _softmax_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        att = InfluenceFunctionAttributor(_softmax_net(), verbose=0, random_state=0).fit(X, y)
        C = att.attribute(X[:3], y[:3])
    ev = att.hessian_eigenvalues_
    assert np.sum(np.abs(ev) < 1e-12) == 3 and ev[-1] > 1e-3
    assert np.all(np.isfinite(C))  # pseudo-inverse: test gradients live in the range of H
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        damped = InfluenceFunctionAttributor(_softmax_net(), damping=0.01, verbose=0,
                                             random_state=0).fit(X, y)
    np.testing.assert_allclose(damped.hessian_eigenvalues_, ev)  # reported undamped


def _unconverged_tanh_mlp():
    """A float64 tanh MLP one small full-batch step from its random start: its weights
    are no minimum, so the Hessian there has negative curvature."""
    from hydrattr.models import MLP

    return NeuralNetClassifier(MLP, module__n_features=2, module__n_classes=2,
                               module__hidden=(4,), module__activation="tanh",
                               module__dtype=torch.float64, criterion=nn.CrossEntropyLoss,
                               optimizer=torch.optim.SGD, lr=0.01, batch_size=-1,
                               max_epochs=1, train_split=None, verbose=0)


def test_direct_warns_on_negative_curvature_and_dropped_test_directions():
    X, y = _softmax_data()
    mlp = _unconverged_tanh_mlp()
    with pytest.warns(UserWarning, match="not positive semi-definite.*Set damping >"):
        att = InfluenceFunctionAttributor(mlp, verbose=0, random_state=0).fit(X, y)
    assert att.hessian_eigenvalues_[0] < -0.1
    # a test gradient that reaches a direction the pseudo-inverse drops is reported at
    # attribute: zero the eigenvalue the gradients load on most
    att = InfluenceFunctionAttributor(_softmax_net(), verbose=0, random_state=0).fit(X, y)
    evals, evecs = att._eigh
    att._eigh = (torch.where(torch.arange(len(evals)) == len(evals) - 1,
                             torch.zeros_like(evals), evals), evecs)
    with pytest.warns(UserWarning, match="test gradients reach directions.*damping > 0"):
        att.attribute(X[:3], y[:3])


def test_cg_warns_when_not_converged(ridge_data):
    X, y, Xt, yt = ridge_data
    att = InfluenceFunctionAttributor(ridge_net(), solver="cg", cg_maxiter=1, cg_tol=1e-12,
                                      verbose=0, random_state=0).fit(X, y)
    with pytest.warns(UserWarning, match="CG did not converge.*cg_maxiter"):
        att.attribute(Xt, yt)
    assert not bool(att.solver_info_[0].converged.all())


def test_lissa_divergence_raises_naming_lissa_scale(ridge_data):
    X, y, Xt, yt = ridge_data
    # largest eigenvalue of H ~3.5 > 2 * scale: the recursion grows like 34^t
    att = InfluenceFunctionAttributor(ridge_net(), solver="lissa", lissa_scale=0.1,
                                      lissa_depth=500, verbose=0, random_state=0).fit(X, y)
    with pytest.raises(LissaDivergenceError, match="lissa_scale=0.1"):
        att.attribute(Xt, yt)


def test_lissa_is_seeded_by_random_state(ridge_data):
    X, y, Xt, yt = ridge_data
    kw = dict(solver="lissa", lissa_scale=5.0, lissa_depth=100, lissa_batch_size=5,
              verbose=0)
    a = InfluenceFunctionAttributor(ridge_net(), random_state=0, **kw).fit(X, y)
    b = InfluenceFunctionAttributor(ridge_net(), random_state=0, **kw).fit(X, y)
    np.testing.assert_array_equal(a.attribute(Xt, yt), b.attribute(Xt, yt))
    assert a.solver_info_[0].residual is not None


def _bn_net():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(D, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1),
                           nn.Flatten(0)).double()
    return NeuralNetRegressor(module, criterion=nn.MSELoss, optimizer=torch.optim.SGD,
                              lr=0.1, optimizer__momentum=0.9, optimizer__weight_decay=0.05,
                              batch_size=10, train_split=None, max_epochs=30, verbose=0)


def test_batchnorm_hessian_is_eval_mode_at_the_optimum(ridge_data):
    X, y, Xt, yt = ridge_data
    att = InfluenceFunctionAttributor(_bn_net(), damping=1.0, verbose=0, random_state=0)
    att.fit(X, y)
    module = att.net_.module_
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    # independent Hessian: torch.func.hessian of the eval-mode mean loss + wd/2 ||theta||^2
    names = att.spec_.names
    params = dict(module.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    Xt_, yt_ = torch.as_tensor(X), torch.as_tensor(y)

    def objective(th):
        p = att.spec_.unflatten(th)
        module.eval()
        out = functional_call(module, {**p, **dict(module.named_buffers())}, (Xt_,))
        return ((out - yt_) ** 2).mean() + 0.05 / 2 * (th ** 2).sum()

    H = torch.func.hessian(objective)(theta)
    np.testing.assert_allclose(att.hessian_, H.numpy(), rtol=1e-10, atol=1e-12)
    C = att.attribute(Xt, yt)
    for k, v in module.named_buffers():  # running statistics untouched
        assert torch.equal(v, buffers[k])
    assert module.training is False  # skorch leaves the trained module in eval mode
    cg = InfluenceFunctionAttributor(_bn_net(), solver="cg", cg_tol=1e-12, damping=1.0,
                                     verbose=0, random_state=0).fit(X, y)
    np.testing.assert_allclose(cg.attribute(Xt, yt), C, rtol=0, atol=1e-9 * np.abs(C).max())


def test_clone_fit_leaves_caller_net_alone(ridge_data):
    X, y, Xt, yt = ridge_data
    net = ridge_net()
    att = InfluenceFunctionAttributor(net, verbose=0)
    with pytest.raises(NotFittedError):
        att.attribute(Xt, yt)
    att.fit(X, y)
    assert not getattr(net, "initialized_", False)
    assert att.trajectory_ is None  # freed after fit
    c = clone(att)
    assert c.get_params()["solver"] == "direct" and not hasattr(c, "net_")


@pytest.mark.parametrize("kw, match", [
    (dict(solver="newton"), "solver"),
    (dict(damping=-1.0), "damping"),
    (dict(cg_tol=0.0), "cg_tol"),
    (dict(cg_maxiter=2.5), "cg_maxiter"),
    (dict(lissa_scale=-1), "lissa_scale"),
    (dict(lissa_depth=0), "lissa_depth"),
    (dict(lissa_batch_size=1.5), "lissa_batch_size"),
    (dict(block_size=0), "block_size"),
    (dict(solver="arnoldi", arnoldi_rank=0), "arnoldi_rank"),
    (dict(solver="arnoldi", arnoldi_iter=1.5), "arnoldi_iter"),
])
def test_parameter_errors(ridge_data, kw, match):
    X, y, _, _ = ridge_data
    with pytest.raises(ValueError, match=match):
        InfluenceFunctionAttributor(ridge_net(), verbose=0, **kw).fit(X, y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_gpu_matches_cpu(ridge_data, solver):
    X, y, Xt, yt = ridge_data
    kw = dict(solver=solver, cg_tol=1e-12, verbose=0, random_state=0)
    C_cpu = InfluenceFunctionAttributor(_bn_net(), damping=1.0, **kw).fit(X, y).attribute(Xt, yt)
    gpu = InfluenceFunctionAttributor(_bn_net().set_params(device="cuda"), damping=1.0, **kw)
    C_gpu = gpu.fit(X, y).attribute(Xt, yt)
    assert gpu._device.type == "cuda"
    # same float64 arithmetic on another device; training itself differs only by
    # reduction order (~1e-15 per step over 90 steps)
    np.testing.assert_allclose(C_gpu, C_cpu, rtol=0, atol=1e-8 * np.abs(C_cpu).max())


def test_cg_negative_curvature_advice_follows_damping():
    # with damping already set, CG's advice is to increase it, not "set damping > 0"
    X, y = _softmax_data()
    mlp = _unconverged_tanh_mlp()
    att = InfluenceFunctionAttributor(mlp, solver="cg", damping=0.1, cg_tol=1e-12,
                                      verbose=0, random_state=0).fit(X, y)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        att.attribute(X[:4], y[:4])
    msgs = [str(x.message) for x in w if "CG did not converge" in str(x.message)]
    assert msgs and all("damping=0.1" in m and "increase damping" in m
                        and "set damping > 0" not in m for m in msgs), msgs
