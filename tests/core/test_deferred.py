"""``DeferredStore`` (one vector per row, terms folded once their momentum fades) against
the fast-mode coefficient sum of ``fast_coefficients``.

Long random runs (two groups: momentum 0.9 with dampening and weight decay, momentum 0.5
with Nesterov; learning-rate schedules; a reset mid-run; a group at learning rate zero for
a stretch), so that most terms are folded before the end: float64 to 1e-12 of the largest
entry (the fold leaves out at most eps/100 of a term), float32 to 1e-5 (float32 sums of
hundreds of terms), float16 to 2e-3 (its resolution); a ring that must grow; plain SGD
folds at once.
"""
import numpy as np
import pytest
import torch

from hydrattr._core.deferred import DeferredStore, fold_steps, ring_rows
from hydrattr._core.functional import ParamSpec
from hydrattr._core.sgd import SGDHyper, fast_coefficients
from hydrattr._core.store import SampleStore

SIZES = [5, 3]
# store kind, dtype of the terms, tolerance relative to the largest entry
KINDS = [("dense", torch.float64, 1e-12), ("memmap", torch.float64, 1e-12),
         ("dense", torch.float32, 1e-5), ("half", torch.float32, 2e-3)]


def _rows(T, rs, zero_lr=()):
    rows = []
    for t in range(T):
        lr2 = 0.0 if t in zero_lr else float(rs.uniform(0.01, 0.2))
        rows.append({"lr": [float(0.1 * 0.5 ** (t // 150)), lr2],
                     "momentum": [0.9, 0.5], "dampening": [0.1, 0.0],
                     "weight_decay": [1e-2, 0.0], "nesterov": [False, True],
                     "first": [t == 0, t == 0]})
    return rows


def _run(kind, dtype, T, tmp_path, start=None, ring=None, zero_lr=(), n=9, B=4, seed=2):
    rs = np.random.RandomState(seed)
    rows = _rows(T, rs, zero_lr)
    batches = [rs.choice(n, B, replace=False) for _ in range(T)]
    terms = [torch.as_tensor(rs.randn(B, sum(SIZES))) for _ in range(T)]
    coef = fast_coefficients(SGDHyper.from_rows(rows))
    expand = ParamSpec(["a", "b"], [(5,), (3,)], SIZES).expand
    want = torch.zeros(n, sum(SIZES), dtype=torch.float64)
    for t in range(start or 0, T):
        want[torch.as_tensor(batches[t])] += expand(coef[t]) * terms[t]
    store = SampleStore(n, sum(SIZES), kind=kind, dtype=dtype, directory=tmp_path)
    ds = DeferredStore(store, SIZES, ring_rows=ring or ring_rows(0.9, B, store.data.dtype
                                                                 if kind != "memmap"
                                                                 else dtype),
                       directory=tmp_path)
    folded = 0
    for t in range(T):
        if t == start:
            ds.reset()
        assert ds.step(rows[t]) == t
        ds.commit(batches[t], terms[t].to(dtype))
        folded = max(folded, t + 1 - len(ds.entries))
    waiting = len(ds.entries)
    got = torch.as_tensor(np.asarray(ds.finish().data)).double()
    return got, want, waiting


@pytest.mark.parametrize("kind,dtype,rtol", KINDS)
def test_deferred_store_equals_fast_coefficient_sum(kind, dtype, rtol, tmp_path):
    # the terms of the first fold_steps after the reset, at least, are folded
    T = 230 + 2 * fold_steps(0.9, torch.float16 if kind == "half" else dtype)
    # float16 rounds each row at each of its terms: about as many terms a row as a
    # 20-epoch run gives (60 rows), as the LazyStore test has
    got, want, waiting = _run(kind, dtype, T, tmp_path, start=230,
                              n=60 if kind == "half" else 9)
    assert waiting < (T - 230) * 0.6  # most terms were folded, not finished exactly
    torch.testing.assert_close(got, want, rtol=0, atol=rtol * float(want.abs().max()))


def test_fold_tolerance_is_what_bounds_the_error(tmp_path):
    """A loose tolerance folds early and the error shows it: the exact answer above is
    the fold's doing, not the ring finishing every term."""
    rs = np.random.RandomState(0)
    rows = _rows(300, rs)
    coef = fast_coefficients(SGDHyper.from_rows(rows))
    expand = ParamSpec(["a", "b"], [(5,), (3,)], SIZES).expand
    errs = []
    for tol in (1e-2, 1e-12):
        ds = DeferredStore(SampleStore(2, 8, dtype=torch.float64), SIZES, tol=tol)
        want = torch.zeros(2, 8, dtype=torch.float64)
        for t in range(300):
            g = torch.as_tensor(rs.randn(1, 8))
            ds.step(rows[t])
            ds.commit([t % 2], g)
            want[t % 2] += expand(coef[t]) * g[0]
        got = ds.finish().data
        errs.append(float((got - want).abs().max() / want.abs().max()))
    assert errs[0] > 1e-6 and errs[1] < 1e-10


def test_ring_grows_and_zero_learning_rate_folds(tmp_path):
    got, want, _ = _run("dense", torch.float64, 500, tmp_path, ring=1,
                        zero_lr=set(range(100, 260)))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * float(want.abs().max()))


def test_plain_sgd_folds_at_once_and_unused_rows_are_zero():
    row = {"lr": [0.1], "momentum": [0.0], "dampening": [0.0], "weight_decay": [0.5],
           "nesterov": [False], "first": [True]}
    store = SampleStore(3, 2, dtype=torch.float64)
    store.data[:] = 7.0  # whatever was there: a row without terms ends zero
    ds = DeferredStore(store, [2], ring_rows=1)
    g = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    ds.step(row)
    ds.commit([1], g)
    ds.step(row)
    ds.commit([2], g)
    assert len(ds.entries) <= 1
    S = ds.finish().data
    torch.testing.assert_close(S[1], -0.1 * g[0] * (1 - 0.1 * 0.5))
    torch.testing.assert_close(S[2], -0.1 * g[0])
    assert float(S[0].abs().sum()) == 0
    assert fold_steps(0.0) == 2 and fold_steps(0.9) > fold_steps(0.9, torch.float16)
    with pytest.raises(RuntimeError, match="before any step"):
        DeferredStore(SampleStore(3, 2), [2]).commit([0], torch.zeros(1, 2))


def test_a_learning_rate_drop_does_not_hold_terms_back():
    """After a tenfold rate drop a term's parameter part is ten times smaller, but its
    velocity part fades at the same pace: the fold measures the velocity part by what it
    still adds to the parameters, so the ring sized by ``ring_rows`` never grows (it did
    when the velocity part was measured against the parameter part alone)."""
    rs = np.random.RandomState(3)
    T, n, B = 700, 50, 4
    rows = [{"lr": [0.01 if t < 300 else 0.001], "momentum": [0.9], "dampening": [0.0],
             "weight_decay": [5e-4], "nesterov": [False], "first": [t == 0]}
            for t in range(T)]
    coef = fast_coefficients(SGDHyper.from_rows(rows))
    want = torch.zeros(n, 6, dtype=torch.float64)
    cap = ring_rows(0.9, B, torch.float32)
    ds = DeferredStore(SampleStore(n, 6, dtype=torch.float32), [6], ring_rows=cap)
    for t in range(T):
        slots = rs.choice(n, B, replace=False)
        g = torch.as_tensor(rs.randn(B, 6))
        ds.step(rows[t])
        ds.commit(slots, g.float())
        want[torch.as_tensor(slots)] += coef[t] * g
    assert ds.ring.shape[0] == cap
    got = ds.finish().data.double()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


# -- a ring holding Linear weights' terms as factors --------------------------------------
FSIZES = [14, 9]  # a (3 x 4) block in group 0, a (2 x 3) block in group 1
FBLOCKS = [(2, 3, 4), (16, 2, 3)]


def _factored_terms(rs, B, layout):
    """``(dense, factors, full)`` of ``B`` random terms in ``layout``."""
    dense = torch.as_tensor(rs.randn(B, layout.dense_width))
    factors = torch.as_tensor(rs.randn(B, layout.factor_width))
    full = layout.materialize(dense, factors, torch.empty(B, layout.n_params,
                                                           dtype=torch.float64))
    return dense, factors, full


@pytest.mark.parametrize("kind,dtype,rtol", KINDS)
def test_factored_ring_equals_fast_coefficient_sum(kind, dtype, rtol, tmp_path):
    """The same long runs as above with the ring holding a dense part and factors: every
    term added with its coefficient, the extra rank-one terms of a step (``dense=None``,
    the same slots committed again) included; a ring of one row, so that it grows."""
    from hydrattr._core.factors import FactorLayout

    rs = np.random.RandomState(4)
    T, n, B = 260 + 2 * fold_steps(0.9, torch.float16 if kind == "half" else dtype), 60, 4
    rows = _rows(T, rs)
    coef = fast_coefficients(SGDHyper.from_rows(rows))
    expand = ParamSpec(["a", "b"], [(14,), (9,)], FSIZES).expand
    layout = FactorLayout(sum(FSIZES), FBLOCKS)
    store = SampleStore(n, sum(FSIZES), kind=kind, dtype=dtype, directory=tmp_path)
    ds = DeferredStore(store, FSIZES, ring_rows=1, directory=tmp_path)
    ds.step(rows[0])
    ds.set_layout(layout)
    want = torch.zeros(n, sum(FSIZES), dtype=torch.float64)
    for t in range(T):
        if t:
            ds.step(rows[t])
        slots = rs.choice(n, B, replace=False)
        dense, factors, full = _factored_terms(rs, B, layout)
        ds.commit(slots, dense.to(dtype), factors.to(dtype))
        want[torch.as_tensor(slots)] += expand(coef[t]) * full
        if t % 7 == 3:  # a factored layer run again: its extra terms, no dense part
            _, factors, full = _factored_terms(rs, B, layout)
            for s0, s1, _ in layout.segments:
                full[:, s0:s1] = 0.0
            ds.commit(slots, None, factors.to(dtype))
            want[torch.as_tensor(slots)] += expand(coef[t]) * full
    assert ds.ring.shape[1] == layout.dense_width and ds.ring.shape[0] > 1
    waiting = len(ds.entries)
    got = torch.as_tensor(np.asarray(ds.finish().data)).double()
    assert waiting < 0.6 * T  # most terms were folded, the rest finished
    torch.testing.assert_close(got, want, rtol=0, atol=rtol * float(want.abs().max()))


def test_factored_ring_refuses_what_does_not_fit():
    from hydrattr._core.factors import FactorLayout

    layout = FactorLayout(sum(FSIZES), FBLOCKS)
    row = {"lr": [0.1, 0.1], "momentum": [0.9, 0.9], "dampening": [0.0, 0.0],
           "weight_decay": [0.0, 0.0], "nesterov": [False, False], "first": [True, True]}
    ds = DeferredStore(SampleStore(5, sum(FSIZES), dtype=torch.float64), FSIZES)
    ds.step(row)
    ds.set_layout(layout)
    with pytest.raises(ValueError, match="5 dense values and 12 factors"):
        ds.commit([0], torch.zeros(1, sum(FSIZES), dtype=torch.float64))  # full rows
    ds.commit([0], torch.zeros(1, layout.dense_width, dtype=torch.float64),
              torch.zeros(1, layout.factor_width, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="after terms were committed"):
        ds.set_layout(layout)
    with pytest.raises(ValueError, match="coordinates"):
        DeferredStore(SampleStore(5, 3), [3]).set_layout(layout)


def test_a_zero_term_in_a_float16_ring_stays_zero():
    """A per-sample gradient of exact zeros (a saturated softmax gives one) is scaled by
    1 in the float16 ring, not by 1/0: the store stays finite and equals the sum of the
    other terms (it was NaN when the scale was clamped to 1e-300 and inverted)."""
    row = {"lr": [0.1], "momentum": [0.9], "dampening": [0.0], "weight_decay": [0.0],
           "nesterov": [False], "first": [True]}
    rows = [dict(row, first=[t == 0]) for t in range(30)]
    coef = fast_coefficients(SGDHyper.from_rows(rows))
    ds = DeferredStore(SampleStore(2, 4, kind="half"), [4], ring_rows=ring_rows(0.9, 2))
    rs = np.random.RandomState(0)
    want = torch.zeros(2, 4, dtype=torch.float64)
    for t in range(30):
        g = torch.as_tensor(rs.randn(2, 4), dtype=torch.float32)
        g[1] = 0.0 if t % 3 == 0 else g[1]
        ds.step(rows[t])
        ds.commit([0, 1], g)
        want += coef[t] * g.double()
    got = ds.finish().data.double()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * float(want.abs().max()))
