"""The algebra of one ``torch.optim.SGD`` step: primal, tangent (HYDRA forward) and adjoint.

torch's SGD, per parameter group with learning rate ``eta``, momentum ``p``, dampening
``delta``, weight decay ``lam`` and the batch gradient ``g``::

    d   = g + lam * theta
    v   = d                       (first step: the buffer is created undampened)
    v   = p * v_prev + (1 - delta) * d
    theta <- theta - eta * (d + p * v)      (nesterov)
    theta <- theta - eta * v                (momentum)
    theta <- theta - eta * d                (p == 0: no buffer)

Written uniformly as ``v = keep * v_prev + kappa * d`` and
``theta <- theta - eta * (a * d + c * v)`` with per-group coefficients from
:func:`step_coefficients`. Differentiating it gives the HYDRA recurrence
(supplement eqs. 33-34, generalised to dampening, Nesterov and several groups):
:func:`tangent_step` runs it forward for one sample weight, :func:`adjoint_step`
runs its transpose backward for one test objective. One implementation serves the
forward recurrence, the adjoint sweep and leave-one-out replay.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "SGDHyper",
    "step_coefficients",
    "sgd_step",
    "tangent_step",
    "adjoint_step",
    "adjoint_step_",
    "fast_coefficients",
    "group_slices",
]


@dataclass
class SGDHyper:
    """Per-step, per-group SGD hyperparameters as actually used, each ``(n_steps, n_groups)``.

    ``first[t, g]`` is True when group ``g``'s momentum buffer was created at step ``t``.
    """

    lr: torch.Tensor
    momentum: torch.Tensor
    dampening: torch.Tensor
    weight_decay: torch.Tensor
    nesterov: torch.Tensor
    first: torch.Tensor

    def __len__(self):
        return self.lr.shape[0]

    def at(self, t):
        """Hyperparameters of step ``t`` as a dict of ``(n_groups,)`` tensors."""
        return {k: getattr(self, k)[t] for k in
                ("lr", "momentum", "dampening", "weight_decay", "nesterov", "first")}

    @classmethod
    def from_rows(cls, rows):
        """Build from a list of per-step dicts of per-group lists (as recorded)."""
        def col(k, dtype):
            return torch.tensor([r[k] for r in rows], dtype=dtype).reshape(len(rows), -1)

        return cls(col("lr", torch.float64), col("momentum", torch.float64),
                   col("dampening", torch.float64), col("weight_decay", torch.float64),
                   col("nesterov", torch.bool), col("first", torch.bool))


def step_coefficients(h):
    """Per-group ``(eta, lam, a, c, kappa, keep)`` of one step, all float64 ``(n_groups,)``."""
    p = h["momentum"]
    uses_buf = p != 0
    nest = h["nesterov"] & uses_buf
    one = torch.ones_like(p)
    zero = torch.zeros_like(p)
    a = torch.where(uses_buf, torch.where(nest, one, zero), one)
    c = torch.where(uses_buf, torch.where(nest, p, one), zero)
    kappa = torch.where(uses_buf, torch.where(h["first"], one, 1 - h["dampening"]), zero)
    keep = torch.where(uses_buf & ~h["first"], p, zero)
    return h["lr"], h["weight_decay"], a, c, kappa, keep


def _expanded(h, expand, like):
    return [expand(x).to(like.dtype) for x in step_coefficients(h)]


def sgd_step(theta, v, grad_, h, expand):
    """One primal SGD step. Returns ``(theta_next, v_next)``; ``v`` may be None at start.

    ``expand`` maps per-group ``(n_groups,)`` values to per-coordinate vectors
    (:meth:`ParamSpec.expand`).
    """
    eta, lam, a, c, kappa, keep = _expanded(h, expand, theta)
    d = grad_ + lam * theta
    v_next = kappa * d if v is None else keep * v + kappa * d
    return theta - eta * (a * d + c * v_next), v_next


def tangent_step(dtheta, dv, dgrad, h, expand):
    """Forward-mode derivative of :func:`sgd_step` (the HYDRA recurrence).

    ``dgrad`` is the derivative of the batch gradient: ``H dtheta`` (exact mode, zero
    in fast mode) plus the sample's injection ``N * w * g_i`` when it is in the batch.
    Weight decay's ``lam * dtheta`` is added here. Works on stacked tangents ``(..., P)``.
    """
    eta, lam, a, c, kappa, keep = _expanded(h, expand, dtheta)
    dd = dgrad + lam * dtheta
    dv_next = keep * dv + kappa * dd
    return dtheta - eta * (a * dd + c * dv_next), dv_next


def adjoint_step(theta_bar, v_bar, h, expand):
    """Transpose of :func:`tangent_step`, for stacked cotangents ``(..., P)``.

    Given the adjoints of ``(theta_t, v_t)``, returns ``(d_bar, theta_bar_prev, v_bar_prev)``
    where ``d_bar`` is the adjoint of the step's ``d`` (sample ``i`` in the batch
    contributes ``N * w * d_bar . g_i`` to ``d objective / d eps_i``), and
    ``theta_bar_prev`` still lacks the Hessian term ``H d_bar``, which the caller adds
    in exact mode.
    """
    eta, lam, a, c, kappa, keep = _expanded(h, expand, theta_bar)
    u = v_bar - eta * c * theta_bar
    d_bar = -eta * a * theta_bar + kappa * u
    return d_bar, theta_bar + lam * d_bar, keep * u


def group_slices(group_sizes, width):
    """The flat slice of each parameter group; ``ValueError`` unless they add up to
    ``width`` (a store's, or the number of parameters)."""
    slices, off = [], 0
    for s in group_sizes:
        slices.append(slice(off, off + int(s)))
        off += int(s)
    if off != width:
        raise ValueError("group_sizes must add up to the store's width")
    return slices


def adjoint_step_(theta_bar, v_bar, d_bar, h, slices):
    """:func:`adjoint_step` in place, with per-group scalars: no temporaries.

    ``theta_bar`` and ``v_bar`` (..., P) are overwritten with ``theta_bar_prev`` (still
    without the Hessian term) and ``v_bar_prev``; ``d_bar`` (same shape) receives the
    step's ``d_bar``. ``slices`` are the parameter groups' column slices. Returns
    ``(d_bar, theta_bar, v_bar)``, the same tensors. Used by exact mode's sweep, whose
    stacked cotangents make fresh ``(..., P)`` results costly (:doc:`/architecture`,
    Decision 11).
    """
    eta, lam, a, c, kappa, keep = (x.tolist() for x in step_coefficients(h))
    for g, sl in enumerate(slices):
        tb, vb, db = theta_bar[..., sl], v_bar[..., sl], d_bar[..., sl]
        vb.add_(tb, alpha=-eta[g] * c[g])             # u = v_bar - eta c theta_bar
        torch.mul(vb, kappa[g], out=db)                # d_bar = kappa u - eta a theta_bar
        db.add_(tb, alpha=-eta[g] * a[g])
        tb.add_(db, alpha=lam[g])                      # theta_bar + lam d_bar
        vb.mul_(keep[g])                               # keep u
    return d_bar, theta_bar, v_bar


def fast_coefficients(hyper: SGDHyper):
    """Fast-mode (Hessian dropped) adjoint coefficients, float64 ``(n_steps, n_groups)``.

    Without the Hessian every map in the adjoint is a per-group scalar, so for any test
    gradient ``G``, step ``t``'s ``d_bar`` equals ``coef[t] * G`` (per group). Hence
    ``d loss / d eps_i = N * sum_{t: i in B_t} w_t * (coef[t] * G) . g_{t,i}``.
    """
    n_steps, n_groups = hyper.lr.shape
    out = torch.empty(n_steps, n_groups, dtype=torch.float64)
    tb = torch.ones(n_groups, dtype=torch.float64)
    vb = torch.zeros(n_groups, dtype=torch.float64)
    ident = lambda x: x  # noqa: E731  (per-group vectors need no expansion)
    for t in range(n_steps - 1, -1, -1):
        d_bar, tb, vb = adjoint_step(tb, vb, hyper.at(t), ident)
        out[t] = d_bar
    return out
