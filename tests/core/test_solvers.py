"""Inverse-Hessian-vector solvers against numpy.linalg.solve on random SPD matrices."""
import numpy as np
import pytest
import torch

from hydrattr._core.solvers import (LissaDivergenceError, dense_hessian, lanczos_eigenpairs,
                                    solve_cg, solve_direct, solve_lissa, solve_lowrank)


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
    assert float(info.eigenvalues[0]) == pytest.approx(1.0, rel=1e-10)
    assert bool(info.converged.all())
    assert float(info.residual.max()) < 1e-12


def test_direct_indefinite_is_reported_and_still_inverts():
    A, _ = _spd(8, 10.0, 3)
    A = A - 2.5 * np.eye(8)  # eigenvalues in [-1.5, 7.5]: indefinite but invertible
    B = _rhs(3, 8, 4)
    X, info = solve_direct(torch.as_tensor(A), B)
    assert float(info.eigenvalues[0]) < 0
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


def _sym(P, seed, lam):
    """Symmetric matrix with the given eigenvalues and a random eigenbasis."""
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((P, P)))
    return (Q * lam) @ Q.T


def test_lanczos_full_krylov_space_is_the_exact_solve():
    """n_iter = rank = P: the Ritz pairs are the eigenpairs, the low-rank solve is the
    full inverse (float64, cond 1e3: agreement to ~1e-10 relative)."""
    A, lam = _spd(15, 1e3, 5)
    B = _rhs(3, 15, 6)
    ev, V = lanczos_eigenpairs(_hvp(A), 15, rank=15, n_iter=15,
                               generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(ev.numpy(), lam, rtol=1e-9)
    np.testing.assert_allclose((V @ V.T).numpy(), np.eye(15), atol=1e-10)
    X, info = solve_lowrank(ev, V, B, damping=0.5)
    np.testing.assert_allclose(X.numpy(), _ref(A, B, 0.5), rtol=1e-8, atol=1e-10)
    assert bool(info.converged.all()) and info.method == "arnoldi"


def test_lanczos_top_rank_matches_truncated_eigendecomposition():
    """rank < P: the result is V_k diag(1/(lam_k + d)) V_k^T b over the k eigenvalues of
    largest magnitude (here including a negative one), computed by numpy.linalg.eigh.
    A well-separated top spectrum and n_iter = P make the Ritz pairs exact to rounding."""
    P, k = 30, 4
    lam = np.concatenate([np.linspace(0.1, 1.0, P - k), [-40.0, 20.0, 50.0, 100.0]])
    A = _sym(P, 7, lam)
    B = _rhs(5, P, 8)
    ev, V = lanczos_eigenpairs(_hvp(A), P, rank=k, n_iter=P,
                               generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(ev.numpy(), [-40.0, 20.0, 50.0, 100.0], rtol=1e-9)
    w, U = np.linalg.eigh(A)
    top = np.argsort(-np.abs(w))[:k]
    d = 3.0
    keep = [j for j in top if w[j] + d > 0]  # -40 + 3 <= 0 is dropped
    ref = (B.numpy() @ U[:, keep] / (w[keep] + d)) @ U[:, keep].T
    X, info = solve_lowrank(ev, V, B, damping=d)
    np.testing.assert_allclose(X.numpy(), ref, rtol=1e-8, atol=1e-10)
    assert info.extra["n_nonpositive"] == 1 and not bool(info.converged.any())


def test_lanczos_few_iterations_find_the_top_eigenvalues():
    """Kaniel-Paige: with 40 of 200 iterations the 3 largest eigenvalues (well separated
    from a bulk in [0, 1]) converge to ~1e-8 relative; the bulk does not."""
    P = 200
    lam = np.concatenate([np.random.default_rng(9).uniform(0, 1, P - 3), [10.0, 20.0, 30.0]])
    A = _sym(P, 10, lam)
    ev, V = lanczos_eigenpairs(_hvp(A), P, rank=3, n_iter=40,
                               generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(ev.numpy(), [10.0, 20.0, 30.0], rtol=1e-8)
    # Ritz vectors are eigenvectors: ||A v - lam v|| small
    resid = np.linalg.norm(V.numpy() @ A - ev.numpy()[:, None] * V.numpy(), axis=1)
    assert resid.max() < 1e-6


def test_lanczos_stops_on_an_invariant_subspace():
    """A rank-2 matrix: the Krylov space is exhausted after <= 3 vectors; no division by
    a zero beta, and the two nonzero eigenvalues come out."""
    u = np.random.default_rng(11).standard_normal((2, 12))
    A = u.T @ np.diag([3.0, 7.0]) @ u
    ev, V = lanczos_eigenpairs(_hvp(A), 12, rank=2, n_iter=12,
                               generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(ev.numpy(), np.sort(np.linalg.eigvalsh(A))[-2:], rtol=1e-9)
    assert np.all(np.isfinite(V.numpy()))


def test_lanczos_parameter_errors():
    A, _ = _spd(5, 10.0, 0)
    with pytest.raises(ValueError, match="rank"):
        lanczos_eigenpairs(_hvp(A), 5, rank=0)
    with pytest.raises(ValueError, match="n_iter"):
        lanczos_eigenpairs(_hvp(A), 5, rank=2, n_iter=0)
    ev, V = lanczos_eigenpairs(_hvp(A), 5, rank=2)
    with pytest.raises(ValueError, match="evecs"):
        solve_lowrank(ev, V, _rhs(2, 4, 0))
