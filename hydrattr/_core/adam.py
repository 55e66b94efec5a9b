"""The algebra of one ``torch.optim.Adam`` / ``AdamW`` step: primal, tangent and adjoint.

torch's Adam (``amsgrad=False``, ``maximize=False``), per parameter group with learning
rate ``eta``, betas ``(b1, b2)``, ``eps``, weight decay ``lam``, step count ``k`` (after
the increment) and the batch gradient ``g``::

    d      = g + lam_c * theta                 lam_c = lam (Adam), 0 (AdamW)
    theta  = (1 - eta * lam_d) * theta         lam_d = 0 (Adam), lam (AdamW: decoupled)
    m'     = b1 * m + (1 - b1) * d             (torch: m.lerp_(d, 1 - b1))
    v'     = b2 * v + (1 - b2) * d * d
    D      = sqrt(v') / sqrt(1 - b2**k) + eps
    theta' = theta - eta / (1 - b1**k) * m' / D

The optimizer state ``(m, v)`` is part of the differentiated state: a sample's weight
moves ``g``, hence ``d``, ``m'`` *and* ``v'`` (``dv' = b2 dv + 2 (1 - b2) d * dd``) and,
through ``D``, the step size of every coordinate. Differentiating (``s = sqrt(v')``)::

    dd      = dg + lam_c * dtheta
    dm'     = b1 * dm + (1 - b1) * dd
    dv'     = b2 * dv + 2 (1 - b2) * d * dd
    dtheta' = rho * dtheta + alpha * dm' + beta * dv'
    rho     = 1 - eta * lam_d
    alpha   = -eta / (1 - b1**k) / D
    beta    =  eta / (1 - b1**k) * m' / (2 s sqrt(1 - b2**k) D**2)   (0 where v' == 0)

``dg = H dtheta + (injection of the sample)`` as for SGD. Every map is elementwise, with
per-coordinate coefficients ``(d, alpha, beta)`` that depend on the primal state of the
step (:func:`adam_context`) but not on the sample. Where ``v' == 0`` (a coordinate whose
gradient has been exactly zero so far) ``sqrt`` is not differentiable; its derivative is
taken as 0 there (the perturbed ``sqrt(v')`` is ``O(|eps|)``, a kink, not a slope).

:func:`adam_step` (primal), :func:`adam_tangent_step` (forward recurrence) and
:func:`adam_adjoint_step` (its transpose) are the only implementation of the step;
:mod:`hydrattr._core.steps` dispatches the sweeps and the replay to them.

**Exact mode** needs the primal state of every step. The optimizer state ``(m_t, v_t)``
before each step is *recorded* (read from ``optimizer.state`` by the recorder, so it is
exactly what training used; three parameter-sized vectors per step instead of one, in
RAM or in the trajectory's memmap), and the batch gradient ``g_t`` is recomputed at the
recorded ``theta_t`` (one extra batch backward pass per step of the sweep).

**Fast mode** drops only the Hessian (``dg = injection``). Every remaining map is
elementwise, so for any test gradient ``G`` the adjoint of step ``t``'s gradient is
``c_t * G`` with a per-coordinate vector ``c_t`` (per-group scalars for SGD). ``c_t``
depends on ``(g_s, m_s, v_s)`` of all later steps, so the store is built in one pass from
the last step to the first, carrying three ``P``-vectors; nothing ``T x P`` is stored
beyond the trajectory itself, which is freed once the store is built. The extra cost per
step is one batch gradient (free when the whole batch is tracked: the sum of its
per-sample gradients) and O(P) elementwise work. Treating the preconditioner as a
constant as well (``freeze_preconditioner=True``, ``beta = 0``) is markedly less
accurate and not used by the attributors (the comparison is on the speed results page).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "AdamHyper",
    "adam_step",
    "adam_context",
    "adam_tangent_step",
    "adam_adjoint_step",
]

_KEYS = ("lr", "beta1", "beta2", "eps", "weight_decay", "decoupled", "step")


@dataclass
class AdamHyper:
    """Per-step, per-group Adam hyperparameters as actually used, each ``(n_steps, n_groups)``.

    ``step[t, g]`` is the step count ``k`` used for bias correction at step ``t`` (after
    torch's increment: 1 at a group's first step); ``decoupled[t, g]`` is True for AdamW
    (``decoupled_weight_decay``).
    """

    lr: torch.Tensor
    beta1: torch.Tensor
    beta2: torch.Tensor
    eps: torch.Tensor
    weight_decay: torch.Tensor
    decoupled: torch.Tensor
    step: torch.Tensor

    kind = "adam"

    def __len__(self):
        return self.lr.shape[0]

    def at(self, t):
        """Hyperparameters of step ``t`` as a dict of ``(n_groups,)`` tensors."""
        return {k: getattr(self, k)[t] for k in _KEYS}

    @classmethod
    def from_rows(cls, rows):
        """Build from a list of per-step dicts of per-group lists (as recorded)."""
        def col(k, dtype):
            return torch.tensor([r[k] for r in rows], dtype=dtype).reshape(len(rows), -1)

        return cls(*(col(k, torch.bool if k == "decoupled" else torch.float64) for k in _KEYS))


def _coefficients(h, expand, like):
    """Per-coordinate step constants in ``like``'s dtype and device."""
    dec = h["decoupled"]
    wd = h["weight_decay"]
    zero = torch.zeros_like(wd)
    b1, b2, k = h["beta1"], h["beta2"], h["step"]
    bc1 = 1 - b1 ** k
    sqrt_bc2 = torch.sqrt(1 - b2 ** k)
    per_group = {
        "lam_c": torch.where(dec, zero, wd),
        "rho": 1 - h["lr"] * torch.where(dec, wd, zero),
        "b1": b1, "one_b1": 1 - b1, "b2": b2, "one_b2": 1 - b2,
        "step_size": h["lr"] / bc1,
        "sqrt_bc2": sqrt_bc2,
        "eps": h["eps"],
    }
    return {n: expand(x).to(device=like.device, dtype=like.dtype) for n, x in per_group.items()}


def _moments(theta, state, grad_, c):
    m, v = (torch.zeros_like(theta), torch.zeros_like(theta)) if state is None else state
    d = grad_ + c["lam_c"] * theta
    m_next = torch.lerp(m, d, c["one_b1"])
    v_next = v * c["b2"] + c["one_b2"] * d * d
    return d, m_next, v_next


def adam_step(theta, state, grad_, h, expand):
    """One primal Adam/AdamW step.

    Parameters
    ----------
    theta : torch.Tensor, shape (P,)
    state : tuple ``(m, v)`` of (P,) tensors, or None (fresh optimizer: zeros)
    grad_ : torch.Tensor, shape (P,)
        Batch gradient at ``theta`` (without weight decay).
    h : dict
        :meth:`AdamHyper.at` of the step.
    expand : callable
        Per-group to per-coordinate (:meth:`ParamSpec.expand`).

    Returns
    -------
    theta_next, (m_next, v_next)
    """
    c = _coefficients(h, expand, theta)
    d, m_next, v_next = _moments(theta, state, grad_, c)
    denom = v_next.sqrt() / c["sqrt_bc2"] + c["eps"]
    theta_next = theta * c["rho"] - c["step_size"] * (m_next / denom)
    return theta_next, (m_next, v_next)


def adam_context(theta, state, grad_, h, expand, freeze_preconditioner=False):
    """The per-coordinate coefficients of the linearised step at ``(theta, state, grad_)``.

    Parameters
    ----------
    theta, state, grad_, h, expand : as in :func:`adam_step` (the primal of the step).
    freeze_preconditioner : bool, default=False
        Drop the dependence of ``D`` on ``v'`` (``beta = 0``): the second-moment
        preconditioner is treated as a constant. Not used by the exact sweeps.

    Returns
    -------
    dict with per-coordinate tensors ``d`` (the decayed gradient), ``alpha``, ``beta``
    and the step constants.
    """
    c = _coefficients(h, expand, theta)
    d, m_next, v_next = _moments(theta, state, grad_, c)
    s = v_next.sqrt()
    denom = s / c["sqrt_bc2"] + c["eps"]
    alpha = -c["step_size"] / denom
    if freeze_preconditioner:
        beta = torch.zeros_like(s)
    else:
        pos = s > 0
        safe = torch.where(pos, s, torch.ones_like(s))
        beta = torch.where(pos, c["step_size"] * m_next / (2 * safe * c["sqrt_bc2"] * denom ** 2),
                           torch.zeros_like(s))
    c.update(d=d, alpha=alpha, beta=beta)
    return c


def adam_tangent_step(dtheta, dstate, dgrad, ctx):
    """Forward-mode derivative of :func:`adam_step` for stacked tangents ``(..., P)``.

    ``dstate = (dm, dv)``; ``dgrad`` is ``H dtheta`` (exact mode) plus the sample's
    injection ``N * w * g_i``; ``ctx`` comes from :func:`adam_context` for the step.
    Returns ``(dtheta_next, (dm_next, dv_next))``.
    """
    dm, dv = dstate
    dd = dgrad + ctx["lam_c"] * dtheta
    dm_next = ctx["b1"] * dm + ctx["one_b1"] * dd
    dv_next = ctx["b2"] * dv + 2 * ctx["one_b2"] * ctx["d"] * dd
    dtheta_next = ctx["rho"] * dtheta + ctx["alpha"] * dm_next + ctx["beta"] * dv_next
    return dtheta_next, (dm_next, dv_next)


def adam_adjoint_step(theta_bar, state_bar, ctx):
    """Transpose of :func:`adam_tangent_step` for stacked cotangents ``(..., P)``.

    Given the adjoints of ``(theta', m', v')`` returns ``(g_bar, theta_bar_prev,
    (m_bar_prev, v_bar_prev))``: ``g_bar`` is the adjoint of the batch gradient (sample
    ``i`` in the batch contributes ``N * w * g_bar . g_i``) and ``theta_bar_prev`` still
    lacks the Hessian term ``H g_bar``, which the caller adds in exact mode.
    """
    m_bar, v_bar = state_bar
    mt = m_bar + ctx["alpha"] * theta_bar
    vt = v_bar + ctx["beta"] * theta_bar
    g_bar = ctx["one_b1"] * mt + 2 * ctx["one_b2"] * ctx["d"] * vt
    theta_bar_prev = ctx["rho"] * theta_bar + ctx["lam_c"] * g_bar
    return g_bar, theta_bar_prev, (ctx["b1"] * mt, ctx["b2"] * vt)
