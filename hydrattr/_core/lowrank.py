"""A low-rank basis of the test gradients, for exact sweeps whose count does not grow
with the number of test points (pure torch).

Every sweep over the recorded trajectory (:func:`~hydrattr._core.sweep.exact_adjoint`,
:func:`~hydrattr._core.sweep.fast_replay`) is linear in its terminal test gradients:
``D = A G^T`` for a fixed ``(n_tracked x P)`` map ``A``. With BatchNorm running
statistics it is linear in the pair ``[G, G_R]`` (the gradients with respect to the
parameters and to the final running statistics), which is treated here as one row
vector of ``P + n_stats`` entries.

:func:`lowrank_test_grads` finds an orthonormal basis ``Q`` (``r x P``) of (most of) the
row space of ``G`` (``m x P``) and the coordinates ``B = G Q^T`` (``m x r``) of each
test gradient in it. A sweep on ``Q`` (``r`` columns instead of ``m``) gives
``D_Q = A Q^T``, and :func:`expand` returns ``D_Q B^T = A (Q^T Q G^T)``: the sweep's
``D`` for the test gradients projected onto ``span(Q)``. It is exact on that span;
test point ``j``'s column is off by ``-A e_j`` with ``e_j = g_j - Q^T Q g_j`` the part
of its gradient outside the span, so ``|D_j - D_lr_j| <= ||A||_2 ||e_j||``.
``column_errors`` reports ``||e_j||^2 / ||g_j||^2`` per test point and
``truncation_error`` their mean: the basis is found for the test gradients scaled to
unit norm (``normalize``), so that every test point, not the few of largest loss,
counts alike. On an MNIST MLP the gradients' norms spread over three orders of
magnitude, and at the same rank this basis roughly halves the per-column rank
disagreement with exact mode (``benchmarks/accuracy/bench_lowrank.py``).

The basis comes from a thin SVD (the ``rank`` largest singular directions) when ``G``
is short enough for it to be cheap, else from a randomized range finder with power
iterations (Halko, Martinsson & Tropp, 2011, Algorithms 4.4 and 5.1); either way ``B``
and the reported errors are computed exactly for the ``Q`` returned. Directions whose
singular value is below ``16 eps`` (of ``G``'s dtype) times the largest are dropped:
they carry only rounding, so duplicated or linearly dependent test points cost no
sweep.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import torch

__all__ = ["LowRankTestGrads", "lowrank_test_grads", "expand"]


@dataclass
class LowRankTestGrads:
    """An orthonormal basis of the test gradients and each test gradient's coordinates.

    Attributes
    ----------
    basis : Tensor (r, P), float64
        Orthonormal rows (the parameter part of the joint basis with ``stats_basis``),
        ordered by decreasing singular value: the "test gradients" to sweep.
    stats_basis : Tensor (r, n_stats) or None
        The running-statistics part of the same basis vectors (with BatchNorm).
    coords : Tensor (m, r), float64
        ``[G, G_R] [basis, stats_basis]^T``: test gradient ``j`` projected onto the span
        is ``coords[j] @ [basis, stats_basis]``.
    singular_values : Tensor (r,)
        The singular values of the projected gradients (``coords``'s column norms).
    truncation_error : float
        Fraction of the energy outside the span (0: exact up to rounding): the mean of
        ``column_errors`` (with ``normalize=False``: of ``||[G, G_R]||_F^2``).
    column_errors : Tensor (m,)
        The same per test point: ``||e_j||^2 / ||g_j||^2`` (0 for a zero gradient).
    """

    basis: torch.Tensor
    stats_basis: torch.Tensor | None
    coords: torch.Tensor
    singular_values: torch.Tensor
    truncation_error: float
    column_errors: torch.Tensor

    @property
    def rank(self):
        return self.basis.shape[0]


def check_rank(rank):
    """``rank`` as :func:`lowrank_test_grads` takes it: an int >= 1 or a float in (0, 1)."""
    if isinstance(rank, bool) or not isinstance(rank, (Integral, Real)):
        raise ValueError(f"rank must be an int >= 1 or a float in (0, 1), got {rank!r}.")
    if isinstance(rank, Integral):
        if rank < 1:
            raise ValueError(f"rank must be an int >= 1 or a float in (0, 1), got {rank!r}.")
        return int(rank)
    if not 0 < rank < 1:
        raise ValueError(
            f"rank as a float is the fraction of the test gradients' energy to keep and "
            f"must lie in (0, 1), got {rank!r} (an int >= 1 is a number of directions).")
    return float(rank)


def _svd_basis(J, width, n_iter, generator):
    """Right singular directions of ``J`` (m, P) in ``width`` columns: ``(V (k, P), S (k,))``
    with ``k <= width``; exact thin SVD when cheap, else a randomized range finder."""
    m, P = J.shape
    k = min(m, P)
    if width >= k or 5 * width >= m:
        # thin SVD: ~4 m^2 P flops, less than the randomized finder's ~20 m P width
        _, S, Vh = torch.linalg.svd(J, full_matrices=False)
        return Vh[:width], S[:width]
    omega = torch.randn(m, width, generator=generator, dtype=J.dtype).to(J.device)
    Y = J.T @ omega  # (P, width): a sample of the row space
    for _ in range(n_iter):  # power iterations, re-orthonormalised each half step
        Y, _ = torch.linalg.qr(Y)
        Z, _ = torch.linalg.qr(J @ Y)
        Y = J.T @ Z
    Y, _ = torch.linalg.qr(Y)  # (P, width) orthonormal columns
    _, S, Wh = torch.linalg.svd(J @ Y, full_matrices=False)  # (m, width) = U S Wh
    return Wh @ Y.T, S


def lowrank_test_grads(test_grads, rank, *, stats_grads=None, normalize=True,
                       oversample=10, n_iter=4, seed=0):
    """A basis of the test gradients' row space for a sweep of ``r`` columns, not ``m``.

    Parameters
    ----------
    test_grads : Tensor (m, P)
        Test gradients ``G`` (any float dtype; the basis is computed in float64).
    rank : int or float
        An int: at most that many directions (the largest singular directions; all of
        them, ``min(m, P)``, when ``rank >= m``). A float in (0, 1): the fewest
        directions that keep at least that fraction of the energy (with ``normalize``:
        on average over the test points, that fraction of each one's squared norm).
    stats_grads : Tensor (m, n_stats) or None
        Gradients with respect to BatchNorm running statistics: the basis is of the
        joint rows ``[G, G_R]``, whose pair the sweep is linear in.
    normalize : bool, default=True
        Find the basis of the test gradients scaled to unit norm, so that every test
        point counts alike: each column of ``C`` is then approximated about equally well
        (per-column rank agreement is what attributions are read by). Without it the
        basis maximises the energy ``||G||_F^2`` kept, which the few test points of
        largest loss dominate. Either way ``coords`` are of the unscaled gradients.
    oversample, n_iter : int
        The randomized range finder's extra columns and power iterations (only used
        when ``rank`` directions are few beside ``m``).
    seed : int
        Seeds the range finder's Gaussian test matrix (a CPU generator).

    Returns
    -------
    LowRankTestGrads
        ``truncation_error`` is the fraction of the (with ``normalize``: unit-scaled)
        test gradients' energy outside the span, i.e. with ``normalize`` the mean of
        ``column_errors`` over the non-zero test gradients.
    """
    rank = check_rank(rank)
    if test_grads.dim() != 2:
        raise ValueError(f"test_grads must be (m, P), got shape {tuple(test_grads.shape)}")
    m, P = test_grads.shape
    eps = torch.finfo(test_grads.dtype).eps
    J = test_grads.to(torch.float64)
    if stats_grads is not None:
        J = torch.cat([J, stats_grads.to(J.device, torch.float64)], dim=1)
    col_energy = (J * J).sum(dim=1)
    nonzero = col_energy > 0
    # the rows the basis is found for: unit-scaled (zero rows stay zero) or as they are
    W = J / torch.where(nonzero, col_energy.sqrt(), torch.ones_like(col_energy))[:, None] \
        if normalize else J
    total = float((W * W).sum())
    generator = torch.Generator().manual_seed(int(seed))
    k_max = min(W.shape)
    if isinstance(rank, int):
        V, S = _svd_basis(W, min(rank + oversample, k_max), n_iter, generator)
        r = min(rank, len(S))
    else:  # energy target: widen the range finder until the kept directions reach it
        width = min(32, k_max)
        while True:
            V, S = _svd_basis(W, width, n_iter, generator)
            kept = torch.cumsum(S * S, 0) / total if total > 0 else torch.ones_like(S)
            reached = torch.nonzero(kept >= rank)
            if len(reached) or width >= k_max:
                r = int(reached[0]) + 1 if len(reached) else len(S)
                break
            width = min(2 * width, k_max)
    if len(S) and float(S[0]) > 0:  # directions of rounding only cost a sweep for nothing
        r = min(r, int((S > 16 * eps * S[0]).sum()))
    else:
        r = 0
    V = V[:r]
    coords = J @ V.T  # (m, r): exact for the V returned, whatever found it
    resid = (col_energy - (coords * coords).sum(dim=1)).clamp_min(0)
    column_errors = torch.where(nonzero, resid / col_energy.clamp_min(1e-300),
                                torch.zeros_like(resid))
    if not bool(nonzero.any()):
        trunc = 0.0
    elif normalize:
        trunc = float(column_errors[nonzero].mean())
    else:
        trunc = float(resid.sum() / col_energy.sum())
    return LowRankTestGrads(
        basis=V[:, :P], stats_basis=None if stats_grads is None else V[:, P:],
        coords=coords, singular_values=coords.norm(dim=0), truncation_error=trunc,
        column_errors=column_errors)


def expand(D_basis, coords):
    """``D`` of the projected test gradients from the sweep on the basis: ``D_Q B^T``.

    ``D_basis`` (n, r) from a sweep on :attr:`LowRankTestGrads.basis`, ``coords`` (m, r)
    (:attr:`LowRankTestGrads.coords`); returns (n, m) float64 on ``D_basis``'s device.
    """
    coords = coords.to(D_basis.device, torch.float64)
    if D_basis.shape[1] != coords.shape[1]:
        raise ValueError(f"D_basis has {D_basis.shape[1]} columns but the basis "
                         f"{coords.shape[1]} vectors")
    return D_basis.to(torch.float64) @ coords.T
