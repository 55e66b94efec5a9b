"""Inverse-Hessian-vector solvers for influence functions (pure torch).

Every solver answers ``(H + damping * I) x_k = b_k`` for a block of right-hand sides
``B`` of shape ``(m, P)`` (one row per right-hand side) and returns ``X`` of the same
shape together with a :class:`SolverInfo`. The Hessian is only reached through a
closure:

* ``hvp(V) -> H V`` for ``V`` of shape ``(m, P)`` (rows are vectors), deterministic
  (the full objective), used by :func:`dense_hessian` and :func:`solve_cg`;
* ``hvp(V, rows) -> H_rows V``, an unbiased estimate of ``H V`` from the sample rows
  ``rows`` (a ``LongTensor``), used by :func:`solve_lissa`.

``damping`` is added by the solvers, never by the closure.

* :func:`dense_hessian` + :func:`solve_direct`: the explicit ``P x P`` matrix, assembled
  from HVPs against blocks of identity columns (forward-over-reverse, the same
  computation as a chunked ``jacfwd(jacrev(f))``), symmetrised and eigendecomposed.
  Reports the spectrum; solves with ``V diag(1/lambda) V^T``, treating eigenvalues
  below ``rcond * max|lambda|`` in magnitude as zero (pseudo-inverse).
* :func:`solve_cg`: conjugate gradients run independently for every right-hand side
  (one batched HVP per iteration for all still-active columns). Stops a column when
  its residual reaches ``tol * ||b||`` or when it meets non-positive curvature.
* :func:`solve_lissa`: the stochastic recursion of Agarwal et al. (2017) as used by
  Koh & Liang (2017): ``h_0 = b``, ``h_t = b + h_{t-1} - (H_t + damping I) h_{t-1} / scale``
  with ``H_t`` estimated on a random batch, ``x = h_T / scale``, averaged over
  ``repeat`` runs. It converges when every eigenvalue of ``(H + damping I) / scale``
  lies in ``(0, 2)``; otherwise the iterates grow geometrically, which is detected
  (non-finite values, or ``||h_t|| > blowup * (t + 1) * ||b||``, impossible for a
  convergent recursion) and raised as :class:`LissaDivergenceError` naming ``scale``.
* :func:`lanczos_eigenpairs` + :func:`solve_lowrank`: the "Arnoldi" influence of
  Schioppa et al. (2022), as Captum and pyDVL implement it. A Krylov space of ``n_iter``
  HVPs (Lanczos, the symmetric Arnoldi process, with full reorthogonalisation) gives
  Ritz pairs; the ``rank`` largest in magnitude stand in for ``H`` and the solve is
  ``V diag(1 / (lambda + damping)) V^T b``: the inverse restricted to the top
  eigenspace, the complement dropped. The decomposition is computed once and serves
  every right-hand side, so its cost does not grow with the number of test points.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "SolverInfo",
    "LissaDivergenceError",
    "dense_hessian",
    "solve_direct",
    "solve_cg",
    "solve_lissa",
    "lanczos_eigenpairs",
    "solve_lowrank",
]


class LissaDivergenceError(RuntimeError):
    """The LiSSA recursion diverged (its ``scale`` is too small, or ``H`` is indefinite)."""


@dataclass
class SolverInfo:
    """What a solver reports alongside its solution.

    Attributes
    ----------
    method : str
    converged : torch.Tensor of bool, shape (m,)
        Per right-hand side. ``direct``: the damped matrix is positive definite.
        ``cg``: the relative residual reached ``tol``. ``lissa``: finished without
        divergence (the recursion has no residual test of its own).
    n_iter : torch.Tensor of int, shape (m,)
        CG iterations (direct: 0; lissa: ``depth * repeat``).
    residual : torch.Tensor or None, shape (m,)
        ``||(H + damping I) x - b|| / ||b||`` (direct, cg; for cg the true residual
        recomputed with one extra HVP).
    eigenvalues : torch.Tensor or None
        Direct: eigenvalues of the *undamped* symmetrised Hessian, ascending.
    negative_curvature : torch.Tensor of bool or None, shape (m,)
        CG: the column met a direction with ``p^T (H + damping I) p <= 0`` and stopped.
    """

    method: str
    converged: torch.Tensor
    n_iter: torch.Tensor
    residual: torch.Tensor | None = None
    eigenvalues: torch.Tensor | None = None
    negative_curvature: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def _check_block(B):
    if not isinstance(B, torch.Tensor) or B.dim() != 2:
        raise ValueError("B must be a 2-d tensor of right-hand sides, shape (m, n_params).")
    return B


def _check_damping(damping):
    damping = float(damping)
    if not damping >= 0:
        raise ValueError(f"damping must be a float >= 0, got {damping!r}.")
    return damping


def dense_hessian(hvp, n_params, *, dtype=torch.float64, device=None, block_size=64,
                  progress=None):
    """The explicit ``(P, P)`` Hessian from HVPs against identity blocks, symmetrised.

    Parameters
    ----------
    hvp : callable
        ``hvp(V) -> H V`` for ``V`` of shape ``(k, P)``.
    n_params : int
    dtype, device : torch dtype and device of the result.
    block_size : int
        Identity columns per HVP call (memory ~ ``block_size`` forward-over-reverse
        passes at once).
    progress : callable or None
        ``progress(total, desc)`` returning a tqdm-like bar.

    Returns
    -------
    H : torch.Tensor of shape (P, P)
        ``(H + H^T) / 2`` (the HVPs are exact up to rounding; symmetrising removes it).
    """
    P = int(n_params)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}.")
    H = torch.empty(P, P, dtype=dtype, device=device)
    bar = progress(P, "Hessian columns") if progress is not None else None
    for s in range(0, P, block_size):
        e = min(P, s + block_size)
        eye = torch.zeros(e - s, P, dtype=dtype, device=device)
        eye[torch.arange(e - s), torch.arange(s, e)] = 1
        H[s:e] = hvp(eye).to(dtype)
        if bar is not None:
            bar.update(e - s)
    if bar is not None:
        bar.close()
    return (H + H.T) / 2


def solve_direct(H, B, *, damping=0.0, rcond=None, eigh=None):
    """Solve ``(H + damping I) X^T = B^T`` through a symmetric eigendecomposition.

    Parameters
    ----------
    H : torch.Tensor of shape (P, P)
        Symmetric matrix (e.g. from :func:`dense_hessian`).
    B : torch.Tensor of shape (m, P)
    damping : float >= 0
    rcond : float or None
        Eigenvalues of the damped matrix with ``|lambda| <= rcond * max|lambda|`` are
        treated as zero (pseudo-inverse). Default: ``P * eps`` of the dtype.
    eigh : tuple or None
        ``(eigenvalues, eigenvectors)`` of the symmetrised ``H`` from an earlier call of
        ``torch.linalg.eigh``, to solve many blocks with one decomposition.

    Returns
    -------
    X : torch.Tensor of shape (m, P)
    info : SolverInfo
        ``eigenvalues`` of the undamped ``H``; ``converged`` is True for every column
        iff ``H + damping I`` is positive definite (smallest eigenvalue above the
        ``rcond`` threshold).
    """
    B = _check_block(B)
    damping = _check_damping(damping)
    if H.dim() != 2 or H.shape[0] != H.shape[1] or H.shape[0] != B.shape[1]:
        raise ValueError(f"H must be square with side n_params={B.shape[1]}, got {tuple(H.shape)}.")
    Hs = (H + H.T) / 2
    evals, evecs = torch.linalg.eigh(Hs) if eigh is None else eigh
    lam = evals + damping
    if rcond is None:
        rcond = H.shape[0] * torch.finfo(H.dtype).eps
    cutoff = float(rcond) * float(lam.abs().max()) if lam.numel() else 0.0
    inv = torch.where(lam.abs() > cutoff, 1.0 / lam, torch.zeros_like(lam))
    Bd = B.to(H.dtype)
    X = ((Bd @ evecs) * inv) @ evecs.T
    pd = bool(lam[0] > cutoff)
    m = B.shape[0]
    resid = torch.linalg.vector_norm(X @ Hs + damping * X - Bd, dim=1)
    bnorm = torch.linalg.vector_norm(Bd, dim=1).clamp_min(torch.finfo(H.dtype).tiny)
    info = SolverInfo("direct", converged=torch.full((m,), pd, dtype=torch.bool),
                      n_iter=torch.zeros(m, dtype=torch.long), residual=(resid / bnorm).cpu(),
                      eigenvalues=evals.cpu(),
                      extra={"n_nonpositive": int((lam <= cutoff).sum()),
                             "n_zeroed": int((lam.abs() <= cutoff).sum()),
                             "cutoff": cutoff, "damping": damping})
    return X.to(B.dtype), info


def solve_cg(hvp, B, *, damping=0.0, tol=1e-6, maxiter=None, x0=None):
    """Batched conjugate gradients for ``(H + damping I) x_k = b_k``.

    Each right-hand side runs its own CG recursion (its own step sizes); one call of
    ``hvp`` per iteration serves all columns still active.

    Parameters
    ----------
    hvp : callable
        ``hvp(V) -> H V`` for ``V`` of shape ``(k, P)``.
    B : torch.Tensor of shape (m, P)
    damping : float >= 0
    tol : float > 0
        Relative residual ``||r_k|| / ||b_k||`` at which a column stops.
    maxiter : int or None
        Iterations at most (default ``10 * P``, as scipy's ``cg``).
    x0 : torch.Tensor or None
        Starting guess, shape (m, P) (default zeros).

    Returns
    -------
    X : torch.Tensor of shape (m, P)
    info : SolverInfo
        ``converged``, ``n_iter``, ``residual`` (true relative residual, recomputed)
        and ``negative_curvature`` per column.
    """
    B = _check_block(B)
    damping = _check_damping(damping)
    if not float(tol) > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}.")
    m, P = B.shape
    maxiter = 10 * P if maxiter is None else int(maxiter)
    if maxiter < 0:
        raise ValueError(f"maxiter must be >= 0, got {maxiter!r}.")

    def A(V):
        return hvp(V) + damping * V

    tiny = torch.finfo(B.dtype).tiny
    bnorm = torch.linalg.vector_norm(B, dim=1)
    X = torch.zeros_like(B) if x0 is None else x0.clone().to(B)
    R = B - A(X) if x0 is not None else B.clone()
    Pd = R.clone()
    rs = (R * R).sum(dim=1)
    n_iter = torch.zeros(m, dtype=torch.long, device=B.device)
    negcurv = torch.zeros(m, dtype=torch.bool, device=B.device)
    thresh = (float(tol) * bnorm) ** 2
    for _ in range(maxiter):
        active = (rs > thresh) & ~negcurv
        if not bool(active.any()):
            break
        idx = active.nonzero().squeeze(1)
        p = Pd[idx]
        Ap = A(p)
        pAp = (p * Ap).sum(dim=1)
        bad = pAp <= 0
        if bool(bad.any()):
            negcurv[idx[bad]] = True
        good = ~bad
        idx, p, Ap, pAp = idx[good], p[good], Ap[good], pAp[good]
        if idx.numel() == 0:
            continue
        alpha = rs[idx] / pAp
        X[idx] += alpha[:, None] * p
        R[idx] -= alpha[:, None] * Ap
        rs_new = (R[idx] * R[idx]).sum(dim=1)
        beta = rs_new / rs[idx].clamp_min(tiny)
        Pd[idx] = R[idx] + beta[:, None] * p
        rs[idx] = rs_new
        n_iter[idx] += 1
    true_r = torch.linalg.vector_norm(A(X) - B, dim=1)
    rel = true_r / bnorm.clamp_min(tiny)
    # converged: the recursive residual reached tol and the recomputed one agrees
    # within a factor 10 (rounding drift of the recursion is tolerated, not more)
    converged = (rs <= thresh) & (rel <= 10 * float(tol)) & ~negcurv
    converged |= bnorm == 0
    info = SolverInfo("cg", converged=converged.cpu(), n_iter=n_iter.cpu(),
                      residual=rel.cpu(), negative_curvature=negcurv.cpu(),
                      extra={"tol": float(tol), "maxiter": maxiter, "damping": damping})
    return X, info


def solve_lissa(hvp, B, *, n_samples, batch_size=1, scale=10.0, depth=1000, repeat=1,
                damping=0.0, generator=None, blowup=1e3, device=None, progress=None):
    """LiSSA: stochastic Neumann-series estimate of ``(H + damping I)^{-1} B``.

    Parameters
    ----------
    hvp : callable
        ``hvp(V, rows) -> H_rows V``: Hessian-vector products estimated on the sample
        rows ``rows`` (a 1-d ``LongTensor`` into ``range(n_samples)``).
    B : torch.Tensor of shape (m, P)
    n_samples : int
        Rows to draw batches from.
    batch_size : int
        Rows per recursion step (drawn uniformly with replacement).
    scale : float > 0
        Must exceed ``lambda_max(H + damping I) / 2`` (in practice the largest
        eigenvalue of the batch Hessians) for the recursion to converge.
    depth : int
        Recursion steps ``T`` per repeat; the series is truncated after ``T`` terms, so
        ``depth`` must be large compared with ``scale / lambda_min``.
    repeat : int
        Independent runs averaged.
    damping : float >= 0
    generator : torch.Generator or None
        Source of the batch indices (CPU generator).
    blowup : float
        Divergence threshold: ``||h_t|| > blowup * (t + 1) * ||b||`` (a convergent
        recursion has ``||h_t|| <= (t + 1) ||b||`` when ``0 <= lambda/scale <= 2``).
    device : torch device for the row indices (default ``B.device``).
    progress : callable or None
        ``progress(total, desc)`` returning a tqdm-like bar.

    Returns
    -------
    X : torch.Tensor of shape (m, P)
    info : SolverInfo

    Raises
    ------
    LissaDivergenceError
        When the iterates become non-finite or blow up; the message names ``scale``.
    """
    B = _check_block(B)
    damping = _check_damping(damping)
    scale = float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be a float > 0, got {scale!r}.")
    for name, val in (("depth", depth), ("repeat", repeat), ("batch_size", batch_size),
                      ("n_samples", n_samples)):
        if int(val) != val or int(val) < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}.")
    depth, repeat, batch_size, n_samples = int(depth), int(repeat), int(batch_size), int(n_samples)
    device = B.device if device is None else device
    m = B.shape[0]
    bnorm = torch.linalg.vector_norm(B, dim=1)
    bmax = float(bnorm.max()) if m else 0.0
    total = torch.zeros_like(B)
    bar = progress(depth * repeat, "LiSSA") if progress is not None else None
    for r in range(repeat):
        h = B.clone()
        for t in range(depth):
            rows = torch.randint(n_samples, (batch_size,), generator=generator).to(device)
            h = B + h - (hvp(h, rows) + damping * h) / scale
            hn = torch.linalg.vector_norm(h, dim=1)
            finite = bool(torch.isfinite(h).all())
            if not finite or float(hn.max()) > blowup * (t + 1) * max(bmax, 1e-300):
                if bar is not None:
                    bar.close()
                what = "non-finite values (NaN/inf)" if not finite else (
                    f"norm blow-up (||h_t|| = {float(hn.max()):.3g} > {blowup:g} * (t+1) * ||b||"
                    f" = {blowup * (t + 1) * bmax:.3g})")
                raise LissaDivergenceError(
                    f"LiSSA diverged at recursion step {t + 1} of repeat {r + 1}: {what}. "
                    f"scale={scale:g} is too small for the Hessian (the recursion needs every "
                    f"eigenvalue of (H + damping*I)/scale in (0, 2), i.e. scale > "
                    f"lambda_max/2 of the batch Hessians), or H has negative eigenvalues "
                    f"(damping={damping:g}): increase scale, or add damping.")
            if bar is not None:
                bar.update(1)
        total += h / scale
    if bar is not None:
        bar.close()
    X = total / repeat
    info = SolverInfo("lissa", converged=torch.ones(m, dtype=torch.bool),
                      n_iter=torch.full((m,), depth * repeat, dtype=torch.long),
                      extra={"scale": scale, "depth": depth, "repeat": repeat,
                             "batch_size": batch_size, "damping": damping})
    return X, info


def lanczos_eigenpairs(hvp, n_params, *, rank, n_iter=None, dtype=torch.float64, device=None,
                       generator=None, progress=None):
    """Top-``rank`` eigenpairs (largest ``|lambda|``) of a symmetric ``H`` from HVPs.

    Lanczos with full reorthogonalisation (Gram-Schmidt twice against every earlier
    basis vector) started from a seeded Gaussian vector. With ``n_iter = n_params`` the
    Ritz pairs are the exact eigenpairs up to rounding; with fewer, the extreme
    eigenvalues converge first (Kaniel-Paige), which is why ``n_iter`` is a multiple of
    ``rank``.

    Parameters
    ----------
    hvp : callable
        ``hvp(V) -> H V`` for ``V`` of shape ``(k, P)``.
    n_params : int
    rank : int >= 1
        Eigenpairs returned (at most the Krylov dimension reached).
    n_iter : int or None
        Krylov dimension (HVPs). Default ``min(P, max(2 * rank + 1, 20))`` (pyDVL's
        default).
    dtype, device : of the basis (float64 recommended: reorthogonalisation).
    generator : torch.Generator or None
        Seeds the start vector (CPU generator).
    progress : callable or None
        ``progress(total, desc)`` returning a tqdm-like bar.

    Returns
    -------
    evals : torch.Tensor of shape (k,)
        Ritz values, ascending, ``k <= rank``.
    evecs : torch.Tensor of shape (k, P)
        Orthonormal Ritz vectors (rows).
    """
    P = int(n_params)
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}.")
    n_iter = min(P, max(2 * rank + 1, 20)) if n_iter is None else int(n_iter)
    if n_iter < 1:
        raise ValueError(f"n_iter must be a positive int, got {n_iter!r}.")
    n_iter = min(n_iter, P)
    Q = torch.zeros(n_iter, P, dtype=dtype, device=device)
    q = torch.randn(P, generator=generator, dtype=dtype).to(device)
    q /= torch.linalg.vector_norm(q)
    alpha, beta = [], []
    bar = progress(n_iter, "Lanczos HVPs") if progress is not None else None
    k = 0
    for k in range(n_iter):
        Q[k] = q
        w = hvp(q[None])[0].to(dtype)
        alpha.append(float(w @ q))
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - (Q[:k + 1] @ w) @ Q[:k + 1]
        b = float(torch.linalg.vector_norm(w))
        if bar is not None:
            bar.update(1)
        scale = max(abs(a) for a in alpha) or 1.0
        if k == n_iter - 1 or b <= P * torch.finfo(dtype).eps * scale:
            break  # Krylov space exhausted (invariant subspace found) or budget spent
        beta.append(b)
        q = w / b
    if bar is not None:
        bar.close()
    m = k + 1
    T = torch.diag(torch.tensor(alpha[:m], dtype=torch.float64))
    if m > 1:
        off = torch.tensor(beta[:m - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    theta, S = torch.linalg.eigh(T)
    keep = torch.argsort(theta.abs(), descending=True)[:rank]
    keep = keep[torch.argsort(theta[keep])]  # ascending, as eigh
    evecs = S[:, keep].T.to(dtype=dtype, device=Q.device) @ Q[:m]
    return theta[keep].to(dtype=dtype, device=Q.device), evecs


def solve_lowrank(evals, evecs, B, *, damping=0.0):
    """``V diag(1 / (lambda + damping)) V^T b`` for each row ``b`` of ``B``.

    The inverse of ``H + damping I`` restricted to the span of ``evecs`` (rows,
    orthonormal), the complement dropped (Schioppa et al. 2022). Eigenpairs with
    ``lambda + damping <= 0`` are dropped too (the quadratic model has no minimum
    along them); ``info.extra["n_nonpositive"]`` counts them.

    Returns
    -------
    X : torch.Tensor of shape (m, P)
    info : SolverInfo
        ``eigenvalues``: the undamped Ritz values used, ascending; ``converged`` is
        True for every column iff none was dropped; ``residual`` is None (the
        projection is no solve of the full system).
    """
    B = _check_block(B)
    damping = _check_damping(damping)
    if evecs.dim() != 2 or evecs.shape[1] != B.shape[1] or evals.shape != evecs.shape[:1]:
        raise ValueError(f"evecs must be (k, {B.shape[1]}) with k eigenvalues, got "
                         f"{tuple(evecs.shape)} and {tuple(evals.shape)}.")
    lam = evals + damping
    ok = lam > 0
    inv = torch.where(ok, 1.0 / lam, torch.zeros_like(lam))
    Bd = B.to(evecs.dtype)
    X = ((Bd @ evecs.T) * inv) @ evecs
    m = B.shape[0]
    info = SolverInfo("arnoldi", converged=torch.full((m,), bool(ok.all()), dtype=torch.bool),
                      n_iter=torch.zeros(m, dtype=torch.long), eigenvalues=evals.cpu(),
                      extra={"n_nonpositive": int((~ok).sum()), "rank": int(len(evals)),
                             "damping": damping})
    return X.to(B.dtype), info
