"""The region planner: finds maximal affine regions in any IR and fuses each into one op.

An adapter describes its graph through `GraphView`; values are opaque hashable
keys.  For every value the planner keeps the affine map from the earliest
tensor it can be expressed in ("its source") together with the values computed
on the way (the region).  A value may sit inside a region only if its single
consumer extended the map; everything else (graph outputs, values with several
consumers, inputs of a refused rule) is a boundary and becomes a source.

A transpose is a view too (`Permute`): an op that acts on every position alike (a linear, a 1x1 conv, a
per-channel op) commutes with any rearrangement of positions that keeps the channel axis whole, so a region
crosses it when its op is pointwise and the channel axis before the transpose is the one after it.  The fused
op is then written at the source's layout with the region's views after it (a linear, then the transpose a
BatchNorm1d read), or, when its weighted ops all follow the views or it reads positions (a conv), behind them.

A region whose fused op the cost model rejects is cut at its root: the root's
inputs become boundaries and the planner runs again, so the branches still fuse
on their own.  Boundaries only grow, so this reaches a fixed point.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, NamedTuple, Protocol, Sequence

import numpy as np

from . import affine
from .affine import AffineConv, ConvTranspose, Declined
from .cost import elementwise_cost, fused_cost, op_cost
from .plan import Apply, Permute as PermuteTerm, Replace, Reshape, RulePlan, written_steps

Key = Hashable


# ---------------------------------------------------------------- what an adapter says about a value

@dataclass(frozen=True)
class Affine:
    """value = op(input)."""

    input: Key
    op: AffineConv


@dataclass(frozen=True, eq=False)
class PadWith:
    """value = input padded by `pads` with the per-channel constant `values` (DBB's BN-and-pad)."""

    input: Key
    pads: affine.Pads
    values: np.ndarray
    rtol: float = 1e-5  # precision the values were computed in


@dataclass(frozen=True)
class Sum:
    """value = sum_i weights[i] * inputs[i] (Add, Sub, add with alpha)."""

    inputs: tuple[Key, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class Concat:
    """value = concatenation of inputs along the channel axis."""

    inputs: tuple[Key, ...]


@dataclass(frozen=True)
class Regroup:
    """value = input with its leading (batch) dims regrouped, channels last on both sides ([B, N, C] ->
    [B*N, C]: flatten, view, reshape).  A rank-0 op acts on every row alike, so it commutes with this."""

    input: Key


@dataclass(frozen=True)
class Permute:
    """value = op(transpose(input, perm)) (numpy's transpose), or the transpose alone when `op` is None.
    A transpose is a view the planner carries a region across (see the module docstring); with an op it is
    ONNX's Gemm with transA=1, a linear over the rows of its input."""

    input: Key
    perm: tuple[int, ...]
    op: AffineConv | None = None


def moves_channels(before: "Layout | None", after: "Layout | None", perm: Sequence[int]) -> str | None:
    """Why a transpose from a value read as `before` to one read as `after` is no view of the channel axis
    (the channel axis must land whole on the channel axis); None when it is one."""
    if before is None or after is None:
        return "input shape or channel count unknown on one side of the transpose"
    n = len(perm)
    if before.channels != after.channels or perm[n - 1 - after.rank] != n - 1 - before.rank:
        return (f"transpose moves the channel axis (axis {n - 1 - before.rank}, {before.channels} channels) onto "
                f"a position axis: the ops after it act on axis {perm[n - 1 - after.rank]}")
    return None


def splits_channels(before: Sequence | None, after: Sequence | None, layout: "Layout | None") -> str | None:
    """Why a reshape of a channels-last value (shape `before`, read as `layout`) to `after` breaks its channel
    axis (a split [B, N, C] -> [B, N, 2, C/2], or a merge [B, N, C] -> [B, N*C]); None when it keeps the axis
    whole (trailing 1s aside) or the static sizes cannot tell."""
    if layout is None or layout.rank or not before or not after:
        return None
    tail = [d for d in after if not (isinstance(d, int) and d == 1)][-1:] or [1]  # ints only: no symbolic guard
    if isinstance(tail[0], int) and tail[0] != layout.channels:
        return f"reshape splits or merges the channel axis ({layout.channels} channels -> last dim {tail[0]})"
    return None


def keeps_channels_last(before: Sequence | None, after: Sequence | None) -> bool:
    """Shapes of a reshape that may be a Regroup: both known, at least 2-D, ending in the same static size."""
    before, after = before or (), after or ()
    return len(before) >= 2 and len(after) >= 2 and isinstance(before[-1], int) and before[-1] == after[-1]


@dataclass(frozen=True)
class Scaled:
    """value = scale * input, `scale` a per-sample scalar tensor ([N, 1, ...]) computed from data
    (a dynamic conv's attention).  Not affine; `repfuse.patterns.dynamic` reads it."""

    input: Key
    scale: Key


@dataclass(frozen=True, eq=False)
class Pointwise:
    """value = fn(input) element by element (ReLU, sigmoid, ...); `fn` maps a numpy array of
    per-channel constants to theirs.  Not affine; `repfuse.patterns.channels` reads it."""

    input: Key
    fn: object  # Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Transposed:
    """value = op(input), a transposed conv.  No region extends through it; `repfuse.patterns.transposed`
    folds the per-channel ops after it."""

    input: Key
    op: ConvTranspose


def padded(input: Key, channels: int, pads: affine.Pads, values, rtol: float = 1e-5) -> Affine | PadWith:
    """Padding with a constant (scalar or per channel): zero padding is an affine op, anything else waits
    for the op before it to produce exactly that value on a zero input."""
    values = np.broadcast_to(np.asarray(values, dtype=np.float64), (channels,))
    if not np.any(values):
        return Affine(input, affine.zero_pad(channels, pads))
    return PadWith(input, pads, values.copy(), rtol)


def precision(eps: float) -> float:
    """Relative tolerance for constants stored with machine epsilon `eps` (a few units in the last place)."""
    return max(1e-5, 4 * float(eps))


Description = Affine | PadWith | Sum | Concat | Regroup | Permute | Scaled | Pointwise | Transposed


class Layout(NamedTuple):
    """How the algebra reads a tensor: `channels` along the channel axis, followed by `rank` spatial dims.

    NCHW is (C, 2), NCW (C, 1); [N, C] and tokens [B, N, C] read by a linear over C are (C, 0): channels
    last, every dim before them a batch dim.  The channel axis is therefore `ndim - 1 - rank`; nothing
    assumes it is 1, and a per-channel constant is shaped [C, 1 x rank] in every IR."""

    channels: int
    rank: int


class GraphView(Protocol):
    """What a rule sees of a graph; values are opaque hashable keys, one per node output."""

    def values(self) -> Sequence[Key]:
        """Every value produced by a node, in topological order."""

    def describe(self, value: Key) -> Description | None:
        """What the value computes, or None if it is not affine in one input; raises Declined with the
        reason when it looks like a known op that cannot be read exactly."""

    def single_consumer(self, value: Key) -> bool:
        """True when exactly one node reads the value and it is not a graph output."""

    def readers(self, value: Key) -> Sequence[Key] | None:
        """The values of the nodes reading `value`, or None when a graph output or something the view
        cannot see reads it."""

    def layout(self, value: Key) -> Layout | None:
        """How a floating-point tensor value is read (see Layout), or None when unknown."""

    def foldable(self, value: Key) -> bool:
        """The value is computed from constants only and the IR can store it as one constant."""

    def label(self, value: Key) -> str:
        """A name users recognize (for reports and declines)."""

    def kind(self, value: Key) -> str:
        """The op type that computes the value (for reports)."""

    # Whether the IR's conv takes different begin and end padding; if not, its writer adds a pad op.
    asymmetric_padding: bool


def need_layout(view: GraphView, value: Key) -> Layout:
    """`view.layout(value)`, or Declined for a reader that cannot go on without it."""
    layout = view.layout(value)
    if layout is None:
        raise Declined("input shape or channel count unknown")
    return layout


def describe_or_none(view: GraphView, value: Key) -> Description | None:
    """`view.describe`, with a value the adapter declined read as "not affine": rules other than
    `affine` only look for their own patterns, and a decline must never escape a rule."""
    try:
        return view.describe(value)
    except Declined:
        return None


def read_once(cache: dict, value: Key, read: Callable[[Key], Any]) -> Any:
    """`read(value)` the first time, then what `cache` remembers of it, a Declined included (raised again):
    a view is asked the same questions every round (every IR's `describe`, FX's op normalization)."""
    if value not in cache:
        try:
            cache[value] = read(value)
        except Declined as e:
            cache[value] = e
    if isinstance(cache[value], Declined):
        raise Declined(str(cache[value]))
    return cache[value]


# ---------------------------------------------------------------- results

@dataclass(eq=False)
class Region:
    """`nodes` (topological order, root last) compute `op(source)`; `cost` is what they cost now."""

    source: Key
    op: AffineConv | None  # None once a consumer absorbed the region (see _release)
    nodes: tuple[Key, ...]
    cost: float
    costs_more: bool | None = None  # kept by _release: the fused op costs more than the ops it replaces
    regroups: int = 0  # Regroup nodes inside: the root's leading dims may differ from the source's
    weighted: int = 0  # convs and linears inside (affine ops that are not per-channel)
    # transposes inside: the root is transpose(reshape(op(source)), perm) (None: no transpose); `permutes`
    # counts the transposes that are plain views, `lead` the weighted ops before the first one
    perm: tuple[int, ...] | None = None
    permutes: int = 0
    lead: int = 0

    @property
    def root(self) -> Key:
        return self.nodes[-1]

    @property
    def fused_cost(self) -> float:
        return fused_cost(self.op)


@dataclass
class Plan:
    regions: list[Region] = field(default_factory=list)
    declined: dict[Key, str] = field(default_factory=dict)

    def signature(self, key=lambda k: k) -> list[tuple]:
        """The structure of the plan without its numbers (to tell whether new weights change it);
        `key` names values (e.g. str, so plans of two copies of one graph compare)."""
        return [(key(r.source), tuple(map(key, r.nodes)), r.op.signature()) for r in self.regions]


# ---------------------------------------------------------------- planner

def plan(view: GraphView) -> Plan:
    values = list(view.values())
    order = {v: i for i, v in enumerate(values)}
    boundaries: set[Key] = set()
    cost_refusals: dict[Key, str] = {}  # kept across rounds: a cut region's reason is the useful one
    for _ in range(len(values) + 1):
        maps, declined = _build_maps(view, values, order, boundaries)
        result, cuts = _select(view, maps, declined)
        cost_refusals.update({k: v for k, v in result.declined.items() if k not in declined})
        result.declined.update(cost_refusals)
        if not cuts - boundaries:
            return result
        boundaries |= cuts
    return result


def _build_maps(view: GraphView, values, order, boundaries):
    maps: dict[Key, Region] = {}
    declined: dict[Key, str] = {}

    def input_map(u: Key) -> Region | None:
        if u in maps and u not in boundaries and view.single_consumer(u):
            return maps[u]
        layout = view.layout(u)
        if layout is None:
            return None
        return Region(u, affine.identity(*layout), (), 0.0)

    def merged(parts: Sequence[Region], v: Key) -> tuple[Key, ...]:
        nodes = {n for p in parts for n in p.nodes}
        return tuple(sorted(nodes, key=order.__getitem__)) + (v,)

    for v in values:
        try:
            d = view.describe(v)
        except Declined as e:
            declined[v] = str(e)
            continue
        if d is None or isinstance(d, (Scaled, Pointwise, Transposed)):
            continue
        try:
            region = _extend_region(view, v, d, input_map, merged)
        except Declined as e:
            declined[v] = str(e)
            region = _fresh(v, d)
        if region is not None:
            maps[v] = region
            for u in _inputs(d):
                if u in maps and u in region.nodes and maps[u].op is not None:
                    maps[u] = _release(maps[u])
    return maps, declined


def _release(region: Region) -> Region:
    """An absorbed region keeps what selection reads, not its fused weights: a chain of large convs
    would otherwise hold one fused copy per value."""
    return Region(region.source, None, region.nodes, region.cost, _costs_more(region), region.regroups,
                  region.weighted, region.perm, region.permutes, region.lead)


def _fresh(v: Key, d: Description) -> Region | None:
    """The value as a one-node region over its direct input (after a refused rule)."""
    if isinstance(d, Affine):
        return Region(d.input, d.op, (v,), op_cost(d.op, d.op.stride), weighted=_weighted(d.op))
    if isinstance(d, Permute) and d.op is not None:  # its op reads the transposed input: the view comes first
        return Region(d.input, d.op, (v,), op_cost(d.op, d.op.stride), weighted=_weighted(d.op), perm=d.perm)
    return None


def _extend_region(view, v, d, input_map, merged) -> Region | None:
    if isinstance(d, Affine):
        m = input_map(d.input)
        if m is None or not m.nodes:
            return _fresh(v, d)
        reason = affine.check_compose(d.op, m.op)
        if reason:
            raise Declined(reason)
        op = affine.compose(d.op, m.op)
        return replace(m, op=op, nodes=m.nodes + (v,), cost=m.cost + op_cost(d.op, op.stride),
                       weighted=m.weighted + _weighted(d.op))

    if isinstance(d, PadWith):
        m = input_map(d.input)
        if m is None or not m.nodes:
            return None
        reason = affine.check_pad_with(m.op, d.pads, d.values, d.rtol)
        if reason:
            raise Declined(reason)
        op = affine.pad_with(m.op, d.pads)
        return replace(m, op=op, nodes=m.nodes + (v,), cost=m.cost + elementwise_cost(op.out_channels, op.stride))

    if isinstance(d, Regroup):
        m = input_map(d.input)
        if m is None or not m.nodes or m.op.rank != 0:
            return None
        if m.perm is not None:  # the views are written as one reshape, then one transpose
            raise Declined("reshape after a transpose of the region's positions (written only before it)")
        # a view: costs nothing
        return replace(m, nodes=m.nodes + (v,), regroups=m.regroups + 1, perm=None)

    if isinstance(d, Permute):
        m = input_map(d.input)
        if m is None or not m.nodes:
            return _fresh(v, d)  # a transpose of a boundary is one (its op, if any, reads the transposed source)
        after = view.layout(v) if d.op is None else Layout(d.op.in_channels, d.op.rank)
        reason = moves_channels(Layout(m.op.out_channels, m.op.rank), after, d.perm)  # as the region reads it
        if reason is None and not m.op.is_pointwise():
            reason = "the ops before the transpose read neighbouring positions (only pointwise ops cross it)"
        if reason:
            raise Declined(reason)
        perm = tuple(d.perm) if m.perm is None else tuple(m.perm[i] for i in d.perm)
        perm = None if perm == tuple(range(len(perm))) else perm  # the transposes cancel
        # a view: costs nothing; the op is the same map at the new layout's rank
        m = replace(m, op=affine.at_rank(m.op, after.rank), nodes=m.nodes + (v,), perm=perm,
                    lead=m.weighted if m.perm is None else m.lead, permutes=m.permutes + (d.op is None))
        if d.op is None:
            return m
        op = affine.compose(d.op, m.op)
        return replace(m, op=op, cost=m.cost + op_cost(d.op, op.stride), weighted=m.weighted + _weighted(d.op))

    maps = [input_map(u) for u in d.inputs]
    if any(m is None for m in maps):
        return None
    sources = {m.source for m in maps}
    if len(sources) != 1:
        raise Declined("branches read different tensors")
    if len({m.perm for m in maps}) != 1:
        raise Declined("branches transpose the source differently")
    if isinstance(d, Sum):
        ops = [affine.scale(m.op, w) if w != 1 else m.op for m, w in zip(maps, d.weights)]
        op = ops[0]
        for other in ops[1:]:
            reason = affine.check_add(op, other)
            if reason:
                raise Declined(reason)
            op = affine.add(op, other)
    else:
        ops = [m.op for m in maps]
        reason = affine.check_concat(ops)
        if reason:
            raise Declined(reason)
        op = affine.concat(ops)
    cost = sum(m.cost for m in {id(m): m for m in maps}.values())
    cost += elementwise_cost(op.out_channels, op.stride)
    parts = {id(m): m for m in maps}.values()
    return Region(maps[0].source, op, merged(maps, v), cost, regroups=sum(m.regroups for m in parts),
                  weighted=sum(m.weighted for m in parts), perm=maps[0].perm,
                  permutes=sum(m.permutes for m in parts), lead=max(m.lead for m in parts))


def _weighted(op: AffineConv) -> int:
    """1 for a conv or linear; 0 for a per-channel op, with or without zero padding."""
    c = op.out_channels
    diagonal = op.groups == c == op.in_channels and all(k == 1 for k in op.kernel) and all(s == 1 for s in op.stride)
    return int(not diagonal)


def _inputs(d: Description) -> tuple[Key, ...]:
    return (d.input,) if isinstance(d, (Affine, PadWith, Regroup, Permute)) else tuple(d.inputs)


def _select(view: GraphView, maps: dict[Key, Region], declined: dict[Key, str]):
    absorbed = {n for r in maps.values() for n in r.nodes[:-1]}
    result = Plan(declined=dict(declined))
    cuts: set[Key] = set()
    for v, region in maps.items():
        views = region.regroups + region.permutes
        if v in absorbed or _written_ops(view, region.op) >= len(region.nodes) - views:
            continue  # written with as many ops as it has (one op and views; pad + conv on FX): nothing to fuse
        if region.weighted == 0 and written_steps(region.op) == 0:
            result.declined[v] = ("per-channel ops (and zero padding) only: fused they would be a new conv or "
                                  "linear; left as they are, the cheapest form for the backend")
            continue
        if _too_expensive(region):
            result.declined[v] = (f"fused op would cost {region.fused_cost:.0f} MACs per input position, "
                                  f"no less than the {region.cost:.0f} of the {len(region.nodes)} ops it replaces")
            # Cut where the region first stopped paying off, so the cheap parts before it still fuse
            # (depthwise-BN then pointwise-BN: two convs, not one dense one and a stray BN).
            # A per-channel part that merely saves nothing is no place to cut: the sum it feeds may pay off.
            first_bad = next((n for n in region.nodes if len(maps[n].nodes) > 1 and _costs_more(maps[n])), v)
            cuts.update(_inputs(view.describe(first_bad)))
            continue
        if region.perm is not None and region.regroups and not _views_after(region):
            result.declined[v] = ("an op that reads neighbouring positions after reshapes and a transpose "
                                  "(written only with the views after a pointwise op)")
            continue
        result.regions.append(region)
    return result, cuts


def _written_ops(view: GraphView, op: AffineConv) -> int:
    """Ops the writer emits for `op` (plan.lower): scale/shift steps, or one conv and, where the IR's
    conv pads symmetrically only, a pad before it."""
    steps = written_steps(op)
    if steps:
        return steps
    uneven = any(b != e for b, e in op.pads)
    return 1 + int(uneven and not getattr(view, "asymmetric_padding", True))


def _costs_more(region: Region) -> bool:
    if region.op is None:
        return region.costs_more
    return region.fused_cost > region.cost * (1 + 1e-9)


def _too_expensive(region: Region) -> bool:
    if region.op is not None and region.op.per_channel() is not None:
        # written as scale/shift steps again (plan.lower): only worth it with fewer steps, and never a loop
        return region.fused_cost >= region.cost * (1 - 1e-9)
    return _costs_more(region)


# ---------------------------------------------------------------- the `affine` rule

def fuse_regions(view: GraphView) -> RulePlan:
    """Every maximal affine region becomes its fused op over the region's source."""
    found = plan(view)
    edits = [Replace(r.root, _term(view, r), r.nodes) for r in found.regions]

    def summary(written) -> tuple[int, str]:
        return len(written), f"{sum(len(e.erase) for e in written)} ops" if written else ""

    count, detail = summary(edits)
    return RulePlan(edits, found.declined, count, detail, regions=found.regions, summary=summary)


def _views_after(region: Region) -> bool:
    """A region with transposes is written as its op at the source's layout followed by the views when the op
    is pointwise and a weighted op comes before the first view (a linear stays in front of the transpose after
    it); otherwise the views go first and the op reads their result (BatchNorm1d, transpose, linear)."""
    return region.op.is_pointwise() and (region.lead > 0 or bool(region.regroups))


def _term(view: GraphView, region: Region):
    """The fused op on the region's source, with the region's views written around it (the root keeps its
    shape): reshape(op(source)) for regroups; with transposes, transpose(reshape(op(source)), perm) or
    op(transpose(source, perm))."""
    op, perm = region.op, region.perm
    if perm is not None and not _views_after(region):
        return Apply(PermuteTerm(region.source, perm), op)
    layout = view.layout(region.source)  # known: a region with views has a source read with a layout
    rank = op.rank if layout is None else layout.rank
    fused = Apply(region.source, op if op.rank == rank else affine.at_rank(op, rank))
    if perm is None:
        return Reshape(fused, region.root) if region.regroups else fused
    return PermuteTerm(Reshape(fused, region.root, perm) if region.regroups else fused, perm)
