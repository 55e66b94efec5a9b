"""``FactorLayout``: per-sample gradients with some Linear weights held as factors,
against the full rows built directly (exact: copies and single products)."""
import pytest
import torch

from hydrattr._core.factors import FactorLayout, factor_pays


def _full(n, P, blocks, seed=0):
    """Random full rows whose blocks are outer products, with their factor pairs."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(n, P, generator=g, dtype=torch.float64)
    pairs = {}
    for off, o, i in blocks:
        go = torch.randn(n, o, generator=g, dtype=torch.float64)
        x = torch.randn(n, i, generator=g, dtype=torch.float64)
        full[:, off:off + o * i] = (go[:, :, None] * x[:, None, :]).reshape(n, -1)
        pairs[off] = (go, x)
    return full, pairs


BLOCKS = [(3, 4, 5), (23, 2, 3), (35, 3, 3)]  # a gap, two adjacent blocks, one at the end


def test_split_and_materialize_give_the_full_rows_back():
    P = 44
    full, pairs = _full(6, P, BLOCKS)
    lay = FactorLayout(P, list(reversed(BLOCKS)))  # any order
    assert [b[:3] for b in lay.blocks] == BLOCKS
    assert lay.segments == [(0, 3, 0), (29, 35, 3)]
    assert lay.dense_width == 9 and lay.factor_width == 9 + 5 + 6
    dense, factors = lay.split(full, pairs)
    out = lay.materialize(dense, factors, torch.empty_like(full))
    torch.testing.assert_close(out, full, rtol=0, atol=0)
    assert lay.dense_offset(33) == 7 and lay.block_at(23)[3] == 9 and lay.block_at(24) is None
    with pytest.raises(KeyError):
        lay.dense_offset(10)


def test_materialize_scales_the_dense_part_of_a_float16_ring():
    P = 44
    full, pairs = _full(5, P, BLOCKS, seed=1)
    lay = FactorLayout(P, BLOCKS)
    dense, factors = lay.split(full, pairs)
    peak = dense.abs().amax(1)
    half = (dense / peak[:, None]).half()
    out = lay.materialize(half, factors, torch.empty(5, P, dtype=torch.float64),
                          scale=peak)
    torch.testing.assert_close(out, full, rtol=1e-3, atol=0)  # float16 resolution
    for off, o, i in BLOCKS:  # the factored blocks are not rounded
        torch.testing.assert_close(out[:, off:off + o * i], full[:, off:off + o * i])


def test_no_blocks_is_the_identity_and_bad_blocks_are_refused():
    lay = FactorLayout(10)
    assert not lay.factored and lay.segments == [(0, 10, 0)] and lay.dense_width == 10
    for blocks in ([(0, 2, 3), (5, 1, 2)], [(8, 1, 3)], [(0, 0, 3)]):
        with pytest.raises(ValueError, match="overlaps"):
            FactorLayout(10, blocks)
    assert factor_pays(120, 400) and factor_pays(4, 4) and not factor_pays(1, 8)
