"""Pure torch building blocks: flat parameter vectors, per-sample losses and gradients, HVPs.

Nothing here knows about skorch or numpy inputs. A *model* is described by a
:class:`ParamSpec` (how a flat parameter vector maps onto named module parameters)
and a ``loss_fn(theta, x, y) -> per-sample losses`` closure built by the caller.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.func import grad, jacrev, jvp, vmap

__all__ = [
    "ParamSpec",
    "per_sample_grads",
    "per_sample_dots_and_hvp",
    "rng_context",
]


@dataclass
class ParamSpec:
    """Layout of a flat parameter vector.

    Parameters are ordered as in the optimizer's ``param_groups`` (group by group), so
    every optimizer hyperparameter is a per-group scalar that expands to a
    per-coordinate vector with :meth:`expand`.

    Attributes
    ----------
    names : list of str
        Module parameter names, in flat order.
    shapes : list of torch.Size
    group_sizes : list of int
        Number of flat coordinates in each optimizer parameter group.
    """

    names: list
    shapes: list
    group_sizes: list
    numels: list = field(init=False)

    def __post_init__(self):
        self.numels = [int(torch.Size(s).numel()) for s in self.shapes]
        if sum(self.numels) != sum(self.group_sizes):
            raise ValueError("group_sizes must add up to the number of parameters")

    @property
    def n_params(self) -> int:
        return sum(self.numels)

    @property
    def n_groups(self) -> int:
        return len(self.group_sizes)

    def unflatten(self, theta: torch.Tensor) -> dict:
        """Split a flat vector into a ``{name: tensor}`` dict of views (functorch-safe)."""
        chunks = torch.split(theta, self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def flatten(self, tensors) -> torch.Tensor:
        """Concatenate tensors (a dict by name or a sequence in flat order) into one vector."""
        if isinstance(tensors, dict):
            tensors = [tensors[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def expand(self, per_group: torch.Tensor) -> torch.Tensor:
        """Expand per-group values ``(..., n_groups)`` to per-coordinate ``(..., n_params)``."""
        sizes = torch.as_tensor(self.group_sizes, device=per_group.device)
        return torch.repeat_interleave(per_group, sizes, dim=-1)


@contextlib.contextmanager
def rng_context(rng_state, device=None):
    """Run a block with the global torch RNG set to ``rng_state``, restoring it after.

    ``rng_state`` is ``(cpu_state, cuda_state_or_None)`` as recorded during training, or
    None (nothing is touched). Used to replay dropout masks exactly.
    """
    if rng_state is None:
        yield
        return
    cpu_state, cuda_state = rng_state
    devices = [device] if (cuda_state is not None and device is not None) else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
        yield


def _unsqueeze(x):
    """Add a leading batch axis to a tensor or to every tensor of a dict/tuple (dict inputs)."""
    if isinstance(x, dict):
        return {k: _unsqueeze(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_unsqueeze(v) for v in x)
    return x.unsqueeze(0)


def per_sample_grads(loss_fn, theta, x, y, *, independent=True, rng_state=None):
    """Gradients of every sample's loss, shape ``(batch, n_params)``.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(theta, x, y) -> (batch,)`` per-sample losses of a batch.
    theta : torch.Tensor
        Flat parameters, shape ``(n_params,)``.
    x, y : torch.Tensor
        The batch.
    independent : bool, default=True
        If True, samples do not interact (no BatchNorm in train mode, no dropout) and
        gradients are computed with ``vmap(grad)`` over single samples, at about the
        cost of one batch backward pass. If False, the whole batch is run forward once
        (batch statistics and dropout masks as in training) and the Jacobian of the
        loss vector is taken with ``jacrev``: exact with coupling, ``batch`` backward
        passes.
    rng_state : tuple or None
        RNG state to replay (dropout masks), see :func:`rng_context`.
    """
    if independent:
        def one(t, xi, yi):
            return loss_fn(t, _unsqueeze(xi), _unsqueeze(yi)).sum()

        return vmap(grad(one), in_dims=(None, 0, 0))(theta, x, y)
    with rng_context(rng_state, theta.device if theta.is_cuda else None):
        return jacrev(lambda t: loss_fn(t, x, y))(theta)


def per_sample_dots_and_hvp(loss_fn, theta, x, y, weights, vectors, *, hessian=True,
                            rng_state=None, vectorize=True):
    """For each vector ``v_m``: per-sample dots ``grad l_k . v_m`` and the batch HVP ``H v_m``.

    The batch loss is ``sum_k weights[k] * l_k(theta)``. One forward-over-reverse pass
    per vector gives both quantities: the JVP of the per-sample loss vector along
    ``v`` (the dots, exact with batch coupling and replayed dropout) and the JVP of
    the batch gradient (the Hessian-vector product).

    Parameters
    ----------
    vectors : torch.Tensor
        Shape ``(m, n_params)``.
    hessian : bool
        If False only the dots are computed (``hvp`` is None).
    vectorize : bool
        Use ``vmap`` over the vectors; set False when the forward pass is random
        (dropout), so each vector replays the same masks from ``rng_state``.

    Returns
    -------
    dots : torch.Tensor, shape ``(m, batch)``
    hvp : torch.Tensor or None, shape ``(m, n_params)``
    """
    def losses(t):
        return loss_fn(t, x, y)

    if hessian:
        def f(t):
            g, lv = grad(lambda u: _weighted_with_aux(losses, u, weights), has_aux=True)(t)
            return lv, g

        def one(v):
            with rng_context(rng_state, theta.device if theta.is_cuda else None):
                _, (dots, hv) = jvp(f, (theta,), (v,))
            return dots, hv
    else:
        def one(v):
            with rng_context(rng_state, theta.device if theta.is_cuda else None):
                _, dots = jvp(losses, (theta,), (v,))
            return dots, None

    if vectorize and rng_state is None:
        if hessian:
            dots, hv = vmap(lambda v: one(v))(vectors)
            return dots, hv
        dots = vmap(lambda v: one(v)[0])(vectors)
        return dots, None
    outs = [one(v) for v in vectors]
    dots = torch.stack([o[0] for o in outs])
    hv = torch.stack([o[1] for o in outs]) if hessian else None
    return dots, hv


def _weighted_with_aux(losses, t, weights):
    lv = losses(t)
    return (weights * lv).sum(), lv
