"""Pure torch building blocks: flat parameter vectors, per-sample losses and gradients, HVPs.

Nothing here knows about skorch or numpy inputs. A *model* is described by a
:class:`ParamSpec` (how a flat parameter vector maps onto named module parameters)
and a ``loss_fn(theta, x, y) -> per-sample losses`` closure built by the caller.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch
from torch.func import grad, jacrev, jvp, vmap

__all__ = [
    "ParamSpec",
    "per_sample_grads",
    "per_sample_dots_and_hvp",
    "batch_products",
    "rng_context",
    "unsqueeze",
    "take_batch_rows",
    "load_jvp_decompositions",
]


_JVP_READY = False


def load_jvp_decompositions():
    """Import torch's forward-mode decompositions once, without the warning it prints.

    torch builds them with ``torch.jit.script`` on first use of forward-mode AD, which
    in torch >= 2.10 warns ``FutureWarning: torch.jit.script is deprecated`` from inside
    torch: nothing a hydrattr user can act on, so it is silenced for that import only.
    """
    global _JVP_READY
    if _JVP_READY:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated",
                                category=FutureWarning)
        try:
            import torch._decomp.decompositions_for_jvp  # noqa: F401
        except ImportError:  # pragma: no cover - moved in a later torch
            pass
    _JVP_READY = True


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


def unsqueeze(x):
    """Add a leading batch axis to a tensor or to every tensor of a dict/tuple (dict inputs)."""
    if isinstance(x, dict):
        return {k: unsqueeze(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(unsqueeze(v) for v in x)
    return x.unsqueeze(0)


def take_batch_rows(x, mask):
    """Rows ``mask`` (bool tensor) of a batch: a tensor, or a dict/tuple of tensors."""
    if isinstance(x, dict):
        return {k: take_batch_rows(v, mask) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(take_batch_rows(v, mask) for v in x)
    return x[mask.to(x.device)]


def per_sample_grads(loss_fn, theta, x, y, *, independent=True, rng_state=None,
                     vectorize=None):
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
    vectorize : bool or None, default=None
        Only with ``independent=False``: True takes the Jacobian with ``jacrev`` (the
        ``batch`` vector-Jacobian products vmapped into one batched backward pass);
        False runs one forward pass and ``batch`` ordinary backward passes through the
        retained graph, which returns gradients detached from ``theta`` (callers that
        differentiate through them must vectorize). None: True on CUDA, False on the
        CPU (where the vmapped backward, which materialises ``batch`` copies of every
        activation gradient, is the slower one; docs/architecture.rst, Decision 6).
    """
    if independent:
        def one(t, xi, yi):
            return loss_fn(t, unsqueeze(xi), unsqueeze(yi)).sum()

        return vmap(grad(one), in_dims=(None, 0, 0))(theta, x, y)
    if vectorize is None:
        vectorize = theta.is_cuda
    with rng_context(rng_state, theta.device if theta.is_cuda else None):
        if vectorize:
            return jacrev(lambda t: loss_fn(t, x, y))(theta)
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            losses = loss_fn(t, x, y)
            rows = []
            for i in range(losses.shape[0]):
                (g,) = torch.autograd.grad(losses[i], t, retain_graph=i < losses.shape[0] - 1,
                                           allow_unused=True)
                rows.append(torch.zeros_like(t) if g is None else g)
        return torch.stack(rows)


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
    rng_state : tuple or None
        RNG state replayed for the forward pass (dropout masks).
    vectorize : bool
        Use ``vmap`` over the vectors. With ``rng_state`` the map runs with
        ``randomness="same"``, so every vector sees the masks that one unbatched forward
        pass from ``rng_state`` draws; False loops over the vectors instead, replaying
        ``rng_state`` for each (the reference).

    Returns
    -------
    dots : torch.Tensor, shape ``(m, batch)``
    hvp : torch.Tensor or None, shape ``(m, n_params)``
    """
    dots, hv, _ = batch_products(loss_fn, theta, x, y, weights, vectors, hessian=hessian,
                                 rng_state=rng_state, vectorize=vectorize)
    return dots, hv


def batch_products(loss_fn, theta, x, y, weights, vectors, *, hessian=True, stats_fn=None,
                   stats_cotangents=None, rng_state=None, vectorize=True):
    """Forward-over-reverse products of one training batch, for a stack of vectors.

    For every vector ``v_m`` (one forward-over-reverse pass each, or one vmapped pass
    for all) returns the per-sample dots ``J_l v_m`` (JVP of the per-sample losses),
    the batch Hessian-vector product ``H v_m`` of ``sum_k weights[k] * l_k`` and,
    with BatchNorm running statistics (``stats_fn``), the JVP of the batch statistics
    ``J_S v_m``; with ``stats_cotangents`` ``rho_m`` the VJP ``J_S^T rho_m`` is added to
    the HVP in the same pass. The trick: the gradient of
    ``sum_k w_k l_k(u) + alpha * rho . S(u)`` is pushed forward along
    ``(v, d alpha = 1)`` at ``alpha = 0``, whose tangent is exactly ``H v + J_S^T rho``.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(theta, x, y) -> (batch,)`` per-sample losses (train mode).
    vectors : torch.Tensor, shape ``(m, n_params)``
    hessian : bool
        Compute the HVP (otherwise only dots and stats JVPs).
    stats_fn : callable or None
        ``stats_fn(theta, x, y) -> (losses, S)``, used instead of ``loss_fn`` when given
        (see :class:`~hydrattr._core.running_stats.BatchNormStats.loss_and_stats`).
    stats_cotangents : torch.Tensor or None, shape ``(m, n_stats)``
        ``rho_m``; requires ``stats_fn`` and ``hessian``.
    rng_state, vectorize : see :func:`per_sample_dots_and_hvp`.

    Returns
    -------
    dots : torch.Tensor, shape ``(m, batch)``
    hvp : torch.Tensor or None, shape ``(m, n_params)``
        ``H v_m`` (+ ``J_S^T rho_m`` with ``stats_cotangents``); None without ``hessian``.
    dstats : torch.Tensor or None, shape ``(m, n_stats)``
        ``J_S v_m`` when ``stats_fn`` is given.
    """
    has_stats = stats_fn is not None
    load_jvp_decompositions()
    with_rho = stats_cotangents is not None
    if with_rho and not (has_stats and hessian):
        raise ValueError("stats_cotangents needs stats_fn and hessian=True")

    def fwd(t):  # (losses,) or (losses, S): tensors only, for the transforms
        if has_stats:
            return tuple(stats_fn(t, x, y))
        return (loss_fn(t, x, y),)

    def split(aux):
        return aux[0], (aux[1] if has_stats else None)

    if hessian:
        def f(t, alpha, rho):
            def obj(u):
                out = fwd(u)
                val = (weights * out[0]).sum()
                if rho is not None:
                    val = val + alpha * (rho * out[1]).sum()
                return val, out

            g, aux = grad(obj, has_aux=True)(t)
            return aux, g

        def one(v, rho):
            zero = torch.zeros((), dtype=theta.dtype, device=theta.device)
            _, (daux, hv) = jvp(lambda t, a: f(t, a, rho), (theta, zero),
                                (v, torch.ones_like(zero)))
            dl, ds = split(daux)
            return dl, hv, ds
    else:
        def one(v, rho):
            _, daux = jvp(fwd, (theta,), (v,))
            dl, ds = split(daux)
            return dl, None, ds

    device = theta.device if theta.is_cuda else None
    rhos = stats_cotangents
    if vectorize:
        def mapped(v, rho):
            dl, hv, ds = one(v, rho)
            return tuple(o for o in (dl, hv, ds) if o is not None)

        in_dims = (0, 0) if with_rho else (0, None)
        randomness = "same" if rng_state is not None else "error"
        with rng_context(rng_state, device):
            outs = list(vmap(mapped, in_dims=in_dims, randomness=randomness)(vectors, rhos))
        dots = outs.pop(0)
        hv = outs.pop(0) if hessian else None
        ds = outs.pop(0) if has_stats else None
        return dots, hv, ds
    res = []
    for m in range(vectors.shape[0]):
        with rng_context(rng_state, device):
            res.append(one(vectors[m], None if rhos is None else rhos[m]))
    dots = torch.stack([r[0] for r in res])
    hv = torch.stack([r[1] for r in res]) if hessian else None
    ds = torch.stack([r[2] for r in res]) if has_stats else None
    return dots, hv, ds
