"""The Adam/AdamW step algebra against torch.optim and torch.func (float64).

* primal: several steps of ``adam_step`` reproduce ``torch.optim.Adam``/``AdamW`` with two
  parameter groups of different hyperparameters (tolerance 1e-13 relative: same float64
  operations up to the order of a few multiplications);
* tangent: ``adam_tangent_step`` equals ``torch.func.jvp`` of ``adam_step`` with respect to
  ``(theta, m, v, g)`` (1e-12: both are exact derivatives, rounding only);
* adjoint: ``<adjoint(y), x> == <y, tangent(x)>`` (1e-12).
"""
import numpy as np
import pytest
import torch
from torch.func import jvp

from hydrattr._core.adam import (AdamHyper, adam_adjoint_step, adam_context, adam_step,
                                 adam_tangent_step)
from hydrattr._core.functional import ParamSpec

SIZES = [5, 3]  # two parameter groups
SPEC = ParamSpec(["a", "b"], [torch.Size([5]), torch.Size([3])], SIZES)
P = sum(SIZES)


def _hyper(decoupled, step, wd=(1e-2, 0.0)):
    row = {"lr": [1e-2, 3e-3], "beta1": [0.9, 0.8], "beta2": [0.999, 0.99],
           "eps": [1e-8, 1e-6], "weight_decay": list(wd), "decoupled": [decoupled] * 2,
           "step": [float(step)] * 2}
    return AdamHyper.from_rows([row]).at(0)


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("wd", [(0.0, 0.0), (1e-2, 0.3)])
def test_adam_step_matches_torch(opt_cls, wd):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, dtype=torch.float64, generator=g)
    b = torch.randn(3, dtype=torch.float64, generator=g)
    pa, pb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    opt = opt_cls([{"params": [pa], "lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8,
                    "weight_decay": wd[0]},
                   {"params": [pb], "lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6,
                    "weight_decay": wd[1]}], foreach=False)
    theta, state = torch.cat([a, b]), None
    decoupled = opt_cls is torch.optim.AdamW
    for k in range(1, 6):
        grads = torch.randn(P, dtype=torch.float64, generator=g)
        pa.grad, pb.grad = grads[:5].clone(), grads[5:].clone()
        opt.step()
        theta, state = adam_step(theta, state, grads, _hyper(decoupled, k, wd), SPEC.expand)
        ref = torch.cat([pa.detach(), pb.detach()])
        np.testing.assert_allclose(theta.numpy(), ref.numpy(), rtol=1e-13, atol=1e-15)
        m_ref = torch.cat([opt.state[pa]["exp_avg"], opt.state[pb]["exp_avg"]])
        v_ref = torch.cat([opt.state[pa]["exp_avg_sq"], opt.state[pb]["exp_avg_sq"]])
        np.testing.assert_allclose(state[0].numpy(), m_ref.numpy(), rtol=1e-13, atol=1e-17)
        np.testing.assert_allclose(state[1].numpy(), v_ref.numpy(), rtol=1e-13, atol=1e-19)


def _point(seed=1):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(P, dtype=torch.float64, generator=g)
    m = 0.1 * torch.randn(P, dtype=torch.float64, generator=g)
    v = 0.01 * torch.rand(P, dtype=torch.float64, generator=g)
    grad_ = torch.randn(P, dtype=torch.float64, generator=g)
    return theta, m, v, grad_


@pytest.mark.parametrize("decoupled", [False, True])
def test_tangent_matches_jvp_of_primal(decoupled):
    theta, m, v, grad_ = _point()
    h = _hyper(decoupled, 3, wd=(0.05, 0.02))
    gen = torch.Generator().manual_seed(2)
    dth, dm, dv, dg = (torch.randn(P, dtype=torch.float64, generator=gen) for _ in range(4))

    def f(th, mm, vv, gg):
        th2, (m2, v2) = adam_step(th, (mm, vv), gg, h, SPEC.expand)
        return th2, m2, v2

    _, (rth, rm, rv) = jvp(f, (theta, m, v, grad_), (dth, dm, dv, dg))
    ctx = adam_context(theta, (m, v), grad_, h, SPEC.expand)
    tth, (tm, tv) = adam_tangent_step(dth, (dm, dv), dg, ctx)
    for got, ref in [(tth, rth), (tm, rm), (tv, rv)]:
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("freeze", [False, True])
def test_adjoint_is_transpose_of_tangent(freeze):
    theta, m, v, grad_ = _point(3)
    h = _hyper(True, 7, wd=(0.05, 0.0))
    ctx = adam_context(theta, (m, v), grad_, h, SPEC.expand, freeze_preconditioner=freeze)
    gen = torch.Generator().manual_seed(4)
    x = [torch.randn(2, P, dtype=torch.float64, generator=gen) for _ in range(4)]  # stacked
    ybar = [torch.randn(2, P, dtype=torch.float64, generator=gen) for _ in range(3)]
    tth, (tm, tv) = adam_tangent_step(x[0], (x[1], x[2]), x[3], ctx)
    gbar, thbar, (mbar, vbar) = adam_adjoint_step(ybar[0], (ybar[1], ybar[2]), ctx)
    lhs = (ybar[0] * tth + ybar[1] * tm + ybar[2] * tv).sum(-1)
    rhs = (thbar * x[0] + mbar * x[1] + vbar * x[2] + gbar * x[3]).sum(-1)
    np.testing.assert_allclose(lhs.numpy(), rhs.numpy(), rtol=1e-12)
    if freeze:
        assert torch.all(ctx["beta"] == 0)


def test_zero_second_moment_has_finite_coefficients():
    # a coordinate whose gradient has been exactly zero so far: v' = 0, sqrt not
    # differentiable; its beta is defined as 0 and everything stays finite
    theta, m, v, grad_ = _point(5)
    m[0], v[0], grad_[0] = 0.0, 0.0, 0.0
    ctx = adam_context(theta, (m, v), grad_, _hyper(False, 1, wd=(0.0, 0.0)), SPEC.expand)
    assert ctx["beta"][0] == 0
    assert all(torch.isfinite(ctx[k]).all() for k in ("alpha", "beta", "d"))
