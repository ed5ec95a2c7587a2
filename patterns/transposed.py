"""The `conv_transpose` rule: per-channel ops after a transposed conv folded into its weights and bias.

A transposed conv is no AffineConv, and the conv algebra composes nothing into it.  A per-channel
op after it (inference BatchNorm, a bias, LayerScale's `x * gamma`) only scales and shifts its output
channels, which is exact for every stride, padding, output_padding, dilation and groups
(`affine.then_per_channel`).  A chain of such ops folds while each value in it has one reader: the
transposed conv's own output, read by anything else too, is still needed unscaled.
"""

from __future__ import annotations

from . import affine
from .affine import ConvTranspose
from .plan import Apply, Replace, RulePlan
from .planner import Affine, GraphView, Key, Transposed, describe_or_none


def fold(view: GraphView) -> RulePlan:
    """Every transposed conv followed by per-channel ops becomes one transposed conv."""
    chains: dict[Key, tuple[Key, ConvTranspose, tuple]] = {}  # value -> (input, transposed conv, nodes)
    declined: dict[Key, str] = {}
    for v in view.values():
        d = describe_or_none(view, v)
        if isinstance(d, Transposed):
            chains[v] = (d.input, d.op, (v,))
        elif isinstance(d, Affine) and d.input in chains and d.op.per_channel() is not None:
            source, op, nodes = chains[d.input]
            reason = affine.check_then_per_channel(op, d.op)
            if not view.single_consumer(d.input):
                reason = "the value it scales is read elsewhere too (the unscaled transposed conv output is needed)"
            if reason:
                declined[v] = reason
            else:
                chains[v] = (source, affine.then_per_channel(op, d.op), nodes + (v,))
    absorbed = {n for _, _, nodes in chains.values() for n in nodes[:-1]}
    edits = [Replace(v, Apply(source, op), nodes) for v, (source, op, nodes) in chains.items()
             if len(nodes) > 1 and v not in absorbed]

    def summary(written) -> tuple[int, str]:
        folded = sum(len(e.erase) - 1 for e in written)
        return len(written), f"{folded} per-channel ops folded into transposed convs" if written else ""

    return RulePlan(edits, declined, *summary(edits), summary=summary)
