"""The test gradients' low-rank basis (hydrattr._core.lowrank) against numpy's SVD.

A sweep is a linear map ``D = A G^T``; the basis ``Q`` and coordinates ``B`` replace it
by ``expand(A Q^T, B) = A (B Q)^T``. Checked here with explicit matrices ``A``: exact
when ``G`` lies in the span (``rank >= rank(G)``, duplicated and linearly combined
rows), the optimal truncation with the thin SVD, close to it with the randomized range
finder, the reported errors equal to the discarded energy, and each column's error
within ``||A||_2 ||e_j||``.
"""
import numpy as np
import pytest
import torch

from hydrattr._core.lowrank import check_rank, expand, lowrank_test_grads

pytestmark = pytest.mark.usefixtures("one_thread")


def _matrix(m, P, spectrum, seed):
    """``U diag(spectrum) V^T`` (m, P) with random orthonormal U, V, float64."""
    rng = np.random.default_rng(seed)
    k = len(spectrum)
    U, _ = torch.linalg.qr(torch.as_tensor(rng.standard_normal((m, k))))
    V, _ = torch.linalg.qr(torch.as_tensor(rng.standard_normal((P, k))))
    return (U * torch.as_tensor(spectrum)) @ V.T


def _reconstruct(lr):
    return lr.coords @ lr.basis


def test_rank_at_least_m_spans_every_test_gradient():
    G = torch.as_tensor(np.random.default_rng(0).standard_normal((12, 50)))
    for rank in (12, 13, 1000):
        lr = lowrank_test_grads(G, rank)
        assert lr.rank == 12
        np.testing.assert_allclose(_reconstruct(lr).numpy(), G.numpy(), rtol=0, atol=1e-13)
        np.testing.assert_allclose((lr.basis @ lr.basis.T).numpy(), np.eye(12), atol=1e-14)
        assert lr.truncation_error < 1e-14
        assert lr.column_errors.max() < 1e-14


def test_duplicated_and_combined_rows_cost_only_their_span():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((4, 80))
    W = rng.standard_normal((30, 4))       # 30 linear combinations of 4 gradients
    rows = np.vstack([base, base[[0, 2, 2]], W @ base])
    for dtype in (torch.float64, torch.float32):
        G = torch.as_tensor(rows, dtype=dtype)
        # rounding-only directions are dropped: 4 vectors whatever the rank asked for
        for rank in (4, 37, 0.999999):
            lr = lowrank_test_grads(G, rank)
            assert lr.rank == 4, (dtype, rank, lr.singular_values)
            rtol = 1e-13 if dtype == torch.float64 else 1e-6
            np.testing.assert_allclose(_reconstruct(lr).numpy(), G.double().numpy(),
                                       rtol=0, atol=rtol * float(G.abs().max()))
            # what is left out is rounding (the error is a difference of energies)
            assert lr.truncation_error < 1e-12


def _unit_rows(G):
    return G / G.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("normalize", [False, True])
def test_truncation_is_the_svd_optimum_and_reports_the_discarded_energy(normalize):
    G = _matrix(40, 200, np.logspace(0, -3, 40), 2)
    W = _unit_rows(G) if normalize else G  # what the basis is the best of
    s = torch.linalg.svdvals(W).numpy()
    for r in (1, 5, 17):
        lr = lowrank_test_grads(G, r, normalize=normalize)  # 5 (r + 10) >= 40: thin SVD
        assert lr.rank == r
        optimum = (s[r:] ** 2).sum() / (s ** 2).sum()
        assert abs(lr.truncation_error - optimum) <= 1e-10 * optimum
        resid = G - _reconstruct(lr)
        per_col = (resid ** 2).sum(1) / (G ** 2).sum(1)
        np.testing.assert_allclose(lr.column_errors.numpy(), per_col.numpy(), rtol=1e-8,
                                   atol=1e-15)
        total = per_col.mean() if normalize else (resid ** 2).sum() / (G ** 2).sum()
        assert abs(float(total) - lr.truncation_error) < 1e-12
    # the unit-row basis approximates the worst-approximated columns better
    worst = {nz: lowrank_test_grads(G, 5, normalize=nz).column_errors.max() for nz in
             (False, True)}
    assert worst[True] < worst[False]


@pytest.mark.parametrize("normalize", [False, True])
def test_energy_target_takes_the_fewest_directions(normalize):
    G = _matrix(40, 200, np.logspace(0, -3, 40), 3)
    s = torch.linalg.svdvals(_unit_rows(G) if normalize else G).numpy()
    kept = np.cumsum(s ** 2) / (s ** 2).sum()
    for frac in (0.5, 0.9, 0.99, 0.9999):
        lr = lowrank_test_grads(G, frac, normalize=normalize)
        assert lr.rank == int(np.argmax(kept >= frac)) + 1
        assert lr.truncation_error <= 1 - frac + 1e-12


@pytest.mark.parametrize("normalize", [False, True])
def test_randomized_range_finder_is_close_to_the_optimum(normalize):
    # m = 200 rows, rank 8 + 10 oversampling: 5 * 18 < 200, the randomized finder runs
    s = np.concatenate([np.logspace(0, -1, 8), 0.05 * np.logspace(0, -2, 192)])
    G = _matrix(200, 500, s, 4)
    sw = torch.linalg.svdvals(_unit_rows(G) if normalize else G).numpy()
    lr = lowrank_test_grads(G, 8, normalize=normalize, seed=0)
    assert lr.rank == 8
    optimum = (sw[8:] ** 2).sum() / (sw ** 2).sum()
    assert optimum * (1 - 1e-9) <= lr.truncation_error <= 1.01 * optimum, \
        (lr.truncation_error, optimum)
    np.testing.assert_allclose((lr.basis @ lr.basis.T).numpy(), np.eye(8), atol=1e-13)
    # the reported error is measured for the basis returned, not estimated
    per_col = ((G - _reconstruct(lr)) ** 2).sum(1) / (G ** 2).sum(1)
    np.testing.assert_allclose(lr.column_errors.numpy(), per_col.numpy(), rtol=1e-8)
    # seeded: the same basis twice
    assert torch.equal(lowrank_test_grads(G, 8, normalize=normalize, seed=0).basis,
                       lr.basis)
    # and the energy target on the randomized path widens until it is reached
    lr9 = lowrank_test_grads(G, 0.9, normalize=normalize)
    assert lr9.truncation_error <= 0.1


def test_expand_is_the_sweep_of_the_projected_gradients_and_obeys_the_bound():
    rng = np.random.default_rng(5)
    A = torch.as_tensor(rng.standard_normal((60, 120)))   # the sweep: D = A G^T
    G = _matrix(25, 120, np.logspace(0, -2, 25), 6)
    D = A @ G.T
    for rank in (3, 10, 25):
        lr = lowrank_test_grads(G, rank)
        D_lr = expand(A @ lr.basis.T, lr.coords)           # one "sweep" of r columns
        proj = G @ lr.basis.T @ lr.basis
        np.testing.assert_allclose(D_lr.numpy(), (A @ proj.T).numpy(), rtol=1e-12,
                                   atol=1e-12 * float(D.abs().max()))
        # column j is off by A e_j, within ||A||_2 ||e_j||
        err = (D_lr - D).norm(dim=0)
        e = torch.sqrt(lr.column_errors * (G ** 2).sum(1))
        bound = torch.linalg.matrix_norm(A, ord=2) * e
        assert torch.all(err <= bound * (1 + 1e-9) + 1e-12)
        if rank == 25:
            np.testing.assert_allclose(D_lr.numpy(), D.numpy(), rtol=1e-10,
                                       atol=1e-12 * float(D.abs().max()))


def test_stats_part_is_in_the_same_basis():
    rng = np.random.default_rng(7)
    G = torch.as_tensor(rng.standard_normal((9, 30)))
    GR = torch.as_tensor(rng.standard_normal((9, 6)))
    lr = lowrank_test_grads(G, 9, stats_grads=GR)
    assert lr.basis.shape == (9, 30) and lr.stats_basis.shape == (9, 6)
    np.testing.assert_allclose((lr.coords @ lr.basis).numpy(), G.numpy(), atol=1e-13)
    np.testing.assert_allclose((lr.coords @ lr.stats_basis).numpy(), GR.numpy(), atol=1e-13)
    # truncated: the energy is that of the joint rows [G, G_R]
    J = torch.cat([G, GR], 1)
    for normalize in (False, True):
        s = torch.linalg.svdvals(_unit_rows(J) if normalize else J).numpy()
        lr3 = lowrank_test_grads(G, 3, stats_grads=GR, normalize=normalize)
        assert abs(lr3.truncation_error - (s[3:] ** 2).sum() / (s ** 2).sum()) < 1e-12


def test_zero_gradients_need_no_sweep():
    lr = lowrank_test_grads(torch.zeros(5, 7), 3)
    assert lr.rank == 0 and lr.coords.shape == (5, 0)
    assert lr.truncation_error == 0.0 and torch.all(lr.column_errors == 0)
    assert expand(torch.zeros(4, 0, dtype=torch.float64), lr.coords).shape == (4, 5)
    # a zero row among others: no error of its own, and not in the mean
    G = torch.as_tensor(np.random.default_rng(8).standard_normal((4, 9)))
    G[2] = 0
    lr = lowrank_test_grads(G, 4)
    assert lr.rank == 3 and lr.column_errors[2] == 0 and lr.truncation_error < 1e-14


@pytest.mark.parametrize("bad", [0, -3, 1.0, 0.0, 1.5, -0.2, True, "8", None])
def test_bad_ranks_are_refused(bad):
    with pytest.raises(ValueError, match="rank"):
        check_rank(bad)
    with pytest.raises(ValueError, match="rank"):
        lowrank_test_grads(torch.ones(3, 4), bad)


def test_good_ranks_pass_through():
    assert check_rank(np.int64(4)) == 4 and isinstance(check_rank(np.int64(4)), int)
    assert check_rank(np.float32(0.5)) == 0.5
