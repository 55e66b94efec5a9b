"""Sweeps over a recorded trajectory that turn test gradients into contributions.

Every function returns ``D`` with ``D[k, m] = (1/N) d objective_m / d eps_{rows[k]}``,
so the contribution matrix is ``C = -D`` (N cancels: sample ``i`` enters step ``t``'s
batch loss with weight ``w_t * (1 + N eps_i)``).

* :func:`build_fast_store` and :func:`fast_replay`: fast mode (Hessian dropped). Its
  adjoint coefficients are per-group scalars known once training ends
  (:func:`~hydrattr._core.sgd.fast_coefficients`), so each step only needs the batch's
  per-sample gradients: O(batch x params) work per step, never O(N x params).
* :func:`exact_adjoint`: exact mode, reverse mode through the whole run. One backward
  pass over the steps gives all N samples for a block of objectives, at the cost of one
  forward-over-reverse product per objective per step.
* :func:`exact_forward`: the paper's forward recurrence for a few tracked samples
  (one HVP per tracked sample per step); the reference the adjoint is tested against.

Each takes ``start`` (default 0): the sample weights ``eps`` act only in steps
``t >= start`` (a hypergradient truncated to the end of training); earlier steps still
move the parameters but contribute no per-sample term, and the reverse sweep stops there.
"""
from __future__ import annotations

import numpy as np
import torch

from .functional import batch_products, per_sample_dots_and_hvp, per_sample_grads, \
    take_batch_rows
from .steps import batch_grad, steps_for

__all__ = ["build_fast_store", "fast_replay", "exact_adjoint", "exact_forward",
           "running_coefficients"]


def _window(order, start):
    """The steps of ``order`` (forward or backward) from ``start`` on."""
    return [t for t in order if t >= start]


def _tracked(rows_map, idx):
    slots = rows_map[idx]
    sel = slots >= 0
    return sel, slots


def _steps(traj, steps):
    """``steps`` (default ``steps_for(traj)``), checked to be the step algebra of ``traj``."""
    if steps is None:
        return steps_for(traj)
    if getattr(steps, "traj", None) is not traj:
        raise ValueError("steps: expected the step algebra of this trajectory, "
                         "steps_for(traj, ...)")
    return steps


def _bar(progress, total, desc):
    if progress is None:
        return None
    return progress(total=total, desc=desc)


def _batch_grad(traj, t, loss_fn, theta, x, y):
    """Step ``t``'s batch gradient at ``theta`` (the recorded weights and RNG state)."""
    w = torch.full((len(traj.indices[t]),), traj.weights[t], dtype=theta.dtype,
                   device=theta.device)
    return batch_grad(loss_fn, theta, x, y, w, traj.rng_states[t])


def _step_context(steps, traj, t, loss_fn, data_fn, device):
    """The step's linearisation point (None for SGD; Adam needs ``g_t``, ``m_t``, ``v_t``)."""
    if not steps.needs_grad:
        return None
    x, y = data_fn(traj.indices[t])
    theta = traj.theta(t, device)
    return steps.context(t, theta, _batch_grad(traj, t, loss_fn, theta, x, y))


def _fast_step_grads(traj, t, loss_fn, data_fn, sel, independent, need_batch, device):
    """``(theta_t, g, g_batch)``: tracked rows' per-sample gradients (None if no row is
    tracked) and, when ``need_batch``, the batch gradient (from the per-sample rows when
    the whole batch was computed, else by a separate backward pass)."""
    x, y = data_fn(traj.indices[t])
    theta = traj.theta(t, device)
    g = g_batch = None
    if sel.any():
        if independent and not sel.all():
            m = torch.as_tensor(sel)
            g = per_sample_grads(loss_fn, theta, take_batch_rows(x, m), take_batch_rows(y, m),
                                 independent=True)
        else:
            g = per_sample_grads(loss_fn, theta, x, y, independent=independent,
                                 rng_state=traj.rng_states[t])
            if need_batch:
                g_batch = traj.weights[t] * g.sum(0)
            g = g[torch.as_tensor(sel, device=g.device)]
    if need_batch and g_batch is None:
        g_batch = _batch_grad(traj, t, loss_fn, theta, x, y)
    return theta, g, g_batch


def _fast_steps(traj, loss_fn, data_fn, rows_map, independent, device, progress, start,
                desc):
    """The fast sweep's steps that hold tracked rows, in the order its coefficients need.

    Yields ``(slots, g, coef, w)``: the tracked rows' slots, their per-sample gradients,
    the step's fast-mode adjoint coefficient ``coef_t`` (per group for SGD, per
    coordinate for Adam, see :mod:`~hydrattr._core.steps`; Adam's are computed last step
    first) and its sample weight ``w_t``.
    """
    fast = steps_for(traj).fast()
    bar = _bar(progress, len(traj) - start, desc)
    for t in _window(fast.order, start):
        sel, slots = _tracked(rows_map, traj.indices[t])
        if sel.any() or fast.needs_grad:
            theta, g, g_batch = _fast_step_grads(traj, t, loss_fn, data_fn, sel, independent,
                                                 fast.needs_grad, device)
            coef = fast.coef_at(t, theta, g_batch)
            if g is not None:
                yield slots[sel], g, coef, traj.weights[t]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def build_fast_store(traj, loss_fn, data_fn, store, rows_map, *, independent=True,
                     device=None, progress=None, start=0):
    """Accumulate ``S[slot(i)] = sum_t w_t * coef_t * g_{t,i}`` into ``store``.

    ``rows_map`` maps data rows to store slots (-1 = not tracked); ``coef_t`` is the
    fast-mode adjoint coefficient of step ``t`` (:func:`_fast_steps`).
    """
    for slots, g, coef, w in _fast_steps(traj, loss_fn, data_fn, rows_map, independent,
                                         device, progress, start,
                                         "HYDRA fast: per-sample gradients"):
        store.add(slots, g * (w * coef).to(g.device, g.dtype))
    return store


def fast_replay(traj, loss_fn, data_fn, test_grads, rows_map, n_tracked, *,
                independent=True, device=None, progress=None, start=0):
    """Fast mode without a store: ``D = S @ test_grads.T`` by replaying the trajectory."""
    G = test_grads.to(device)
    out = torch.zeros(n_tracked, G.shape[0], dtype=torch.float64)
    for slots, g, coef, w in _fast_steps(traj, loss_fn, data_fn, rows_map, independent,
                                         device, progress, start, "HYDRA fast: replay"):
        d_bar = coef.to(G.device, G.dtype) * G
        out[torch.as_tensor(slots)] += w * (g @ d_bar.T).double().cpu()
    return out


def running_coefficients(traj, bn):
    """Per-step, per-layer coefficients ``c`` of ``R_T = a R_0 + sum_t c_t S_t`` (float64).

    The layers' ``num_batches_tracked`` before training come from the trajectory's
    ``buffers0`` when recorded, otherwise from the trained modules minus the number of
    steps (one update per step).
    """
    buffers0 = getattr(traj, "buffers0", None)
    if buffers0 is not None:
        counts0 = bn.counts(buffers0)
    else:
        counts0 = [c - len(traj) for c in bn.counts()]
    _, c = bn.coefficients(bn.factors(len(traj), counts0))
    return c


def exact_adjoint(traj, loss_fn, data_fn, test_grads, rows_map, n_tracked, *,
                  hessian=True, device=None, progress=None, vectorize=True, bn=None,
                  stats_grads=None, start=0, adjoint_dtype=None, steps=None, on_step=None):
    """Reverse-mode sweep: ``D`` for a block of objectives ``test_grads`` (m, P).

    Runs the transposed optimizer step backward from ``theta_bar_T = test_grads``;
    at each step the batch's forward-over-reverse product gives the per-sample dots
    ``d_bar . g_{t,i}`` and, when ``hessian``, ``H_t d_bar`` for the next adjoint.

    With BatchNorm running statistics (``bn``, a
    :class:`~hydrattr._core.running_stats.BatchNormStats`, and ``stats_grads`` (m, n_stats),
    the objectives' gradients with respect to the final running statistics ``R_T``),
    each step also adds ``J_{S_t}^T (c_t * stats_grads)`` to the parameter adjoint, in
    the same forward-over-reverse pass, so ``D`` includes the path
    ``eps -> theta_t -> batch statistics -> R_T -> eval-mode test loss``.

    ``steps`` (default ``steps_for(traj)``) is the step algebra the sweep transposes,
    built for this ``traj`` by :func:`~hydrattr._core.steps.steps_for`; e.g.
    ``steps_for(traj, freeze_preconditioner=True)`` differentiates Adam with its
    preconditioner held constant.

    ``on_step`` (optional) is the sweep's one per-step hook, called for every step, last
    first, as ``on_step(t, theta_bar, slots, terms)`` once step ``t`` is done:

    * ``theta_bar`` (m, P) is the adjoint of ``theta(t)``, the parameters after ``t``
      steps. The hook returns the adjoint to carry on with (None: unchanged). Adding
      ``g`` (m, P) there adds to the objectives ``g . theta(t)``: with ``g`` the
      gradient of a loss at ``theta(t)``, an objective row that is zero in
      ``test_grads`` becomes that loss measured at the checkpoint ``theta(t)``; the
      sweep updates ``theta_bar`` in place, so a hook that keeps it must copy it (at
      ``t == start`` the sweep ends, and a loss at ``theta(start)`` has no per-sample
      term: the sample weights act only from ``start`` on).
    * ``slots`` (int array) are the rows of ``D`` in step ``t``'s batch, and ``terms``
      (len(slots), m), float64 on the CPU, their step-``t`` terms, already added to
      ``D``; ``D`` is the sum of ``terms`` over the steps, so a hook that accumulates
      them by step group splits ``D`` (e.g. by epoch).

    ``adjoint_dtype`` (default: that of ``test_grads``) is the dtype the adjoints
    ``theta_bar`` and the optimizer-state adjoints are carried in from step to step;
    the per-step products stay in the parameters' dtype. With float32 parameters,
    float64 adjoints keep increments that float32 rounds away: weight decay's
    ``lr * weight_decay`` (2e-8 per step at lr 1e-3, weight decay 2e-5) is below
    float32's resolution; over 15,640 LeNet-5 steps a float32 adjoint shrank every
    score by about 2.6e-5 of itself against float64 coefficients.
    """
    steps = _steps(traj, steps)
    theta_bar = test_grads.to(device=device, dtype=adjoint_dtype).clone()
    pdt = traj.dtype  # the per-step products run in the parameters' dtype
    v_bar = steps.adjoint_state(theta_bar)
    # the adjoints are updated in place where the step algebra allows it (SGD): at a
    # hundred stacked columns, fresh (m, P) results each step cost more than the products
    in_place = hasattr(steps, "adjoint_")
    d_buf = torch.empty_like(theta_bar) if in_place else None
    d_p_buf = None
    m = theta_bar.shape[0]
    out = torch.zeros(n_tracked, m, dtype=torch.float64)
    use_stats = bn is not None and len(bn) > 0 and stats_grads is not None and hessian
    if use_stats:
        coef = running_coefficients(traj, bn)
        r_bar = stats_grads.to(theta_bar.device, theta_bar.dtype)
        stats_fn = bn.loss_and_stats(loss_fn)
    bar = _bar(progress, len(traj) - start, "HYDRA exact: adjoint sweep")
    for t in range(len(traj) - 1, start - 1, -1):
        ctx = _step_context(steps, traj, t, loss_fn, data_fn, device)
        if in_place:
            d_bar, theta_bar, v_bar = steps.adjoint_(t, theta_bar, v_bar, d_buf, ctx)
        else:
            d_bar, theta_bar, v_bar = steps.adjoint(t, theta_bar, v_bar, ctx)
        idx = traj.indices[t]
        sel, slots = _tracked(rows_map, idx)
        terms = None
        if hessian or sel.any():
            x, y = data_fn(idx)
            w = torch.full((len(idx),), traj.weights[t], dtype=pdt, device=d_bar.device)
            if d_bar.dtype == pdt:
                d_p = d_bar
            else:
                if d_p_buf is None:
                    d_p_buf = torch.empty(d_bar.shape, dtype=pdt, device=d_bar.device)
                d_p = d_p_buf.copy_(d_bar)
            if use_stats:
                rho = (bn.expand(coef[t]).to(r_bar.device, r_bar.dtype) * r_bar).to(pdt)
                dots, hv, _ = batch_products(
                    loss_fn, traj.theta(t, device), x, y, w, d_p, hessian=True,
                    stats_fn=stats_fn, stats_cotangents=rho, rng_state=traj.rng_states[t],
                    vectorize=vectorize)
            else:
                dots, hv = per_sample_dots_and_hvp(
                    loss_fn, traj.theta(t, device), x, y, w, d_p, hessian=hessian,
                    rng_state=traj.rng_states[t], vectorize=vectorize)
            if hessian:
                theta_bar.add_(hv)
            if sel.any():
                contrib = traj.weights[t] * dots.T[torch.as_tensor(sel, device=dots.device)]
                terms = contrib.double().cpu()
                out[torch.as_tensor(slots[sel])] += terms
        if on_step is not None:
            if terms is None:
                terms = torch.zeros(0, m, dtype=torch.float64)
            new = on_step(t, theta_bar, slots[sel], terms)
            if new is not None:
                if new.shape != theta_bar.shape:
                    raise ValueError(f"on_step must return the adjoint's shape "
                                     f"{tuple(theta_bar.shape)} or None, got "
                                     f"{tuple(new.shape)} at step {t}")
                if new is not theta_bar:
                    theta_bar.copy_(new)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


def exact_forward(traj, loss_fn, data_fn, rows, *, hessian=True, device=None,
                  progress=None, vectorize=True, bn=None, start=0, steps=None):
    """The paper's forward recurrence for the data rows ``rows``.

    Returns the tangents ``(1/N) d theta_T / d eps_i`` stacked ``(len(rows), P)``;
    ``D = tangents @ test_grads.T``. With ``bn`` (BatchNorm running statistics) returns
    ``(tangents, stats_tangents)``, the second ``(len(rows), n_stats)`` holding
    ``(1/N) d R_T / d eps_i``; then ``D = tangents @ G.T + stats_tangents @ G_R.T``.
    ``steps``: the step algebra, as in :func:`exact_adjoint`.
    """
    spec = traj.spec
    steps = _steps(traj, steps)
    rows = np.asarray(rows, dtype=np.int64)
    theta0 = traj.theta(0, device)
    dtheta = torch.zeros(len(rows), spec.n_params, dtype=theta0.dtype, device=theta0.device)
    dv = steps.tangent_state(dtheta)
    use_stats = bn is not None and len(bn) > 0
    if use_stats:
        coef = running_coefficients(traj, bn)
        stats_fn = bn.loss_and_stats(loss_fn)
        dR = torch.zeros(len(rows), bn.n_stats, dtype=theta0.dtype, device=theta0.device)
    pos = {int(r): k for k, r in enumerate(rows)}
    bar = _bar(progress, len(traj) - start, "HYDRA forward recurrence")
    for t in range(start, len(traj)):  # the tangents are zero before ``start``
        idx = traj.indices[t]
        x, y = data_fn(idx)
        theta = traj.theta(t, device)
        dgrad = torch.zeros_like(dtheta)
        if hessian or use_stats:
            w = torch.full((len(idx),), traj.weights[t], dtype=theta.dtype, device=theta.device)
            _, hv, ds = batch_products(loss_fn, theta, x, y, w, dtheta, hessian=hessian,
                                       stats_fn=stats_fn if use_stats else None,
                                       rng_state=traj.rng_states[t], vectorize=vectorize)
            if hessian:
                dgrad = dgrad + hv
            if use_stats:
                dR = dR + bn.expand(coef[t]).to(dR.device, dR.dtype) * ds
        hit = [(b, pos[int(r)]) for b, r in enumerate(idx) if int(r) in pos]
        if hit:
            g = per_sample_grads(loss_fn, theta, x, y, independent=False,
                                 rng_state=traj.rng_states[t])
            for b, k in hit:
                dgrad[k] += traj.weights[t] * g[b]
        ctx = steps.context(t, theta, _batch_grad(traj, t, loss_fn, theta, x, y)) \
            if steps.needs_grad else None
        dtheta, dv = steps.tangent(t, dtheta, dv, dgrad, ctx)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if use_stats:
        return dtheta, dR
    return dtheta
