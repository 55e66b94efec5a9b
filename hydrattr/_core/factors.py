"""Per-sample gradients with some ``Linear`` weights held as their two factors.

A ``Linear`` layer applied once to one position per sample has the per-sample weight
gradient ``go_i x_i^T``: an outer product of the output gradient (``n_out`` numbers) and
the input (``n_in``). Held as those two vectors, LeNet-5's ``fc1`` takes 520 numbers a
sample instead of 48,000 (78% of the network's parameters), so a buffer of waiting
per-sample gradients (:class:`~hydrattr._core.deferred.DeferredStore`'s ring) holds a
small part of each full row.

:class:`FactorLayout` says where everything lives: the *dense part* holds every
coordinate outside the factored weights, in parameter order (``segments`` map it to the
flat parameter vector), and the *factor part* holds, per factored weight, ``go`` then
``x``. :meth:`FactorLayout.materialize` writes the full ``(n, P)`` rows back.

Pure torch: nothing here knows skorch.
"""
from __future__ import annotations

import torch

__all__ = ["FactorLayout", "factor_pays"]


def factor_pays(n_out, n_in):
    """Whether a ``(n_out, n_in)`` weight is worth holding as factors: they take at most
    half its numbers (materialising it again costs one product per waiting block)."""
    return int(n_out) * int(n_in) >= 2 * (int(n_out) + int(n_in))


class FactorLayout:
    """Where a per-sample gradient's numbers live with some weights held as factors.

    Parameters
    ----------
    n_params : int
        Flat coordinates ``P`` of the full gradient.
    blocks : list of (offset, n_out, n_in)
        The factored weights: flat offset and shape (row-major ``n_out x n_in``, as a
        ``Linear`` weight is flattened); non-overlapping.

    Attributes
    ----------
    blocks : list of (offset, n_out, n_in, factor_start)
        By offset; ``go`` at ``factor_start:factor_start+n_out`` of the factor part,
        ``x`` right after it.
    segments : list of (start, stop, dense_start)
        The dense part's runs of flat coordinates ``start:stop``, at ``dense_start`` of
        the dense part.
    dense_width, factor_width : int
    """

    def __init__(self, n_params, blocks=()):
        self.n_params = int(n_params)
        self.blocks = []
        f = 0
        pos = 0
        for off, o, i in sorted((int(a), int(b), int(c)) for a, b, c in blocks):
            if off < pos or off + o * i > self.n_params or o < 1 or i < 1:
                raise ValueError(f"FactorLayout: block ({off}, {o}, {i}) overlaps another "
                                 f"or lies outside {self.n_params} coordinates.")
            self.blocks.append((off, o, i, f))
            f += o + i
            pos = off + o * i
        self.factor_width = f
        self.segments = []
        pos = r = 0
        for off, o, i, _ in self.blocks + [(self.n_params, 0, 0, None)]:
            if off > pos:
                self.segments.append((pos, off, r))
                r += off - pos
            pos = off + o * i
        self.dense_width = r

    @property
    def factored(self):
        return bool(self.blocks)

    def dense_offset(self, offset):
        """Where flat coordinate ``offset`` (outside every block) sits in the dense part."""
        for s0, s1, r0 in self.segments:
            if s0 <= offset < s1:
                return r0 + offset - s0
        raise KeyError(f"coordinate {offset} lies in a factored block")

    def block_at(self, offset):
        """The block ``(offset, n_out, n_in, factor_start)`` starting at ``offset``, or
        None."""
        for b in self.blocks:
            if b[0] == offset:
                return b
        return None

    def split(self, full, pairs):
        """``(dense, factors)`` of full rows ``full`` (n, P) whose factored blocks are the
        outer products of ``pairs[offset] = (go, x)``; the blocks of ``full`` are not
        read."""
        n = full.shape[0]
        dense = torch.empty(n, self.dense_width, dtype=full.dtype, device=full.device)
        for s0, s1, r0 in self.segments:
            dense[:, r0:r0 + s1 - s0] = full[:, s0:s1]
        factors = torch.empty(n, self.factor_width, dtype=full.dtype, device=full.device)
        for off, o, i, f in self.blocks:
            go, x = pairs[off]
            factors[:, f:f + o] = go
            factors[:, f + o:f + o + i] = x
        return dense, factors

    def materialize(self, dense, factors, out, scale=None):
        """Write the full rows into ``out`` (n, P): the dense part times ``scale`` (a
        per-row tensor, or None) and each block's outer product (unscaled). ``dense``
        may be of another dtype (a float16 ring's rows); returns ``out``."""
        n = out.shape[0]
        for s0, s1, r0 in self.segments:
            part = dense[:, r0:r0 + s1 - s0]
            if scale is None:
                out[:, s0:s1].copy_(part)
            else:
                torch.mul(part, scale[:, None], out=out[:, s0:s1])
        for off, o, i, f in self.blocks:
            fo = factors[:, f:f + o + i]
            torch.mul(fo[:, :o, None], fo[:, None, o:], out=out[:, off:off + o * i].view(n, o, i))
        return out
