"""BatchNorm running statistics as a differentiable function of the training trajectory.

A network with BatchNorm is trained with batch statistics but evaluated (``eval()``)
with *running* statistics, an exponential moving average of the batch statistics seen
during training::

    R_{t+1} = (1 - f_t) * R_t + f_t * S_t(theta_t)

where ``S_t`` stacks, per BatchNorm layer, the batch mean and the unbiased batch
variance of the layer's input at step ``t`` (computed at the parameters ``theta_t``
before the step) and ``f_t`` is the layer's ``momentum`` (or ``1 / num_batches_tracked``
when ``momentum is None``). Unrolled, ``R_T = a * R_0 + sum_t c_t * S_t(theta_t)`` with
per-layer coefficients ``c_t = f_t * prod_{s > t} (1 - f_s)``.

Sample weights ``eps`` do not enter ``S_t`` directly (batch statistics are plain means
over the batch), only through ``theta_t``; so the exact derivative of an eval-mode test
loss ``L(theta_T, R_T)`` adds, at every step of the adjoint sweep,
``J_{S_t}(theta_t)^T (c_t * dL/dR_T)`` to the parameter adjoint. This module provides
the pieces: :class:`BatchNormStats` finds the layers, captures ``S_t`` from a train-mode
forward pass with hooks, evaluates eval-mode outputs differentiably in ``R`` (torch's
batch-norm kernel is not differentiable in its running statistics), and computes the
coefficients. Nothing here knows about skorch.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BatchNormStats"]


class BatchNormStats:
    """The running statistics of every tracking BatchNorm layer of ``module``.

    The flat running-statistics vector ``R`` holds, layer by layer (in
    ``named_modules`` order), ``running_mean`` then ``running_var``.

    Parameters
    ----------
    module : torch.nn.Module
        The network; layers are found once and hooks are attached to these objects
        (so they fire inside ``torch.func.functional_call`` on the same module).
    """

    def __init__(self, module):
        self.layers = [(name, m) for name, m in module.named_modules()
                       if isinstance(m, _BatchNorm) and m.track_running_stats
                       and m.running_mean is not None]
        self.sizes = [int(m.num_features) for _, m in self.layers]

    def __len__(self):
        return len(self.layers)

    @property
    def n_stats(self) -> int:
        """Length of the flat running-statistics vector."""
        return 2 * sum(self.sizes)

    @property
    def buffer_names(self):
        """Module buffer names in flat order."""
        return [f"{name}.{b}" if name else b
                for name, _ in self.layers for b in ("running_mean", "running_var")]

    # -- flat vectors ----------------------------------------------------------------
    def flat(self, buffers=None):
        """Flat ``R`` from a ``{buffer_name: tensor}`` dict (default: the modules' buffers)."""
        if buffers is None:
            parts = [t for _, m in self.layers for t in (m.running_mean, m.running_var)]
        else:
            parts = [buffers[n] for n in self.buffer_names]
        if not parts:
            return torch.zeros(0)
        return torch.cat([p.detach().reshape(-1) for p in parts]).clone()

    def split(self, R):
        """Per-layer ``(mean, var)`` views of a flat ``R`` (..., n_stats)."""
        chunks = torch.split(R, [s for s in self.sizes for _ in range(2)], dim=-1)
        return [(chunks[2 * k], chunks[2 * k + 1]) for k in range(len(self.layers))]

    def load(self, R):
        """Copy a flat ``R`` into the layers' buffers (in place)."""
        with torch.no_grad():
            for (mean, var), (_, m) in zip(self.split(R), self.layers):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)

    def expand(self, per_layer):
        """Expand per-layer values ``(..., n_layers)`` to per-coordinate ``(..., n_stats)``."""
        sizes = torch.as_tensor([s for s in self.sizes for _ in range(2)],
                                device=per_layer.device)
        per_stat = torch.repeat_interleave(per_layer, 2, dim=-1)
        return torch.repeat_interleave(per_stat, sizes, dim=-1)

    # -- the moving average ----------------------------------------------------------
    def factors(self, n_steps, counts0):
        """Averaging factor ``f_t`` of every step and layer, float64 ``(n_steps, n_layers)``.

        ``counts0`` are the layers' ``num_batches_tracked`` before the first step (used
        when ``momentum is None``: cumulative average ``f = 1 / count``).
        """
        f = np.empty((int(n_steps), len(self.layers)), dtype=np.float64)
        steps = np.arange(1, int(n_steps) + 1, dtype=np.float64)
        for k, (_, m) in enumerate(self.layers):
            if m.momentum is None:
                f[:, k] = 1.0 / (float(counts0[k]) + steps)
            else:
                f[:, k] = float(m.momentum)
        return torch.from_numpy(f)

    def counts(self, buffers=None):
        """``num_batches_tracked`` of every layer (from ``buffers`` or the modules)."""
        out = []
        for name, m in self.layers:
            key = f"{name}.num_batches_tracked" if name else "num_batches_tracked"
            if buffers is not None and key in buffers:
                out.append(int(buffers[key]))
            elif m.num_batches_tracked is not None:
                out.append(int(m.num_batches_tracked))
            else:
                out.append(0)
        return out

    @staticmethod
    def coefficients(factors):
        """``(a, c)``: ``R_T = a * R_0 + sum_t c[t] * S_t`` per layer, from :meth:`factors`."""
        n_steps = factors.shape[0]
        c = torch.empty_like(factors)
        keep = torch.ones(factors.shape[1], dtype=factors.dtype)
        for t in range(n_steps - 1, -1, -1):
            c[t] = factors[t] * keep
            keep = keep * (1 - factors[t])
        return keep, c

    def update(self, R, S, factor):
        """One moving-average step ``(1 - f) R + f S`` with per-layer ``factor``."""
        fe = self.expand(factor.to(R.device, R.dtype))
        return (1 - fe) * R + fe * S

    # -- hooks -----------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self):
        """Collect the batch statistics ``S`` of train-mode forward passes.

        Yields a list; after a forward pass it holds one ``(mean, unbiased var)`` pair
        per layer (in layer order), built from the layer's input, so it is
        differentiable in the parameters under ``torch.func`` transforms. Use
        :meth:`gather` to turn it into the flat ``S``.
        """
        seen = {id(m): [] for _, m in self.layers}

        def hook(mod, args):
            if mod.training:
                x = args[0]
                dims = [0] + list(range(2, x.dim()))
                seen[id(mod)].append((x.mean(dim=dims), x.var(dim=dims, correction=1)))

        handles = [m.register_forward_pre_hook(hook) for _, m in self.layers]
        try:
            yield seen
        finally:
            for h in handles:
                h.remove()

    def gather(self, seen):
        """Flat ``S`` from a :meth:`capture` record; every layer must run exactly once."""
        parts = []
        for name, m in self.layers:
            calls = seen[id(m)]
            if len(calls) != 1:
                raise NotImplementedError(
                    f"BatchNorm layer {name!r} ran {len(calls)} times in one training forward "
                    f"pass; hydrattr differentiates running statistics only for layers that "
                    f"run exactly once per batch.")
            parts.extend(calls[0])
            calls.clear()
        return torch.cat(parts)

    @contextlib.contextmanager
    def evaluate_with(self, R):
        """Eval-mode BatchNorm outputs computed explicitly from the flat ``R``.

        Inside the block, every layer in eval mode returns
        ``(x - mean) / sqrt(var + eps) * weight + bias`` with ``(mean, var)`` taken from
        ``R`` (so gradients flow into ``R``) instead of its own buffers. Train-mode
        layers are untouched.
        """
        per_layer = self.split(R)

        def make(k):
            def hook(mod, args, output):
                if mod.training:
                    return output
                x = args[0]
                shape = [1, -1] + [1] * (x.dim() - 2)
                mean, var = per_layer[k]
                out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + mod.eps)
                if mod.affine:
                    out = out * mod.weight.view(shape) + mod.bias.view(shape)
                return out
            return hook

        handles = [m.register_forward_hook(make(k)) for k, (_, m) in enumerate(self.layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # -- wrapped loss functions ------------------------------------------------------
    def loss_and_stats(self, loss_fn):
        """``f(theta, x, y) -> (losses, S)``: train-mode losses and batch statistics."""
        def f(theta, x, y):
            with self.capture() as seen:
                losses = loss_fn(theta, x, y)
            return losses, self.gather(seen)
        return f

    def eval_loss(self, loss_fn):
        """``f(theta, R, x, y) -> losses``: eval-mode losses with running statistics ``R``."""
        def f(theta, R, x, y):
            with self.evaluate_with(R):
                return loss_fn(theta, x, y)
        return f
