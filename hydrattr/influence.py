"""InfluenceFunctionAttributor: Koh & Liang (2017) influence functions at the trained weights."""
from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, InvalidParameterError, StrOptions

from ._core.functional import load_jvp_decompositions, per_sample_grads
from ._core.solvers import (LissaDivergenceError, dense_hessian, lanczos_eigenpairs,
                            solve_cg, solve_direct, solve_lissa, solve_lowrank)
from ._skorch import flat_params, module_mode, per_sample_reduction
from .base import BaseAttributor

__all__ = ["InfluenceFunctionAttributor"]

_SOLVERS = ("direct", "cg", "lissa", "arnoldi")


def _batch_hvp(loss_fn, theta, x, y, weights, V):
    """``H V`` of ``sum_k weights[k] l_k`` for the rows of ``V`` (reverse-over-reverse).

    One forward and backward pass builds the gradient graph; a batched double-backward
    (``is_grads_batched``) then gives all ``m`` products. On small models this has far
    less per-call overhead than ``torch.func`` forward-over-reverse; modules whose ops
    have no batching rule fall back to one double-backward per vector.
    """
    load_jvp_decompositions()  # batched double-backward loads them: without the warning
    t = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        g = torch.autograd.grad((weights * loss_fn(t, x, y)).sum(), t, create_graph=True)[0]
        if not g.requires_grad:  # loss linear in theta: zero Hessian
            return torch.zeros_like(V)
        try:
            return torch.autograd.grad(g, t, V, is_grads_batched=True, retain_graph=True)[0]
        except RuntimeError:
            return torch.stack([torch.autograd.grad(g, t, v, retain_graph=True)[0] for v in V])


class InfluenceFunctionAttributor(BaseAttributor):
    r"""Influence functions: leave-one-out predicted from the Hessian at the optimum.

    ``fit`` trains a clone of ``net`` (exactly as ``net.fit`` would, same torch seed);
    ``attribute`` returns

    .. math:: C_{ij} = \frac{1}{N}\, g_{\text{test},j}^\top H^{-1} g_i ,

    with ``g_i`` the gradient of training sample ``i``'s loss and ``g_test,j`` that of
    test point ``j``, both at the trained weights ``theta*``, ``N`` the number of rows
    trained on and ``H`` the Hessian of the full training objective at ``theta*``.

    **Sign.** Training minimises ``R(theta, eps) = (1/N) sum_k (1 + N eps_k) l_k(theta)
    + sum_groups (lambda_g / 2) ||theta_g||^2`` (sample ``k`` enters with weight
    ``(1 + N eps_k)/N``; ``lambda_g`` is the optimizer's weight decay, which adds
    ``lambda_g theta`` to the gradient). At the optimum ``grad R = 0``; differentiating
    in ``eps_i`` gives ``H d theta*/d eps_i + g_i = 0``, so
    ``d theta*/d eps_i = -H^{-1} g_i`` and ``d loss_j / d eps_i = -g_test,j^T H^{-1} g_i``.
    Removing sample ``i`` is ``eps_i = -1/N``, so to first order
    ``loss_j(without i) - loss_j(with all) = (-1/N) d loss_j/d eps_i
    = +(1/N) g_test,j^T H^{-1} g_i = C[i, j]``: positive means ``i`` helped ``j``, the
    contract shared by every hydrattr attributor.

    **The Hessian.** ``H = (1/N) sum_{k trained} hess l_k(theta*) + diag(lambda)``: the
    mean per-sample loss over the rows that entered training (rows held out by the
    net's ``train_split`` have ``C = 0``), computed with the module in eval mode
    (BatchNorm uses its running statistics, dropout is off: the network as it
    predicts at the optimum), plus the weight decay of each optimizer parameter group
    (read from ``net_.optimizer_.param_groups`` after training). With a
    ``reduction="sum"`` criterion the SGD fixed point is ``sum_k g_k + n_batches *
    lambda * theta = 0`` per epoch, so the decay enters as ``lambda / mean batch size``.
    Influence functions assume ``theta*`` is a minimum (``H`` positive definite); for
    non-convex nets stopped early this fails, and ``damping`` (``H + damping * I``,
    a convex quadratic approximation, Koh & Liang Sec. 4.2) restores it.

    Parameters
    ----------
    net : skorch.NeuralNet
        The network as you would train it (it is cloned), with an optimizer the
        recorder shared with HYDRA accepts (``torch.optim.SGD``, ``Adam``, ``AdamW``).
        Coupled weight decay (SGD, Adam) is an L2 term of the objective and enters
        ``H``; AdamW's decoupled decay is not and is left out (with a warning).
    solver : {"direct", "cg", "lissa", "arnoldi"}, default="direct"
        How ``H^{-1} g_test`` is obtained.

        * ``"direct"``: the explicit ``P x P`` Hessian (built at ``fit``, ``P``
          Hessian-vector products over the training set) and its eigendecomposition;
          for small models. Reports the spectrum (``hessian_eigenvalues_``) and warns
          when ``H + damping * I`` is not positive definite.
        * ``"cg"``: conjugate gradients with Hessian-vector products over the whole
          training set, batched over test points; warns when a test point does not
          converge or meets negative curvature.
        * ``"lissa"``: the stochastic recursion of Agarwal et al. (2017) as used by
          Koh & Liang; raises :class:`~hydrattr._core.solvers.LissaDivergenceError`
          naming ``lissa_scale`` when the iterates blow up or turn NaN.
        * ``"arnoldi"``: the low-rank influence of Schioppa et al. (2022) (Captum's
          ``ArnoldiInfluenceFunction``, pyDVL's ``ArnoldiInfluence``): at ``fit``,
          ``arnoldi_iter`` full-data Hessian-vector products (Lanczos) give the
          ``arnoldi_rank`` eigenpairs of largest magnitude, and ``H^{-1}`` is
          replaced by its restriction to their span. One decomposition serves every
          test point, so many test points (e.g. 1,000 references) cost little more
          than one. Eigenpairs with ``lambda + damping <= 0`` are dropped, with a
          warning.
    damping : float >= 0, default=0.0
        Added to the Hessian's diagonal (all solvers).
    cg_tol : float, default=1e-6
        Relative residual at which CG stops.
    cg_maxiter : int or None, default=None
        CG iterations at most (None: ``10 * n_params``).
    lissa_scale : float, default=10.0
        LiSSA scale; must exceed half the largest eigenvalue of the (batch) Hessian.
    lissa_depth : int, default=1000
        LiSSA recursion steps per repeat.
    lissa_repeat : int, default=1
        Independent LiSSA runs averaged.
    lissa_batch_size : int, default=32
        Training rows per LiSSA Hessian-vector product (drawn with replacement).
    arnoldi_rank : int, default=50
        Eigenpairs kept by ``solver="arnoldi"``.
    arnoldi_iter : int or None, default=None
        Krylov dimension (full-data Hessian-vector products at ``fit``) of
        ``solver="arnoldi"``; None: ``max(2 * arnoldi_rank + 1, 20)`` (pyDVL's default),
        at most ``n_params``.
    batch_size : int, default=256
        Training (and test) rows per forward pass when computing per-sample gradients
        and full-data Hessian-vector products.
    block_size : int, default=32
        Vectors per batched Hessian-vector product: identity columns when building the
        direct Hessian, test points solved together by CG and LiSSA.
    random_state : int, RandomState or None
        Seeds torch before training and the LiSSA sampling.
    verbose : int, default=1
        Progress bars (tqdm) when > 0.

    Attributes
    ----------
    net_ : skorch.NeuralNet
        The trained clone.
    spec_ : ParamSpec
        Flat parameter layout.
    trained_mask_ : ndarray of bool
        Rows that entered training (the others have ``C = 0``).
    n_trained_ : int
        ``N``: number of rows trained on.
    weight_decay_ : ndarray of shape (n_param_groups,)
        Effective L2 coefficient per parameter group in ``H``.
    hessian_ : ndarray of shape (n_params, n_params) or None
        ``solver="direct"``: the undamped Hessian ``H`` (float64, flat parameter order
        of ``spec_``).
    hessian_eigenvalues_ : ndarray or None
        ``solver="direct"``: eigenvalues of ``hessian_``, ascending.
        ``solver="arnoldi"``: the ``arnoldi_rank`` Ritz values kept, ascending.
    solver_info_ : list of SolverInfo
        From the last ``attribute`` call, one per block of test points.

    Notes
    -----
    The base class records the SGD trajectory during training (it is what gives the
    rows actually trained on); it is freed right after ``fit``.

    References
    ----------
    Koh & Liang, "Understanding Black-box Predictions via Influence Functions", ICML
    2017. Agarwal, Bullins & Hazan, "Second-Order Stochastic Optimization for Machine
    Learning in Linear Time", JMLR 2017. Schioppa, Zablotskaia, Vilar & Sokolov,
    "Scaling Up Influence Functions", AAAI 2022.
    """

    def __init__(self, net, solver="direct", damping=0.0, cg_tol=1e-6, cg_maxiter=None,
                 lissa_scale=10.0, lissa_depth=1000, lissa_repeat=1, lissa_batch_size=32,
                 arnoldi_rank=50, arnoldi_iter=None, batch_size=256, block_size=32,
                 random_state=None, verbose=1):
        self.net = net
        self.solver = solver
        self.damping = damping
        self.cg_tol = cg_tol
        self.cg_maxiter = cg_maxiter
        self.lissa_scale = lissa_scale
        self.lissa_depth = lissa_depth
        self.lissa_repeat = lissa_repeat
        self.lissa_batch_size = lissa_batch_size
        self.arnoldi_rank = arnoldi_rank
        self.arnoldi_iter = arnoldi_iter
        self.batch_size = batch_size
        self.block_size = block_size
        self.random_state = random_state
        self.verbose = verbose

    _record = "rows"  # batch rows and weights only: the Hessian is taken at the end

    _parameter_constraints = {
        **BaseAttributor._parameter_constraints,
        "solver": [StrOptions(set(_SOLVERS))],
        "damping": [Interval(Real, 0, None, closed="left")],
        "cg_tol": [Interval(Real, 0, None, closed="neither")],
        "cg_maxiter": [None, Interval(Integral, 0, None, closed="left")],
        "lissa_scale": [Interval(Real, 0, None, closed="neither")],
        "lissa_depth": [Interval(Integral, 1, None, closed="left")],
        "lissa_repeat": [Interval(Integral, 1, None, closed="left")],
        "lissa_batch_size": [Interval(Integral, 1, None, closed="left")],
        "arnoldi_rank": [Interval(Integral, 1, None, closed="left")],
        "arnoldi_iter": [None, Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "block_size": [Interval(Integral, 1, None, closed="left")],
    }

    # -- parameters ------------------------------------------------------------------
    def _check_params(self):
        # what the constraints cannot say: no bools for numbers, no infinite reals
        self._refuse_bools("damping", "cg_tol", "cg_maxiter", "lissa_scale", "lissa_depth",
                           "lissa_repeat", "lissa_batch_size", "arnoldi_rank", "arnoldi_iter",
                           "batch_size", "block_size")
        for name in ("damping", "cg_tol", "lissa_scale"):
            if not np.isfinite(getattr(self, name)):
                raise InvalidParameterError(
                    f"The {name!r} parameter of {type(self).__name__} must be finite. Got "
                    f"{getattr(self, name)!r} instead.")

    def _after_fit(self):
        traj = self.trajectory_
        self._rows = np.flatnonzero(self.trained_mask_)
        self.n_trained_ = int(len(self._rows))
        opt = self.net_.optimizer_
        groups = opt.param_groups
        wd = np.array([float(g.get("weight_decay", 0.0) or 0.0) for g in groups])
        decoupled = np.array([isinstance(opt, torch.optim.AdamW)
                              or bool(g.get("decoupled_weight_decay", False)) for g in groups])
        if np.any(decoupled & (wd > 0)):
            warnings.warn(
                "The optimizer's weight decay is decoupled (AdamW): it shrinks the weights "
                "outside the gradient, so it is no L2 term of the training objective and "
                "is left out of the Hessian. The trained weights then need not be a "
                "stationary point of the loss; consider damping.", UserWarning, stacklevel=4)
            wd = np.where(decoupled, 0.0, wd)
        if per_sample_reduction(self.net_) == "sum":
            # per epoch: sum_k g_k + n_batches * lambda * theta = 0 -> lambda / mean(B)
            n_rows_seen = sum(len(ix) for ix in traj.indices)
            wd = wd * len(traj.indices) / max(n_rows_seen, 1)
        self.weight_decay_ = wd
        self.trajectory_ = None  # only the trained rows were needed
        self._theta = flat_params(self.net_, self.spec_).to(self._device)
        self._wd_coord = self.spec_.expand(
            torch.as_tensor(wd, dtype=self._theta.dtype, device=self._device))
        self.hessian_ = self.hessian_eigenvalues_ = None
        self._H = self._eigh = self._ritz = None
        if self.solver == "arnoldi":
            gen = self._generator()
            with module_mode(self.net_.module_, training=False):
                evals, evecs = lanczos_eigenpairs(
                    self._hvp, self.spec_.n_params, rank=self.arnoldi_rank,
                    n_iter=self.arnoldi_iter, dtype=torch.float64, device=self._device,
                    generator=gen, progress=self._progress())
            self._ritz = (evals, evecs)
            self.hessian_eigenvalues_ = evals.cpu().numpy()
            n_bad = int((evals + float(self.damping) <= 0).sum())
            if n_bad:
                warnings.warn(
                    f"{n_bad} of the {len(evals)} Ritz values kept by solver='arnoldi' are "
                    f"<= -damping (smallest {float(evals[0]):.3g}, damping="
                    f"{self.damping:g}): the Hessian is not positive definite on the top "
                    f"eigenspace, and those directions are dropped. Set damping > "
                    f"{-float(evals[0]):.3g} to keep them.", UserWarning, stacklevel=4)
        elif self.solver == "direct":
            with module_mode(self.net_.module_, training=False):
                H = dense_hessian(self._hvp, self.spec_.n_params, dtype=self._theta.dtype,
                                  device=self._device, block_size=self.block_size,
                                  progress=self._progress())
            H = H.double()
            evals, evecs = torch.linalg.eigh(H)
            self._H, self._eigh = H, (evals, evecs)
            self.hessian_ = H.cpu().numpy()
            self.hessian_eigenvalues_ = evals.cpu().numpy()
            lam = evals + float(self.damping)
            cutoff = H.shape[0] * torch.finfo(H.dtype).eps * float(lam.abs().max())
            # Exact null directions (a softmax's logit shift, unused units) are harmless:
            # the gradients have no component there and the pseudo-inverse drops them
            # (attribute warns if a test gradient does reach them). Negative curvature
            # is not: the trained weights are then no minimum.
            if float(lam[0]) < -cutoff:
                n_neg = int((lam < -cutoff).sum())
                warnings.warn(
                    f"The Hessian of the training objective (plus damping={self.damping:g}) "
                    f"is not positive semi-definite: smallest eigenvalue {float(evals[0]):.3g}, "
                    f"{n_neg} of {len(lam)} eigenvalues < {-cutoff:.2g} (largest "
                    f"{float(evals[-1]):.3g}). The trained weights are not a minimum "
                    f"(non-convex net or not converged), so influence is not a leave-one-out "
                    f"approximation. Set damping > {max(-float(evals[0]), 0.0):.3g} for a "
                    f"convex approximation.", UserWarning, stacklevel=4)

    def _generator(self):
        """A CPU torch generator seeded from ``random_state`` (LiSSA batches, Lanczos start)."""
        rs = check_random_state(self.random_state)
        return torch.Generator().manual_seed(int(rs.randint(np.iinfo(np.int32).max)))

    # -- Hessian-vector products and gradients (eval mode) -----------------------------
    def _hvp(self, V, rows=None):
        """``H V`` for ``V`` of shape (m, P): mean training loss Hessian + weight decay.

        ``rows`` (indices into the trained rows) restricts the mean to a sample (LiSSA).
        """
        theta = self._theta
        V = V.to(theta)
        rows = self._rows if rows is None else self._rows[np.asarray(rows.cpu())]
        loss_fn, data_fn = self._loss_fn(), self._data_fn()
        out = torch.zeros_like(V)
        n = len(rows)
        for s in range(0, n, self.batch_size):
            x, y = data_fn(rows[s:s + self.batch_size])
            w = torch.full((x.shape[0],), 1.0 / n, dtype=theta.dtype, device=theta.device)
            out += _batch_hvp(loss_fn, theta, x, y, w, V).detach()
        return out + self._wd_coord * V

    def _train_grads_times(self, S):
        """``G_train S^T / N`` for ``S`` (m, P) over the trained rows; (n_train, m)."""
        theta = self._theta
        loss_fn, data_fn = self._loss_fn(), self._data_fn()
        C = torch.zeros(self.n_train_, S.shape[0], dtype=torch.float64)
        St = S.to(theta.device, torch.float64).T
        rows = self._rows
        for s in range(0, len(rows), self.batch_size):
            r = rows[s:s + self.batch_size]
            x, y = data_fn(r)
            G = per_sample_grads(loss_fn, theta, x, y, independent=True).detach()
            C[torch.as_tensor(r)] = (G.double() @ St).cpu()
        return C / self.n_trained_

    # -- attribution -------------------------------------------------------------------
    def _solve(self, G):
        """``(H + damping I)^{-1} G^T`` for test gradients ``G`` (m, P), blockwise."""
        damping = float(self.damping)
        infos, parts = [], []
        if self.solver == "lissa":
            gen = self._generator()
        step = max(G.shape[0], 1) if self.solver in ("direct", "arnoldi") else self.block_size
        for s in range(0, G.shape[0], step):
            B = G[s:s + step]
            if self.solver == "direct":
                X, info = solve_direct(self._H, B.double(), damping=damping, eigh=self._eigh)
            elif self.solver == "arnoldi":
                X, info = solve_lowrank(*self._ritz, B, damping=damping)
            elif self.solver == "cg":
                X, info = solve_cg(self._hvp, B, damping=damping, tol=float(self.cg_tol),
                                   maxiter=self.cg_maxiter)
            else:
                try:
                    X, info = solve_lissa(
                        self._hvp, B, n_samples=self.n_trained_,
                        batch_size=self.lissa_batch_size, scale=float(self.lissa_scale),
                        depth=self.lissa_depth, repeat=self.lissa_repeat, damping=damping,
                        generator=gen, progress=self._progress())
                except LissaDivergenceError as exc:
                    raise LissaDivergenceError(
                        f"{exc} (InfluenceFunctionAttributor: lissa_scale="
                        f"{self.lissa_scale!r}, damping={self.damping!r})") from None
                resid = torch.linalg.vector_norm(self._hvp(X) + damping * X - B, dim=1)
                info.residual = (resid / torch.linalg.vector_norm(B, dim=1).clamp_min(
                    torch.finfo(B.dtype).tiny)).cpu()
            infos.append(info)
            parts.append(X)
        return torch.cat(parts), infos

    def _attribute(self, Xt, yt, objective):
        with module_mode(self.net_.module_, training=False):
            G = self._test_grads(Xt, yt, objective, batch_size=self.batch_size)
            S, infos = self._solve(G)
            C = self._train_grads_times(S)
        self.solver_info_ = infos
        self._warn_solver(infos)
        return C.numpy()

    def _warn_solver(self, infos):
        if self.solver == "direct":
            res = torch.cat([i.residual for i in infos])
            tol = float(torch.finfo(torch.float64).eps) ** 0.5
            if bool((res > tol).any()):
                warnings.warn(
                    f"{int((res > tol).sum())} of {len(res)} test gradients reach directions "
                    f"where H + damping * I (damping={self.damping:g}) is singular or "
                    f"negative (relative residual up to {float(res.max()):.3g}); the "
                    f"pseudo-inverse drops that part, so C is not the influence there. Set "
                    f"damping > 0.", UserWarning, stacklevel=4)
        elif self.solver == "cg":
            conv = torch.cat([i.converged for i in infos])
            neg = torch.cat([i.negative_curvature for i in infos])
            res = torch.cat([i.residual for i in infos])
            if not bool(conv.all()):
                msg = (f"CG did not converge for {int((~conv).sum())} of {len(conv)} test "
                       f"objectives (largest relative residual {float(res.max()):.3g}, "
                       f"cg_tol={self.cg_tol:g}, cg_maxiter={self.cg_maxiter}).")
                if bool(neg.any()):
                    msg += (f" {int(neg.sum())} met non-positive curvature: H + damping * I "
                            f"(damping={self.damping:g}) is not positive definite; "
                            + ("set damping > 0." if not self.damping else
                               "increase damping."))
                else:
                    msg += " Increase cg_maxiter, loosen cg_tol, or add damping."
                warnings.warn(msg, UserWarning, stacklevel=4)
        elif self.solver == "lissa":
            res = torch.cat([i.residual for i in infos])
            if bool((res >= 1).any()):
                warnings.warn(
                    f"LiSSA estimates are no better than zero for {int((res >= 1).sum())} of "
                    f"{len(res)} test objectives (relative residual up to "
                    f"{float(res.max()):.3g}): increase lissa_depth or lissa_repeat, check "
                    f"lissa_scale={self.lissa_scale:g}, or add damping.",
                    UserWarning, stacklevel=4)
