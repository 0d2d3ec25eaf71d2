"""The GTA merges run from resident task vectors give the direct path's bits.

A search worker hands the TIES family its resident task vectors ``x - base``
(``OpContext.task_vectors``), a destination (``out``) and a batch that collects every
tensor's chunks for one parallel pass (``batch``); their thresholds come from precomputed
statistics, whose per-block positions of tied values locate where a partial tie budget ends
without a pass over the chunk. None of this may change a bit: each operator runs both ways
on bf16-quantized sources (many deltas tie at the top-k threshold), at several densities,
for tensors that run eagerly (many chunks) and compiled (one chunk in a batch).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.ops import OpContext, get_op
from evomerge.ops.parallel import ChunkBatch
from evomerge.ops.precompute import TIE_BLOCK, SourceStats, sort_with_blocks
from evomerge.ops.sparsify import chunk_bounds
from evomerge.plan import step_seed

OPS = {
    "ties": {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.9]},
    "ties+rescale": {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.9], "rescale": True},
    "breadcrumbs_ties": {"weight": [1.0, -0.5, 0.7], "density": [0.5, 0.3, 0.9], "gamma": 0.05},
    "dare_ties": {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.9]},
    "della": {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.7], "epsilon": 0.1},
    "task_arithmetic": {"weight": [1.0, 0.5, -0.3]},
}
DENSITIES = ([0.5, 0.3, 0.9], [0.05, 0.77, 0.999], [0.25, 0.25, 0.6])


class _Step:
    def __init__(self, params, n):
        self.params, self.inputs, self.output = params, [None] * n, "t"


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    xs = [base + torch.randn(shape, generator=g) * 0.002 for _ in range(3)]
    return base.bfloat16().float(), [x.bfloat16().float() for x in xs]  # many ties


def _params(op, density):
    name = op.split("+")[0]
    raw = dict(OPS[op])
    if "density" in raw:  # DELLA keeps density +/- epsilon inside (0, 1)
        raw["density"] = [min(max(d, 0.15), 0.85) for d in density] if name == "della" else density
    return name, get_op(name).resolve_params(_Step(raw, 3))


def _ctx(stats=None):
    ctx = OpContext("t", torch.Generator().manual_seed(step_seed(3, "t")), torch.device("cpu"))
    if stats is not None:
        ctx.stats, ctx.input_keys, ctx.base_key = stats, ["x0", "x1", "x2"], "base"
    return ctx


@pytest.mark.parametrize("shape", [(100, 1000), (900, 1000)])  # eager (chunks) / compiled
@pytest.mark.parametrize("op", list(OPS))
def test_resident_task_vectors_give_the_direct_bits(op, shape):
    base, xs = _inputs(shape, seed=4)
    deltas = [x - base for x in xs]
    stats = SourceStats(budget_bytes=1 << 30)
    for density in DENSITIES:
        name, params = _params(op, density)
        spec = get_op(name)
        with torch.no_grad():
            direct = spec.fn([x.clone() for x in xs], base.clone(), params, _ctx())
            ctx = _ctx(stats)
            ctx.task_vectors, ctx.batch = True, ChunkBatch()
            ctx.out = torch.full((base.numel(),), float("nan"))
            got = spec.fn(deltas, base, params, ctx)
            assert got.data_ptr() == ctx.out.data_ptr() and got.shape == base.shape
            queued = len(ctx.batch)
            ctx.batch.run()
        assert queued > 0  # nothing ran before the batch did
        assert torch.equal(got.view(torch.int32), direct.view(torch.int32)), (op, density)
        assert not torch.equal(got, base)
    for d, x in zip(deltas, xs):  # the resident task vectors are never modified
        assert torch.equal(d, x - base)


def test_tied_thresholds_are_located_by_block():
    """A threshold held by many values carries the blocks of those values in ascending order,
    and the per-chunk counts follow from them for chunks a multiple of the block long."""
    base, xs = _inputs((300, 1000), seed=7)
    a = (xs[0] - base).abs().reshape(-1).numpy()
    stats = SourceStats(budget_bytes=1 << 30)
    bounds = list(chunk_bounds(a.size, 3 * TIE_BLOCK))
    fn = stats.magnitude_stats_fn("k", "base", xs[0] - base, None, bounds)
    tied_seen = False
    for r in (1000, 30_000, 150_000, 299_000):
        (st,) = fn([r])
        where = np.flatnonzero(a == st.value)
        assert st.n_equal == where.size and st.tie_block == TIE_BLOCK
        assert np.array_equal(st.tie_blocks, where // TIE_BLOCK)
        if st.value == 0:  # a zero threshold never needs tie budgets: not counted
            assert st.chunk_equal is None
        else:
            assert st.chunk_equal == tuple(int((a[s:e] == st.value).sum()) for s, e in bounds)
            tied_seen |= where.size > 1
    assert tied_seen
    # chunks that are not a multiple of the block: no per-chunk counts (a counting pass)
    (st,) = stats.magnitude_stats_fn("k", "base", xs[0] - base, None,
                                     list(chunk_bounds(a.size, 10_000)))([150_000])
    assert st.chunk_equal is None and st.tie_blocks is not None



@pytest.mark.parametrize("n, block, id_dtype", [(10 * 64 + 17, 64, np.uint8),
                                                  (300 * 8, 8, np.uint16), (5, 64, np.uint8)])
def test_sort_with_blocks_matches_a_lexsort(n, block, id_dtype):
    """Sorted values and their blocks equal a (value, position) lexsort's, ties included,
    whether or not the last block is full."""
    rng = np.random.default_rng(n)
    a = np.abs(rng.integers(-6, 7, n).astype(np.float32) * np.float32(0.125))
    a[::7] = np.float32(3e-39)  # subnormal: still sorts by its bits
    order = np.lexsort((np.arange(n), a))
    values, blocks = sort_with_blocks(a.copy(), block, id_dtype)
    assert values.dtype == np.float32 and blocks.dtype == id_dtype
    assert np.array_equal(values.view(np.int32), a[order].view(np.int32))
    assert np.array_equal(blocks, (order // block).astype(id_dtype))


def test_split_ties_keeps_exactly_the_budgeted_ties():
    """A chunk cut where tie budgets end: every piece keeps all or none of its ties, and the
    kept positions are exactly those below each budget's end."""
    from evomerge.ops.fused import ChunkCut, split_ties

    length = 100
    cuts = [ChunkCut(low=0.5, tie_low=0.5, ties_low=37), ChunkCut(low=0.2, tie_low=0.2, ties_low=length),
            ChunkCut(low=0.1, tie_low=0.1, ties_low=0, high=0.9, tie_high=0.9, ties_high=61)]
    pieces = split_ties(cuts, length)
    assert [(a, z) for a, z, _ in pieces] == [(0, 37), (37, 61), (61, 100)]
    for i, c in enumerate(cuts):
        kept_low = [p for a, z, piece in pieces for p in range(a, z)
                    if piece[i].ties_low == z - a]
        assert all(piece[i].ties_low in (0, z - a) and piece[i].ties_high in (0, z - a)
                   for a, z, piece in pieces)
        assert kept_low == list(range(min(c.ties_low, length)))
        kept_high = [p for a, z, piece in pieces for p in range(a, z) if piece[i].ties_high == z - a]
        assert kept_high == list(range(c.ties_high))
    assert split_ties(cuts[1:2], length) == [(0, length, cuts[1:2])]  # nothing to split


def test_chunk_batch_runs_every_queued_chunk_once():
    seen = []
    batch = ChunkBatch()
    batch.add(lambda s, e: seen.append(("a", s, e)), [(0, 5), (5, 9)])
    batch.add(lambda s, e: seen.append(("b", s, e)), [(0, 3)])
    assert len(batch) == 3
    batch.run()
    assert sorted(seen) == [("a", 0, 5), ("a", 5, 9), ("b", 0, 3)] and len(batch) == 0
    batch.run()  # nothing left: runs nothing
    assert len(seen) == 3


def _reference(a: np.ndarray, block: int):
    """Every rank's (value, first, end, blocks of the equal values) from a full sort by
    (value, position): numpy's order (NaNs equal and last)."""
    order = np.lexsort((np.arange(a.size), a))
    srt = a[order]

    def at(r):
        v = srt[r - 1]
        lo = int(np.searchsorted(srt, v, "left"))
        hi = int(np.searchsorted(srt, v, "right"))
        return v, lo, hi, order[lo:hi] // block
    return at


@pytest.mark.parametrize("kind", ["continuous", "discrete", "specials", "one_bucket"])
def test_magnitude_index_answers_every_rank_as_a_full_sort(kind):
    """The bucketed index (buckets of equal high 16 bits, each in position order) gives every
    rank's value, counts below / equal and the ascending blocks of the equal values that a
    full sort gives: ties, zeros, subnormals, inf and NaN included; a tensor whose values
    share one bucket is sorted whole."""
    from evomerge.ops.precompute import MagnitudeIndex

    rng = np.random.default_rng(7)
    n, block = 20_000, 64
    if kind == "continuous":
        a = np.abs(rng.standard_normal(n).astype(np.float32)) * np.float32(0.01)
    elif kind == "discrete":
        a = np.abs(rng.integers(-40, 41, n).astype(np.float32) * np.float32(1 / 512))
    elif kind == "specials":
        a = np.abs(rng.standard_normal(n).astype(np.float32))
        a[::13] = 0.0
        a[::17] = np.float32(3e-39)
        a[::101] = np.inf
        a[5::97] = np.nan
        a[7::89] = np.float32(np.nan).view(np.uint32).__add__(3).view(np.float32)  # another NaN
    else:  # every value in one bucket: more than _BUCKET_MAX and an eighth of them
        n = 70_000
        a = (np.float32(1.0) + rng.integers(0, 100, n).astype(np.float32) * np.float32(2 ** -23))
    idx = MagnitudeIndex.build(a.copy(), block, np.uint16)
    assert (idx.ends is None) == (kind == "one_bucket")
    ref = _reference(a, block)
    ranks = sorted({1, 2, n // 2, n - 1, n, *rng.integers(1, n + 1, 400).tolist()})
    for r in ranks:
        v, lo, hi, tied = idx.at_rank(r)
        wv, wlo, whi, wtied = ref(r)
        assert np.float32(v).view(np.uint32) == wv.view(np.uint32) or (np.isnan(v) and np.isnan(wv))
        assert (lo, hi) == (wlo, whi), r
        assert np.array_equal(tied.astype(np.int64), np.sort(wtied)), r
    plain = MagnitudeIndex.build(a.copy(), block, None)  # no room for blocks
    assert plain.blocks is None and plain.at_rank(n // 3)[:3] == idx.at_rank(n // 3)[:3]
    # the positions layout, of a signed task vector d with |d| = a (-0.0 and NaNs with
    # the sign bit set included), answers the same
    signs = np.where(rng.random(n) < 0.5, np.float32(-1), np.float32(1))
    d = (a.view(np.uint32) | np.where(signs < 0, np.uint32(1 << 31), np.uint32(0))).view(np.float32)
    pos = MagnitudeIndex.of_positions(d, block)
    if kind == "one_bucket":
        assert pos is None  # indexed by values then
        return
    assert pos.has_blocks and pos.order.dtype == np.int32 and pos.values is None
    for _ in range(2):  # the second time from the buckets kept (up to an eighth of them)
        for r in ranks:
            got, want = pos.at_rank(r), idx.at_rank(r)
            assert np.float32(got[0]).view(np.uint32) == np.float32(want[0]).view(np.uint32) or (
                np.isnan(got[0]) and np.isnan(want[0])), r
            assert got[1:3] == want[1:3], r
            assert np.array_equal(got[3], want[3].astype(np.int64)), r
    assert pos._read and sum(v.size for v in pos._read.values()) <= n >> 3
    assert MagnitudeIndex.of_positions(d, 0).at_rank(n // 3)[3] is None  # no blocks asked
