"""Ghost concat (GhostNet, RepGhost), IR-neutral.

A Ghost module ends in `concat(y, D(y))` with D a depthwise conv (BN folded): C intrinsic
channels and C cheap ones.  Both halves are depthwise functions of y, so the pair is ONE
depthwise conv with two outputs per channel,

    G = depthwise(y) with filters (delta, D_c) for channel c, bias (0, d_c),

whose output is interleaved [y_0, D_0, y_1, D_1, ...].  The consumer absorbs the new
order: a dense conv (groups 1) reading the concat takes its input channels permuted
(W'[:, 2c] = W[:, c], W'[:, 2c+1] = W[:, C+c]).  With a ReLU on the cheap half
(`concat(y, relu(D(y)))`), relu(G(y)) is the same when y is itself a ReLU output, since
relu(y) = y there.  The identity must line up with D (stride 1, same output size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import affine
from .affine import AffineConv
from .channels import ACTIVATIONS
from .plan import Apply, Relu, Replace, RulePlan
from .planner import Affine, Concat, GraphView, Key, Pointwise, describe_or_none


@dataclass(eq=False)
class GhostRewrite:
    source: Key  # y
    op: AffineConv  # G: C -> 2C depthwise, interleaved outputs
    relu: bool  # apply ReLU to G's output
    concat: Key  # the concat value G replaces
    nodes: tuple[Key, ...]  # the cheap branch and the concat (last), erased
    consumers: dict[Key, AffineConv]  # each reader of the concat with its input channels permuted


def merge(view: GraphView) -> RulePlan:
    """The `ghost_concat` rule: each Ghost concat becomes G (with its ReLU), each reader of the concat
    the same op on G's interleaved channels."""
    rewrites, declined = plan_ghost(view)
    edits = []
    for g in rewrites:
        ghost = Apply(g.source, g.op)
        edits.append(Replace(g.concat, Relu(ghost) if g.relu else ghost, g.nodes))
        edits += [Replace(reader, Apply(g.concat, op), (reader,)) for reader, op in g.consumers.items()]
    return RulePlan(edits, declined, len(rewrites), f"{len(rewrites)} concats -> depthwise convs",
                    all_or_nothing=True)


def plan_ghost(view: GraphView) -> tuple[list[GhostRewrite], dict[Key, str]]:
    rewrites, declined = [], {}
    for v in view.values():
        d = describe_or_none(view, v)
        if not isinstance(d, Concat) or len(d.inputs) != 2:
            continue
        reason, rewrite = _match(view, v, d)
        if rewrite is not None:
            rewrites.append(rewrite)
        elif reason:
            declined[v] = reason
    return rewrites, declined


def _is_relu(d) -> bool:
    return isinstance(d, Pointwise) and d.fn is ACTIVATIONS["relu"]


def _match(view: GraphView, v: Key, d: Concat):
    y, z = d.inputs
    nodes, relu = [], False
    dz = describe_or_none(view, z)
    if _is_relu(dz):
        if not view.single_consumer(z):
            return "the cheap branch is read elsewhere", None
        if not _is_relu(describe_or_none(view, y)):
            return "a ReLU on the cheap half only, on an intrinsic half that may be negative", None
        nodes.append(z)
        relu, z = True, dz.input
        dz = describe_or_none(view, z)
    if not isinstance(dz, Affine) or dz.input != y:
        return None, None  # not a Ghost concat
    cheap = dz.op
    c = cheap.in_channels
    if not (cheap.groups == c == cheap.out_channels) or any(s != 1 for s in cheap.stride):
        return "the cheap op is not a stride-1 depthwise conv with one output per channel", None
    if not view.single_consumer(z):
        return "the cheap branch is read elsewhere", None
    identity = affine.identity(c, cheap.rank)
    reason = affine.check_add(identity, cheap)
    if reason:
        return f"the cheap op does not line up with its input: {reason}", None
    ident, dw = affine.align([identity, cheap])
    # interleave: out 2c is the identity, out 2c+1 the cheap filter, both reading channel c
    weight = np.stack([ident.weight, dw.weight], axis=1).reshape((2 * c,) + ident.weight.shape[1:])  # [2C, 1, *k]
    bias = np.stack([np.zeros(c), dw.bias], axis=1).reshape(2 * c)
    ghost = AffineConv(weight, bias, ident.stride, ident.pads, ident.dilation, c)
    readers = view.readers(v)
    if not readers:
        return "the concat is a graph output or read by an op that cannot take its channels reordered", None
    order = np.stack([np.arange(c), c + np.arange(c)], axis=1).reshape(-1)  # new channel j was old order[j]
    consumers = {}
    for r in readers:
        rd = describe_or_none(view, r)
        if not isinstance(rd, Affine) or rd.op.groups != 1 or rd.input != v:
            return "a reader of the concat is not a dense conv that can take its channels reordered", None
        op = rd.op
        consumers[r] = AffineConv(op.weight[:, order], op.bias, op.stride, op.pads, op.dilation, 1)  # [O, 2C, *k]
    return None, GhostRewrite(y, ghost, relu, v, (z,) + tuple(nodes) + (v,), consumers)
