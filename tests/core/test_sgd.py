"""The SGD step algebra against torch.optim.SGD, transposition, and closed forms."""
import itertools

import pytest
import torch

from hydrattr._core.sgd import SGDHyper, adjoint_step, adjoint_step_, fast_coefficients, \
    sgd_step, tangent_step

CONFIGS = list(itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 1e-2]))


def _expand(sizes):
    s = torch.as_tensor(sizes)
    return lambda v: torch.repeat_interleave(v, s, dim=-1)


def _hyper_row(groups, first):
    return {"lr": [g["lr"] for g in groups], "momentum": [g["momentum"] for g in groups],
            "dampening": [g["dampening"] for g in groups],
            "weight_decay": [g["weight_decay"] for g in groups],
            "nesterov": [g["nesterov"] for g in groups], "first": [first] * len(groups)}


def _two_groups(momentum, dampening, nesterov, wd, first):
    """One step's hyperparameters (``SGDHyper.at``) for two groups of 5 and 2 coordinates
    that differ in lr, momentum and weight decay."""
    groups = [dict(lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov,
                   weight_decay=wd),
              dict(lr=0.05, momentum=momentum * 0.5, dampening=dampening,
                   nesterov=nesterov and momentum > 0, weight_decay=wd * 3)]
    return SGDHyper.from_rows([_hyper_row(groups, first)]).at(0)


@pytest.mark.parametrize("momentum,dampening,nesterov,wd", CONFIGS)
def test_sgd_step_matches_torch(momentum, dampening, nesterov, wd):
    if nesterov and (momentum == 0 or dampening != 0):
        pytest.skip("torch forbids nesterov without momentum or with dampening")
    torch.manual_seed(0)
    p1, p2 = torch.randn(4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    params = [torch.nn.Parameter(p1.clone()), torch.nn.Parameter(p2.clone())]
    groups = [dict(params=[params[0]], lr=0.1, momentum=momentum, dampening=dampening,
                   nesterov=nesterov, weight_decay=wd),
              dict(params=[params[1]], lr=0.03, momentum=momentum / 2, dampening=dampening,
                   nesterov=nesterov, weight_decay=2 * wd)]
    opt = torch.optim.SGD(groups)
    expand = _expand([4, 3])
    theta, v = torch.cat([p1, p2]), None
    for step in range(5):
        grads = torch.randn(7, dtype=torch.float64)
        first = step == 0
        row = _hyper_row(opt.param_groups, first)
        h = SGDHyper.from_rows([row]).at(0)
        params[0].grad, params[1].grad = grads[:4].clone(), grads[4:].clone()
        opt.step()
        theta, v = sgd_step(theta, v, grads, h, expand)
        # exact up to float64 rounding: the same arithmetic in a different order
        torch.testing.assert_close(theta, torch.cat([params[0].detach(), params[1].detach()]),
                                   rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("momentum,dampening,nesterov,wd", CONFIGS)
def test_adjoint_is_transpose_of_tangent(momentum, dampening, nesterov, wd, first):
    """<adjoint(a), x> == <a, tangent(x)> for random a, x (the adjoint identity)."""
    torch.manual_seed(1)
    h = _two_groups(momentum, dampening, nesterov, wd, first)
    expand = _expand([5, 2])
    dth, dv, dg = (torch.randn(7, dtype=torch.float64) for _ in range(3))
    tb, vb = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    dth2, dv2 = tangent_step(dth, dv, dg, h, expand)
    d_bar, tb_prev, vb_prev = adjoint_step(tb, vb, h, expand)
    lhs = tb @ dth2 + vb @ dv2
    rhs = tb_prev @ dth + vb_prev @ dv + d_bar @ dg
    assert torch.isclose(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("momentum,dampening,nesterov,wd", CONFIGS)
def test_in_place_adjoint_equals_adjoint(momentum, dampening, nesterov, wd, first):
    """adjoint_step_ (per-group scalars, in place) == adjoint_step on stacked cotangents,
    to float64 rounding (the same products, summed in another order)."""
    torch.manual_seed(2)
    h = _two_groups(momentum, dampening, nesterov, wd, first)
    tb, vb = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    want = adjoint_step(tb, vb, h, _expand([5, 2]))
    tb2, vb2, db2 = tb.clone(), vb.clone(), torch.full_like(tb, float("nan"))
    got = adjoint_step_(tb2, vb2, db2, h, [slice(0, 5), slice(5, 7)])
    assert got[0] is db2 and got[1] is tb2 and got[2] is vb2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-14)


def test_fast_coefficients_closed_form_plain_sgd_with_weight_decay():
    """No momentum: coef_t = -lr_t * prod_{s > t} (1 - lr_s * lambda)."""
    lrs = [0.1, 0.1, 0.05, 0.02]
    lam = 0.3
    rows = [{"lr": [lr], "momentum": [0.0], "dampening": [0.0], "weight_decay": [lam],
             "nesterov": [False], "first": [True]} for lr in lrs]
    coef = fast_coefficients(SGDHyper.from_rows(rows))[:, 0]
    expected = []
    for t in range(len(lrs)):
        prod = 1.0
        for s in range(t + 1, len(lrs)):
            prod *= 1 - lrs[s] * lam
        expected.append(-lrs[t] * prod)
    torch.testing.assert_close(coef, torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-14, atol=0)


def test_fast_coefficients_match_vector_adjoint():
    """Per-group scalar coefficients equal the Hessian-free adjoint run on a vector."""
    torch.manual_seed(2)
    rows = []
    for t in range(6):
        rows.append({"lr": [0.1 / (1 + t), 0.05], "momentum": [0.9, 0.5],
                     "dampening": [0.1, 0.0], "weight_decay": [1e-2, 0.0],
                     "nesterov": [False, True], "first": [t == 0, t == 0]})
    hyper = SGDHyper.from_rows(rows)
    coef = fast_coefficients(hyper)
    expand = _expand([3, 2])
    G = torch.randn(5, dtype=torch.float64)
    tb, vb = G.clone(), torch.zeros(5, dtype=torch.float64)
    for t in range(5, -1, -1):
        d_bar, tb, vb = adjoint_step(tb, vb, hyper.at(t), expand)
        torch.testing.assert_close(d_bar, expand(coef[t]) * G, rtol=1e-13, atol=1e-15)
