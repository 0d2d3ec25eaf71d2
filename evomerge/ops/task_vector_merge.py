"""The generalized task arithmetic (GTA) merge behind the task-vector operators.

:func:`generalized_task_arithmetic` computes ``base + lambda * mix(sparsified, weighted
deltas)`` chunk by chunk: exact magnitude / outlier cuts (:mod:`.sparsify`), random DARE /
DELLA drops (:mod:`.random_drop`), optional TIES sign consensus, and a fused per-chunk path
(:mod:`.fused`) where it applies; the cuts' thresholds and tie budgets come
from :mod:`.magnitude_cuts`. The operators registered on top of it, with their
parameters, defaults and deliberate deviations from mergekit, are in :mod:`.task_vectors`
(which re-exports this function).
"""

from __future__ import annotations

import torch

from ..errors import PlanError
from .fused import (
    COMPILED_CPU_CHUNK,
    ChunkCut,
    KernelFlags,
    fused_mode,
    gta_combine,
    run_kernel_into,
    scalars,
    split_ties,
)
from .magnitude_cuts import (
    MergeInput,
    chunk_cut,
    compute_dtype,
    cuts_at,
    delta_into,
    magnitude_prune,
    prepare_cuts,
)
from .parallel import run_chunks, run_items
from .random_drop import UniformField, della_row_probabilities
from .registry import OpContext, check_shapes, step_seed
from .sparsify import (
    balanced_bounds,
    chunk_bounds,
    chunk_size,
)

# mergekit's tolerance for the L1 rescale of magnitude-pruned deltas
_RESCALE_EPS = 1e-7


def _input_seeds(n: int, ctx: OpContext, device: torch.device) -> list[int]:
    """One seed per input, drawn from the step's generator (every input draws one, so each
    input's stream depends only on the step seed and its position)."""
    g = ctx.generator
    if g is None:
        g = torch.Generator(device=device).manual_seed(step_seed(0, ctx.name))
    return [int(s) for s in torch.randint(0, 2**62, (n,), generator=g, device=g.device).tolist()]


def _l1_rescale(inp: MergeInput, b: torch.Tensor, method: str,
                bounds: list[tuple[int, int]]) -> float:
    """mergekit's rescale of a magnitude-pruned delta: ||d||_1 / ||pruned d||_1."""

    def sums(s: int, e: int) -> tuple[float, float]:
        d = delta_into(inp.flat, b, s, e, torch.empty(e - s, dtype=compute_dtype(inp.flat, b),
                                                  device=b.device), inp.given)
        total = float(d.abs().sum(dtype=torch.float64))
        d = magnitude_prune(cuts_at(inp, s, fresh=True), d, method)
        return total, float(d.abs().sum(dtype=torch.float64))

    total = kept = 0.0
    for t_c, k_c in run_chunks(sums, bounds, b.device):
        total += t_c
        kept += k_c
    if total < _RESCALE_EPS or kept < _RESCALE_EPS:
        return 1.0
    return total / kept


def generalized_task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    params: dict,
    ctx: OpContext,
    *,
    sparsification: str | None,
    consensus: bool,
    extra_scale: float = 1.0,
) -> torch.Tensor:
    """The GTA merge (see the module docstring). ``sparsification`` is one of None,
    "magnitude", "outliers", "random", "della"; ``extra_scale`` multiplies lambda (LiNeS).

    From ``ctx`` (:class:`~.registry.OpContext`): ``task_vectors`` (``tensors`` are the task
    vectors ``x - base`` already: a search worker's resident ones), ``out`` (a flat
    destination of the output dtype: the result is written there and returned as its view)
    and ``batch`` (the chunks are added to it instead of run: the caller runs them, with
    other tensors', before reading the result); the result's bits never depend on them."""
    if base is None:
        raise PlanError(f"tensor {ctx.name!r}: this operator needs a base model")
    check_shapes(tensors, base, ctx)
    floats = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    if base.dtype not in floats or any(t.dtype not in floats for t in tensors):
        base = base.float()  # the contract is float32: anything else is computed in float32
        tensors = [t.float() for t in tensors]
    cdt = compute_dtype(base, *tensors)
    if cdt == torch.float64 or (base.device.type != "cpu" and base.device.type != "cuda"):
        base, tensors = base.to(cdt), [t.to(cdt) for t in tensors]
    out_dtype = ctx.out_dtype or cdt
    n = base.numel()
    if n == 0:
        return base.to(out_dtype, copy=True)
    device = base.device
    mode = fused_mode(device, n) if cdt == torch.float32 else "eager"
    b = base.reshape(-1)
    weights = [float(w) for w in params["weight"]]
    densities = params.get("density") or [1.0] * len(tensors)
    gammas = params.get("gamma") or [0.0] * len(tensors)
    epsilons = params.get("epsilon") or [0.0] * len(tensors)
    normalize = bool(params.get("normalize", False))
    rescale = bool(params.get("rescale", False))
    lam = float(params.get("lambda", 1.0)) * extra_scale

    given = bool(ctx.task_vectors)
    inputs = [
        MergeInput(i, t.reshape(-1), weights[i], float(densities[i]), float(gammas[i]),
               float(epsilons[i]), given=given)
        for i, t in enumerate(tensors)
    ]
    method = sparsification
    align = 1
    if method == "della":
        align = n if base.dim() < 2 else n // base.shape[0]
        align = max(align, 1)
    if mode == "compiled" and device.type == "cpu" and align == 1:
        # one tensor alone: a multiple of 4 chunks, so the threads share it; in a batch of
        # many tensors their chunks already spread, and each chunk costs Python work
        # holding the GIL (cuts, scalars): as few as the compiled chunk size allows
        bounds = list(chunk_bounds(n, COMPILED_CPU_CHUNK) if ctx.batch is not None
                      else balanced_bounds(n, COMPILED_CPU_CHUNK))
    else:
        bounds = list(chunk_bounds(n, chunk_size(device), align))
    if method in ("random", "della"):
        for inp, seed in zip(inputs, _input_seeds(len(inputs), ctx, device)):
            store = (ctx.stats.draw_highs(seed, n) if method == "random" and ctx.stats is not None
                     and device.type == "cpu" and inp.weight != 0.0 and inp.density < 1.0 else None)
            inp.draws = UniformField(seed, device, store)
    to_cut: list[MergeInput] = []
    stats_fns: dict = {}
    for inp in inputs:
        if inp.weight == 0.0:
            inp.dead = True
            continue
        if method is None or inp.density >= 1.0:
            continue  # mergekit: density >= 1 leaves the delta untouched (no rescale)
        if inp.density <= 0.0:
            inp.dead = True
        elif method in ("magnitude", "outliers"):
            to_cut.append(inp)
        elif method == "random" and rescale:
            inp.scale = 1.0 / inp.density
    if to_cut and ctx.stats is not None and ctx.input_keys is not None:
        keys, stats = ctx.input_keys, ctx.stats

        def stats_fn(inp: MergeInput):
            return stats.magnitude_stats_fn(keys[inp.pos], ctx.base_key, inp.flat,
                                            None if inp.given else b, bounds)

        if all(stats.cached(keys[inp.pos], ctx.base_key) for inp in to_cut):
            fns = [stats_fn(inp) for inp in to_cut]  # a later candidate: lookups only
        else:  # the first: sort the inputs' |delta| side by side (numpy releases the GIL)
            fns = run_items(stats_fn, to_cut, device)
        stats_fns = {inp.pos: fn for inp, fn in zip(to_cut, fns)}
    if to_cut:
        prepare_cuts(to_cut, b, method, bounds, stats_fns, mode)
        for inp in to_cut:
            if rescale and not inp.dead:
                inp.scale = _l1_rescale(inp, b, method, bounds)
    live = [inp for inp in inputs if not inp.dead]
    pruning = {inp.pos: method is not None and inp.density < 1.0 for inp in live}

    divisor = 1.0
    if normalize and not consensus:
        total_w = sum(weights)
        divisor = total_w if abs(total_w) >= 1e-8 else 1.0

    o = ctx.out
    if (o is None or o.dtype != out_dtype or o.device != device or o.dim() != 1
            or o.numel() != n or not o.is_contiguous()):
        o = torch.empty(n, dtype=out_dtype, device=device)
    out = o.view(base.shape)
    if not live:
        o.copy_(b)
        return out
    ews = [inp.weight * inp.scale for inp in live]  # weight of the (rescaled) delta
    ws = [inp.weight for inp in live]
    lam_eff = lam if consensus else lam / divisor
    plain_scal = scalars([ChunkCut()] * len(live), ews, ws, lam_eff, cdt, device)
    prune = method in ("magnitude", "outliers") and any(pruning[inp.pos] for inp in live)
    negative = not all(w > 0 for w in ws)  # else the kernel skips the weights' sign products
    dare = method == "random" and any(pruning[inp.pos] for inp in live)

    def chunk(s: int, e: int) -> None:
        if method == "della":  # row-wise drops: prune eagerly, then the same arithmetic
            ds = []
            for inp in live:
                d = delta_into(inp.flat, b, s, e, torch.empty(e - s, dtype=cdt, device=device),
                           inp.given)
                if pruning[inp.pos]:
                    d = _sparsify_chunk(inp, d, method, rescale, align, device, s, e)
                ds.append(d)
            res = gta_combine(b[s:e].to(cdt), ds, plain_scal, consensus, normalize)
            o[s:e].copy_(res)
            return
        masks: list[torch.Tensor | None] = [None] * len(live)
        if dare:  # every input gets a mask (ones where not pruned): one graph for all genomes
            masks = [inp.draws.keep_at(s, e, inp.density).to(device) if pruning[inp.pos]
                     else torch.ones(e - s, dtype=torch.uint8, device=device) for inp in live]
        cuts = [chunk_cut(inp, b, s, e, method, cdt, mode) if prune and pruning[inp.pos]
                else ChunkCut() for inp in live]
        high = prune and any(c.uses_high() for c in cuts)
        for a, z, piece in split_ties(cuts, e - s):  # where a tie budget ends: a new piece
            p, q = s + a, s + z
            if prune:
                piece = [c.folded(cdt) for c in piece]
            scal = scalars(piece, ews, ws, lam_eff, cdt, device)
            flags = KernelFlags(prune, consensus, normalize, given, high=high,
                                ties=prune and any(c.has_ties() for c in piece),
                                negative=negative)
            run_kernel_into(mode, o[p:q], b[p:q], [inp.flat[p:q] for inp in live],
                            [None if m is None else m[a:z] for m in masks], scal, flags)

    # a graph not compiled yet compiles once, under .fused's lock, in whichever thread
    # gets the first chunk (the others wait for it)
    if ctx.batch is not None:  # the caller runs many tensors' chunks in one parallel pass
        ctx.batch.add(chunk, bounds)
    else:
        run_chunks(chunk, bounds, device)
    return out


def _sparsify_chunk(inp: MergeInput, d: torch.Tensor, method: str | None, rescale: bool,
                    align: int, device: torch.device, s: int, e: int) -> torch.Tensor:
    if method in ("magnitude", "outliers"):
        return magnitude_prune(cuts_at(inp, s), d, method)
    assert inp.draws is not None
    if method == "random":
        return d.mul_(inp.draws.keep_at(s, e, inp.density).to(device))
    # della: this chunk holds whole rows of length ``align``
    probs = della_row_probabilities(d.view(-1, align).abs(), inp.density, inp.epsilon)
    probs = probs.view(-1)
    u = inp.draws.uniform_at(s, e).to(device)
    d.mul_(torch.lt(u, probs, out=u))
    if rescale:
        d.div_(probs)
    return d


__all__ = ["generalized_task_arithmetic"]
