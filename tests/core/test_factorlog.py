"""``FactorLogStore`` / ``FactoredStore`` (``Linear`` factors logged, never summed into
rows) against the fast-mode coefficient sum of ``fast_coefficients``.

The long random runs of test_deferred (two parameter groups with momentum, dampening,
weight decay, Nesterov and learning-rate schedules, a reset mid-run) with a dense part
and two factored blocks: every term added with its coefficient, extra rank-one terms of a
step included; float64 to 1e-12 of the largest entry (the dense part's fold leaves out
at most eps/100 of a term; the log is exact), float32 to 1e-5, a float16 dense part to
2e-3 (its resolution). ``matmul_t`` equals the materialised rows times the matrix, and
the final coefficients equal ``fast_coefficients``' own.
"""
import numpy as np
import pytest
import torch

from hydrattr._core.factorlog import FactorLogStore, step_coefficients_backward
from hydrattr._core.factors import FactorLayout
from hydrattr._core.functional import ParamSpec
from hydrattr._core.fused import sgd_transition, hyper_of
from hydrattr._core.sgd import SGDHyper, fast_coefficients
from hydrattr._core.store import SampleStore

from .test_deferred import FBLOCKS, FSIZES, _rows
from .test_deferred import _factored_terms as _terms

KINDS = [("dense", torch.float64, 1e-12), ("dense", torch.float32, 1e-5),
         ("half", torch.float32, 2e-3)]


def test_backward_coefficients_equal_fast_coefficients():
    """One backward pass over the 2x2 transitions gives the coefficients the two-pass
    fit uses (an independent implementation), to float64 rounding."""
    rs = np.random.RandomState(0)
    rows = _rows(400, rs)
    c = step_coefficients_backward([sgd_transition(hyper_of(r)) for r in rows])
    want = fast_coefficients(SGDHyper.from_rows(rows)).numpy()
    np.testing.assert_allclose(c, want, rtol=0, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("kind,dtype,rtol", KINDS)
@pytest.mark.parametrize("in_place", [False, True], ids=["copied", "reserved"])
def test_factor_log_equals_fast_coefficient_sum(kind, dtype, rtol, in_place):
    """Dense parts through the fold, factors through the log (a log of capacity 8 that
    must grow; a reset mid-run between a reservation and its commit); the result and its
    ``matmul_t`` against the coefficient sum of the full terms."""
    rs = np.random.RandomState(4)
    T, n, B, reset_at = 420, 60, 4, 150
    rows = _rows(T, rs)
    coef = fast_coefficients(SGDHyper.from_rows(rows))
    expand = ParamSpec(["a", "b"], [(14,), (9,)], FSIZES).expand
    layout = FactorLayout(sum(FSIZES), FBLOCKS)
    store = SampleStore(n, sum(FSIZES), kind=kind, dtype=dtype)
    ds = FactorLogStore(store, FSIZES, ring_rows=1, capacity=8)
    want = torch.zeros(n, sum(FSIZES), dtype=torch.float64)
    ds.step(rows[0])
    ds.set_layout(layout)
    assert ds.store.shape == (n, layout.dense_width) and ds.logging
    for t in range(T):
        slots = rs.choice(n, B, replace=False)
        dense, factors, full = _terms(rs, B, layout)
        out = ds.reserve(B, dtype) if in_place else None
        if out is not None:
            out[0].copy_(dense)
            out[1].copy_(factors)
            dense, factors = out
        if t == reset_at:
            ds.reset()
            want.zero_()
        if t:
            ds.step(rows[t])
        ds.commit(slots, dense.to(dtype), factors.to(dtype))
        want[torch.as_tensor(slots)] += expand(coef[t]) * full
        if t % 7 == 3:  # a factored layer run again: extra terms, no dense part
            _, factors, full = _terms(rs, B, layout)
            for s0, s1, _ in layout.segments:
                full[:, s0:s1] = 0.0
            ds.commit(slots, None, factors.to(dtype))
            want[torch.as_tensor(slots)] += expand(coef[t]) * full
    assert (out is not None) == (in_place and kind == "dense")  # written in place
    S = ds.finish()
    assert type(S).__name__ == "FactoredStore" and S.shape == (n, sum(FSIZES))
    assert S.kind == kind and S.log.shape[0] < (T - reset_at) * B * 1.2
    got = S.data.double()
    atol = rtol * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    G = torch.as_tensor(rs.randn(5, sum(FSIZES)))
    torch.testing.assert_close(S.matmul_t(G, chunk_rows=7).double(), want @ G.T, rtol=0,
                               atol=atol * float(G.abs().sum(1).max()))


def test_factor_log_without_a_layout_is_a_deferred_store():
    """No factored layout set: the full store, filled as DeferredStore fills it."""
    rs = np.random.RandomState(1)
    rows = _rows(30, rs)
    coef = fast_coefficients(SGDHyper.from_rows(rows))
    expand = ParamSpec(["a", "b"], [(14,), (9,)], FSIZES).expand
    store = SampleStore(10, sum(FSIZES), dtype=torch.float64)
    ds = FactorLogStore(store, FSIZES, ring_rows=4)
    want = torch.zeros(10, sum(FSIZES), dtype=torch.float64)
    for t in range(30):
        ds.step(rows[t])
        slots = rs.choice(10, 3, replace=False)
        g = torch.as_tensor(rs.randn(3, sum(FSIZES)))
        ds.commit(slots, g)
        want[torch.as_tensor(slots)] += expand(coef[t]) * g
    assert ds.finish() is store
    torch.testing.assert_close(store.data, want, rtol=0, atol=1e-12 * float(want.abs().max()))


def test_factor_log_refuses_what_it_cannot_hold():
    store = SampleStore(4, sum(FSIZES), dtype=torch.float64)
    ds = FactorLogStore(store, FSIZES)
    ds.step(_rows(1, np.random.RandomState(0))[0])
    ds.set_layout(FactorLayout(sum(FSIZES), FBLOCKS))
    with pytest.raises(ValueError, match="factors"):
        ds.commit([0], torch.zeros(1, ds.layout.dense_width), None)
    with pytest.raises(ValueError, match="dense or half"):
        FactorLogStore(SampleStore(4, 3, kind="memmap"), [3])


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_rank_one_test_gradients_are_multiplied_as_factors(dtype, rtol):
    """A (30 x 40) block logged at about 12 entries a row (840 numbers against 1,200):
    test gradients whose block is rank one in every row are multiplied as factors, and
    the product equals the materialised rows' (to float rounding); one row that is not
    rank one sends the block back to materialising, with the same product."""
    rs = np.random.RandomState(3)
    sizes = [1230, 5]
    layout = FactorLayout(sum(sizes), [(10, 30, 40)])
    T, n, B = 60, 20, 4
    rows = _rows(T, rs)
    coef = fast_coefficients(SGDHyper.from_rows(rows))
    expand = ParamSpec(["a", "b"], [(1230,), (5,)], sizes).expand
    ds = FactorLogStore(SampleStore(n, sum(sizes), dtype=dtype), sizes, ring_rows=8)
    want = torch.zeros(n, sum(sizes), dtype=torch.float64)
    for t in range(T):
        ds.step(rows[t])
        if t == 0:
            ds.set_layout(layout)
        slots = rs.choice(n, B, replace=False)
        dense, factors, full = _terms(rs, B, layout)
        ds.commit(slots, dense.to(dtype), factors.to(dtype))
        want[torch.as_tensor(slots)] += expand(coef[t]) * full
    S = ds.finish()
    m = 6
    G = torch.as_tensor(rs.randn(m, sum(sizes)))
    G[:, 10:1210] = (torch.as_tensor(rs.randn(m, 30, 1))
                     * torch.as_tensor(rs.randn(m, 1, 40))).reshape(m, -1)
    ref = want @ G.T
    atol = rtol * float(ref.abs().max()) * 10
    got = S.matmul_t(G.to(dtype), chunk_rows=7, chunk_entries=50).double()
    assert S.factored_blocks_ == [0]
    torch.testing.assert_close(got, ref, rtol=0, atol=atol)
    G[2, 10:1210] += 1e-3 * torch.as_tensor(rs.randn(1200))  # rank two
    got = S.matmul_t(G.to(dtype), chunk_rows=7).double()
    assert S.factored_blocks_ == []
    torch.testing.assert_close(got, want @ G.T, rtol=0, atol=atol)
