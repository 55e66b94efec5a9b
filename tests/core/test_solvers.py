"""Inverse-Hessian-vector solvers against numpy.linalg.solve on random SPD matrices."""
import numpy as np
import pytest
import torch

from hydrattr._core.solvers import (LissaDivergenceError, dense_hessian, solve_cg,
                                    solve_direct, solve_lissa)


def _spd(P, cond, seed):
    """Random SPD matrix with eigenvalues log-spaced in [1, cond]."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((P, P)))
    lam = np.logspace(0, np.log10(cond), P)
    return (Q * lam) @ Q.T, lam


def _hvp(A):
    At = torch.as_tensor(A)
    return lambda V: V @ At.T  # rows of V are vectors: (A v)^T = v^T A^T


def _rhs(m, P, seed):
    return torch.as_tensor(np.random.default_rng(seed).standard_normal((m, P)))


def _ref(A, B, damping=0.0):
    A = A + damping * np.eye(len(A))
    return np.linalg.solve(A, B.numpy().T).T


def test_dense_hessian_assembles_matrix_in_blocks():
    A, _ = _spd(13, 50.0, 0)
    # block_size 5 does not divide 13: the last partial block must be placed right
    H = dense_hessian(_hvp(A), 13, block_size=5)
    np.testing.assert_allclose(H.numpy(), A, rtol=0, atol=1e-13)
    assert torch.equal(H, H.T)


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_direct_matches_numpy_solve(damping):
    A, lam = _spd(20, 1e4, 1)
    B = _rhs(4, 20, 2)
    X, info = solve_direct(torch.as_tensor(A), B, damping=damping)
    # float64 solve with cond 1e4: rounding error ~ cond * eps = 2e-12 relative
    np.testing.assert_allclose(X.numpy(), _ref(A, B, damping), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(info.eigenvalues.numpy(), lam, rtol=1e-10)  # undamped
    assert info.min_eigenvalue == pytest.approx(1.0, rel=1e-10)
    assert bool(info.converged.all())
    assert float(info.residual.max()) < 1e-12


def test_direct_indefinite_is_reported_and_still_inverts():
    A, _ = _spd(8, 10.0, 3)
    A = A - 2.5 * np.eye(8)  # eigenvalues in [-1.5, 7.5]: indefinite but invertible
    B = _rhs(3, 8, 4)
    X, info = solve_direct(torch.as_tensor(A), B)
    assert info.min_eigenvalue < 0
    assert not bool(info.converged.any())
    assert info.extra["n_nonpositive"] >= 1
    np.testing.assert_allclose(X.numpy(), _ref(A, B), rtol=1e-8, atol=1e-10)
    # damping that lifts the spectrum makes it positive definite again
    _, info2 = solve_direct(torch.as_tensor(A), B, damping=2.0)
    assert bool(info2.converged.all())


def test_direct_singular_uses_pseudo_inverse():
    rng = np.random.default_rng(5)
    U = rng.standard_normal((6, 3))
    A = U @ U.T  # rank 3
    b = torch.as_tensor(A @ rng.standard_normal(6))[None]  # in the range of A
    X, info = solve_direct(torch.as_tensor(A), b)
    np.testing.assert_allclose(X.numpy(), (np.linalg.pinv(A) @ b.numpy().T).T, atol=1e-9)
    assert info.extra["n_zeroed"] == 3


@pytest.mark.parametrize("damping", [0.0, 1.0])
def test_cg_matches_numpy_solve(damping):
    A, _ = _spd(30, 1e3, 6)
    B = _rhs(5, 30, 7)
    calls = []

    def hvp(V):
        calls.append(V.shape[0])
        return _hvp(A)(V)

    X, info = solve_cg(hvp, B, damping=damping, tol=1e-12, maxiter=500)
    # tol 1e-12 on the residual, cond <= 1e3 -> relative error in x <= 1e-9
    np.testing.assert_allclose(X.numpy(), _ref(A, B, damping), rtol=1e-8, atol=1e-10)
    assert bool(info.converged.all())
    assert float(info.residual.max()) < 1e-11
    assert not bool(info.negative_curvature.any())
    # batched: never more than 5 vectors per HVP; finished columns drop out
    assert max(calls) == 5 and min(calls) <= 5


def test_cg_reports_non_convergence():
    A, _ = _spd(40, 1e6, 8)
    B = _rhs(2, 40, 9)
    X, info = solve_cg(_hvp(A), B, tol=1e-10, maxiter=5)
    assert not bool(info.converged.any())
    assert int(info.n_iter.max()) == 5
    assert float(info.residual.min()) > 1e-10


def test_cg_zero_rhs_and_warm_start():
    A, _ = _spd(10, 10.0, 10)
    B = _rhs(2, 10, 11)
    B[1] = 0
    X, info = solve_cg(_hvp(A), B, tol=1e-12)
    assert bool(info.converged.all()) and torch.all(X[1] == 0)
    ref = _ref(A, B)
    X2, info2 = solve_cg(_hvp(A), B, tol=1e-12, x0=torch.as_tensor(ref))
    assert int(info2.n_iter.max()) <= 1  # already a solution
    np.testing.assert_allclose(X2.numpy(), ref, atol=1e-11)


def test_cg_flags_negative_curvature():
    A = np.diag([1.0, 2.0, -3.0])
    B = torch.ones(1, 3, dtype=torch.float64)
    _, info = solve_cg(_hvp(A), B, tol=1e-12)
    assert bool(info.negative_curvature[0]) and not bool(info.converged[0])


def _per_row_hvp(A, noise, seed):
    """Stochastic HVP: row k of a batch gives A + E_k with sum_k E_k = 0 (unbiased)."""
    rng = np.random.default_rng(seed)
    n, P = len(noise), A.shape[0]
    E = rng.standard_normal((n, P, P)) * np.asarray(noise)[:, None, None]
    E = E + E.transpose(0, 2, 1)
    E -= E.mean(axis=0)
    mats = torch.as_tensor(A[None] + E)

    def hvp(V, rows):
        M = mats[rows].mean(dim=0)
        return V @ M.T

    return hvp


def test_lissa_deterministic_matches_numpy_solve():
    A, _ = _spd(6, 20.0, 12)  # eigenvalues in [1, 20]
    B = _rhs(3, 6, 13)
    X, info = solve_lissa(lambda V, rows: _hvp(A)(V), B, n_samples=10, scale=20.0,
                          depth=2000, damping=0.5)
    # deterministic Neumann series: error factor (1 - 1.5/20)^2000 ~ 1e-68 -> rounding only
    np.testing.assert_allclose(X.numpy(), _ref(A, B, 0.5), rtol=1e-10, atol=1e-12)
    assert bool(info.converged.all()) and int(info.n_iter[0]) == 2000


def test_lissa_stochastic_close_to_solution():
    A, _ = _spd(5, 5.0, 14)  # eigenvalues in [1, 5]
    B = _rhs(2, 5, 15)
    hvp = _per_row_hvp(A, noise=np.full(50, 0.3), seed=16)
    g = torch.Generator().manual_seed(0)
    X, _ = solve_lissa(hvp, B, n_samples=50, batch_size=10, scale=10.0, depth=300,
                       repeat=8, generator=g)
    ref = _ref(A, B)
    # noisy estimator: relative error of a few percent with this noise/batch/repeat
    # (measured ~1e-2); 0.1 leaves room while still failing for a wrong recursion
    err = np.linalg.norm(X.numpy() - ref) / np.linalg.norm(ref)
    assert err < 0.1
    # same generator seed -> same estimate
    X2, _ = solve_lissa(hvp, B, n_samples=50, batch_size=10, scale=10.0, depth=300,
                        repeat=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(X, X2)


def test_lissa_scale_too_small_raises_naming_scale():
    A, _ = _spd(6, 20.0, 17)  # lambda_max 20 > 2 * scale: geometric blow-up
    B = _rhs(1, 6, 18)
    with pytest.raises(LissaDivergenceError, match="scale"):
        solve_lissa(lambda V, rows: _hvp(A)(V), B, n_samples=5, scale=5.0, depth=5000)


def test_lissa_indefinite_raises():
    A = np.diag([1.0, 2.0, -0.5])
    B = torch.ones(1, 3, dtype=torch.float64)
    with pytest.raises(LissaDivergenceError, match="damping"):
        solve_lissa(lambda V, rows: _hvp(A)(V), B, n_samples=5, scale=5.0, depth=20000)


def test_lissa_nan_raises():
    B = torch.ones(1, 3, dtype=torch.float64)
    with pytest.raises(LissaDivergenceError, match="non-finite"):
        solve_lissa(lambda V, rows: V * float("nan"), B, n_samples=5, scale=5.0, depth=10)


def test_parameter_errors():
    B = torch.ones(1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="damping"):
        solve_cg(lambda V: V, B, damping=-1.0)
    with pytest.raises(ValueError, match="scale"):
        solve_lissa(lambda V, r: V, B, n_samples=3, scale=0.0)
    with pytest.raises(ValueError, match="depth"):
        solve_lissa(lambda V, r: V, B, n_samples=3, depth=0)
    with pytest.raises(ValueError, match="tol"):
        solve_cg(lambda V: V, B, tol=0)
    with pytest.raises(ValueError, match="B must be"):
        solve_cg(lambda V: V, torch.ones(3))
