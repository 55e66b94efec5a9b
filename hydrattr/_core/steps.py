"""One interface over the optimizer step algebras, used by every sweep and by the replay.

:func:`steps_for` returns, for a recorded :class:`~hydrattr._core.trajectory.Trajectory`,
an object with the primal step, its tangent and its adjoint, dispatching on the recorded
optimizer (``SGDHyper`` -> :mod:`~hydrattr._core.sgd`, ``AdamHyper`` ->
:mod:`~hydrattr._core.adam`). The math lives only in those two modules.

Interface (``t`` is the step index; ``state`` is the optimizer state, opaque here):

* ``primal(t, theta, state, g) -> (theta', state')`` (``state=None`` = fresh optimizer)
* ``needs_grad``: whether ``context`` needs the primal batch gradient ``g_t`` (Adam: its
  linearisation depends on ``g_t``, ``m_t`` and ``v_t``; SGD's does not)
* ``context(t, theta, g) -> ctx`` the step's linearisation point
* ``tangent(t, dtheta, dstate, dgrad, ctx)``, ``tangent_state(dtheta)``
* ``adjoint(t, theta_bar, state_bar, ctx) -> (g_bar, theta_bar_prev, state_bar_prev)``,
  ``adjoint_state(theta_bar)``; ``adjoint_(t, theta_bar, state_bar, g_bar, ctx)`` does the
  same in place where the algebra has it (SGD: per-group scalars, no temporaries)
* ``fast()``: the fast-mode coefficients (Hessian dropped), see :class:`SGDFast`,
  :class:`AdamFast`.
"""
from __future__ import annotations

import torch
from torch.func import grad

from .adam import AdamHyper, adam_adjoint_step, adam_context, adam_step, adam_tangent_step
from .functional import rng_context
from .sgd import SGDHyper, adjoint_step, adjoint_step_, fast_coefficients, group_slices, \
    sgd_step, tangent_step

__all__ = ["steps_for", "batch_grad", "SGDSteps", "AdamSteps", "SGDFast", "AdamFast"]


def batch_grad(loss_fn, theta, x, y, weights, rng_state=None):
    """Gradient of the weighted batch loss ``sum_k weights[k] * l_k(theta)`` (replays RNG)."""
    with rng_context(rng_state, theta.device if theta.is_cuda else None):
        return grad(lambda th: (weights * loss_fn(th, x, y)).sum())(theta)


def steps_for(traj, freeze_preconditioner=False):
    """The step algebra of the optimizer that produced ``traj``.

    ``freeze_preconditioner`` (Adam only) treats Adam's second-moment preconditioner as
    constant in the linearisation (an optional, coarser fast-mode approximation).
    """
    if isinstance(traj.hyper, SGDHyper):
        return SGDSteps(traj)
    if isinstance(traj.hyper, AdamHyper):
        return AdamSteps(traj, freeze_preconditioner=freeze_preconditioner)
    raise TypeError(f"no step algebra for hyperparameters of type {type(traj.hyper).__name__}")


class SGDSteps:
    """``torch.optim.SGD`` (momentum buffer as the state)."""

    needs_grad = False

    def __init__(self, traj):
        self.traj = traj
        self.hyper = traj.hyper
        self.expand = traj.spec.expand
        self._slices = group_slices(traj.spec.group_sizes, traj.spec.n_params)

    def primal(self, t, theta, state, g):
        h = self.hyper.at(t)
        if state is None and not bool(h["first"].all()):
            state = torch.zeros_like(theta)
        return sgd_step(theta, state, g, h, self.expand)

    def context(self, t, theta=None, g=None):
        return None

    def tangent_state(self, dtheta):
        return torch.zeros_like(dtheta)

    def tangent(self, t, dtheta, dstate, dgrad, ctx):
        return tangent_step(dtheta, dstate, dgrad, self.hyper.at(t), self.expand)

    def adjoint_state(self, theta_bar):
        return torch.zeros_like(theta_bar)

    def adjoint(self, t, theta_bar, state_bar, ctx):
        return adjoint_step(theta_bar, state_bar, self.hyper.at(t), self.expand)

    def adjoint_(self, t, theta_bar, state_bar, g_bar, ctx):
        """:meth:`adjoint` in place: overwrites ``theta_bar`` and ``state_bar``, writes
        ``g_bar`` (:func:`~hydrattr._core.sgd.adjoint_step_`)."""
        return adjoint_step_(theta_bar, state_bar, g_bar, self.hyper.at(t), self._slices)

    def fast(self):
        return SGDFast(self)


class AdamSteps:
    """``torch.optim.Adam`` / ``AdamW``; the state ``(m, v)`` is read from the trajectory."""

    needs_grad = True

    def __init__(self, traj, freeze_preconditioner=False):
        self.traj = traj
        self.hyper = traj.hyper
        self.expand = traj.spec.expand
        self.freeze_preconditioner = bool(freeze_preconditioner)

    def primal(self, t, theta, state, g):
        return adam_step(theta, state, g, self.hyper.at(t), self.expand)

    def context(self, t, theta, g):
        state = self.traj.opt_state(t, device=theta.device)
        if state is None:
            raise RuntimeError("the trajectory holds no Adam state (exp_avg, exp_avg_sq)")
        state = tuple(s.to(theta.dtype) for s in state)
        return adam_context(theta, state, g, self.hyper.at(t), self.expand,
                            freeze_preconditioner=self.freeze_preconditioner)

    def tangent_state(self, dtheta):
        return torch.zeros_like(dtheta), torch.zeros_like(dtheta)

    def tangent(self, t, dtheta, dstate, dgrad, ctx):
        return adam_tangent_step(dtheta, dstate, dgrad, ctx)

    def adjoint_state(self, theta_bar):
        return torch.zeros_like(theta_bar), torch.zeros_like(theta_bar)

    def adjoint(self, t, theta_bar, state_bar, ctx):
        return adam_adjoint_step(theta_bar, state_bar, ctx)

    def fast(self):
        return AdamFast(self)


class SGDFast:
    """Fast-mode SGD coefficients: per-group scalars, computed once (any step order)."""

    needs_grad = False

    def __init__(self, steps):
        self.spec = steps.traj.spec
        self.coef = fast_coefficients(steps.hyper)
        self.order = range(len(steps.traj))

    def coef_at(self, t, theta, g=None):
        """Per-coordinate ``c_t`` with ``g_bar_t = c_t * G`` for any test gradient ``G``."""
        return self.spec.expand(self.coef[t]).to(theta.device, theta.dtype)


class AdamFast:
    """Fast-mode Adam coefficients, per coordinate, computed backward on the fly.

    With the Hessian dropped every map of the adjoint Adam step is elementwise, so for
    any test gradient ``G`` the adjoint of step ``t``'s batch gradient is ``c_t * G``
    with ``c_t`` the adjoint started from a vector of ones. ``c_t`` depends on the
    primal ``(g_t, m_t, v_t)`` of every later step, so steps are visited last to first
    (``order``) and ``coef_at`` must be called in that order with the batch gradient.
    """

    needs_grad = True

    def __init__(self, steps):
        self.steps = steps
        self.order = range(len(steps.traj) - 1, -1, -1)
        self._tb = None
        self._sb = None
        self._next = len(steps.traj) - 1

    def coef_at(self, t, theta, g):
        if t != self._next:
            raise RuntimeError("AdamFast.coef_at must be called for steps last to first")
        if self._tb is None:
            self._tb = torch.ones_like(theta)
            self._sb = self.steps.adjoint_state(self._tb)
        ctx = self.steps.context(t, theta, g)
        g_bar, self._tb, self._sb = self.steps.adjoint(t, self._tb, self._sb, ctx)
        self._next -= 1
        return g_bar
