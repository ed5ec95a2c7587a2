"""Dynamic-convolution aggregation (DyNet, CondConv, Dynamic Convolution), IR-neutral.

A dynamic conv computes, per sample n,

    y[n] = sum_k pi_k[n] * A_k(x)[n]  +  S(x)[n]

with affine ops A_k (convs with constant weights W_k, b_k) over one source x, per-sample
scalars pi_k (the attention, data-dependent) and an optional static affine part S.
Convolution is linear in its weights, so on one geometry (common kernel grid, pads,
dilation and groups: `affine.align`) this is one conv with the per-sample kernel

    W[n] = sum_k pi_k[n] W_k + W_S,      b[n] = sum_k pi_k[n] b_k + b_S,

exact for any attention values (no softmax or sum-to-one assumption).  A per-channel
affine op after the sum (the BatchNorm after a dynamic conv) folds in: its scale
multiplies every W_k, b_k and W_S, b_S; its shift joins b_S.  A batch of N runs as one
conv with groups N*g on the input viewed as [1, N*C, H, W].

The planner reads `Scaled(conv_output, pi_k)`, `Sum` and per-channel `Affine`
descriptions from the adapter's view, after the `affine` rule has run (so each term is
one conv).  It needs K >= 2 scaled terms: with one, aggregation saves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import affine
from .affine import AffineConv, Declined
from .plan import BatchedConv, Replace, RulePlan
from .planner import Affine, GraphView, Key, Scaled, Sum, describe_or_none


@dataclass(eq=False)
class _Weighted:
    source: Key
    scaled: list[tuple[Key, AffineConv]]
    static: AffineConv | None
    nodes: tuple[Key, ...]


def aggregate(view: GraphView) -> RulePlan:
    """The `dynamic_conv` rule: each maximal dynamic-conv region becomes one BatchedConv."""
    edits, declined = plan_dynamic(view)

    def summary(written) -> tuple[int, str]:
        convs = sum(len(e.term.scales) for e in written)
        return len(written), f"{convs} weighted convs -> {len(written)}" if written else ""

    return RulePlan(edits, declined, *summary(edits), summary=summary)


def plan_dynamic(view: GraphView) -> tuple[list[Replace], dict[Key, str]]:
    """The maximal dynamic-conv regions of the graph (root replaced by its BatchedConv), and the reasons
    for the ones declined."""
    values = list(view.values())
    order = {v: i for i, v in enumerate(values)}
    terms: dict[Key, _Weighted] = {}
    declined: dict[Key, str] = {}
    for v in values:
        try:
            t = _extend_weighted(view, v, describe_or_none(view, v), terms, order)
        except Declined as e:
            declined[v] = str(e)
            continue
        if t is not None:
            terms[v] = t
    absorbed = {n for t in terms.values() for n in t.nodes[:-1]}
    regions = []
    for v, t in terms.items():
        if v in absorbed:
            continue
        if len(t.scaled) < 2:
            continue  # one weighted conv: nothing to aggregate
        if t.scaled[0][1].rank == 0:  # a linear reads one position: building W[n] costs more than K products
            declined[v] = "dynamic linear: per-sample weights on [N, C] would cost more than the K linears they replace"
            continue
        regions.append(_region(t))
    return regions, declined


def _inner(view: GraphView, u: Key, terms: dict[Key, _Weighted]) -> _Weighted | None:
    return terms.get(u) if view.single_consumer(u) else None


def _static_term(view: GraphView, u: Key) -> tuple[Key, AffineConv, tuple[Key, ...]] | None:
    """A Sum operand that is not weighted: an affine op of some source, or the source itself."""
    d = describe_or_none(view, u)
    if isinstance(d, Affine) and view.single_consumer(u):
        return d.input, d.op, (u,)
    layout = view.layout(u)
    return None if layout is None else (u, affine.identity(*layout), ())


def _extend_weighted(view: GraphView, v: Key, d, terms: dict[Key, _Weighted], order) -> _Weighted | None:
    if isinstance(d, Scaled):
        inner = describe_or_none(view, d.input)
        if not isinstance(inner, Affine) or not view.single_consumer(d.input):
            return None
        return _Weighted(inner.input, [(d.scale, inner.op)], None, (d.input, v))

    if isinstance(d, Affine):
        t = _inner(view, d.input, terms)
        pc = d.op.per_channel()
        if t is None or pc is None:
            return None
        scale, shift = pc
        no_shift = affine.per_channel(scale, np.zeros_like(shift), d.op.rank)
        scaled = [(s, affine.compose(no_shift, op)) for s, op in t.scaled]
        if t.static is not None:
            static = affine.compose(d.op, t.static)
        else:  # the shift becomes the static bias
            first = t.scaled[0][1]
            static = AffineConv(np.zeros_like(scaled[0][1].weight), shift.copy(), first.stride, first.pads,
                                first.dilation, first.groups)
        return _Weighted(t.source, scaled, static, t.nodes + (v,))

    if isinstance(d, Sum):
        parts = [(_inner(view, u, terms), w, u) for u, w in zip(d.inputs, d.weights)]
        if not any(t is not None for t, _, _ in parts):
            return None
        source, scaled, statics, nodes = None, [], [], set()
        for t, w, u in parts:
            if t is not None:
                src = t.source
                scaled += [(s, affine.scale(op, w)) for s, op in t.scaled]
                if t.static is not None:
                    statics.append(affine.scale(t.static, w))
                nodes.update(t.nodes)
            else:
                st = _static_term(view, u)
                if st is None:
                    return None
                src, op, more = st
                statics.append(affine.scale(op, w))
                nodes.update(more)
            if source is not None and src != source:
                raise Declined("the weighted convs read different tensors")
            source = src
        ops = [op for _, op in scaled] + statics
        for other in ops[1:]:
            reason = affine.check_add(ops[0], other)
            if reason:
                raise Declined(f"the weighted convs do not line up: {reason}")
        static = None
        for op in statics:
            static = op if static is None else affine.add(static, op)
        return _Weighted(source, scaled, static, tuple(sorted(nodes, key=order.__getitem__)) + (v,))
    return None


def _region(t: _Weighted) -> Replace:
    ops = [op for _, op in t.scaled]
    static = t.static
    if static is None:
        first = ops[0]
        static = AffineConv(np.zeros_like(first.weight), np.zeros(first.out_channels), first.stride,
                            first.pads, first.dilation, first.groups)
    aligned = affine.align(ops + [static])
    weights = np.stack([op.weight for op in aligned[:-1]])  # [K, O, I/g, *k]
    biases = np.stack([op.bias for op in aligned[:-1]])  # [K, O]
    term = BatchedConv(t.source, tuple(s for s, _ in t.scaled), weights, biases, aligned[-1])
    return Replace(t.nodes[-1], term, t.nodes)
