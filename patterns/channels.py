"""Dead-channel removal (network slimming, MetaPruning, synaptic pruning), IR-neutral.

A pruned-by-zeroing network keeps full-size tensors whose pruned channels are constants:
an output channel o of a conv whose weights W[o] are all zero (after BatchNorm folding,
which the `affine` rule has done) is the constant b[o] everywhere.  Constants travel:

    per-channel op (BN, scale, bias, depthwise conv):  c -> sum(w_c) * c + b_c
        exact at the borders only when the op reads no padding or c == 0;
    pointwise activation f (ReLU, sigmoid, ...):        c -> f(c);
    Sum (residual add):                                 constant only if every branch is;
    Concat:                                             channels keep their constants.

Channels joined by those ops form one class (union-find over (value, channel) slots).
A class goes when every slot in it is constant and every op touching it can drop the
channel:
  - its producers are convs / linears with groups 1 (their output channel is removed),
    per-channel ops, activations, sums or concats inside the class;
  - its readers are such ops inside the class or dense convs / linears (groups 1), whose
    input channel is removed; a reader adds c * sum(W[:, i]) to its bias, which equals what
    it read from the channel only when c == 0 or the reader reads no zero padding — a
    non-zero constant read through a padded conv is not a bias at the borders;
  - no slot is a graph output or produced by an op the planner does not know.
A tensor keeps at least one channel.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .affine import AffineConv
from .plan import Apply, Replace, Resize, RulePlan
from .planner import Affine, Concat, GraphView, Key, Pointwise, Sum, describe_or_none


@dataclass
class ChannelPlan:
    keep: dict[Key, np.ndarray] = field(default_factory=dict)  # value -> bool mask of channels kept
    ops: dict[Key, AffineConv] = field(default_factory=dict)  # node -> its op on the remaining channels
    removed: int = 0  # channel classes removed (one per pruned channel, however many tensors carry it)
    kept: dict[str, int] = field(default_factory=dict)  # constant classes kept, by reason

    def __bool__(self) -> bool:
        return bool(self.ops)

    def kept_summary(self) -> str:
        """e.g. "16 kept: a non-zero constant read through a padded conv is not a bias at the borders"."""
        return "; ".join(f"{n} kept: {why}" for why, n in sorted(self.kept.items(), key=lambda kv: -kv[1]))


ChannelView = GraphView  # readers() says which ops a channel reaches


# Activations as functions on per-channel constants (float64), named once for every adapter.
def clip(low: float | None, high: float | None):
    return lambda c: np.clip(c, -np.inf if low is None else low, np.inf if high is None else high)


def _sigmoid(c):
    return 1.0 / (1.0 + np.exp(-c))


ACTIVATIONS = {
    "relu": clip(0.0, None),
    "relu6": clip(0.0, 6.0),
    "sigmoid": _sigmoid,
    "hardsigmoid": lambda c: np.clip(c / 6.0 + 0.5, 0.0, 1.0),
    "hardswish": lambda c: c * np.clip(c + 3.0, 0.0, 6.0) / 6.0,
    "silu": lambda c: c * _sigmoid(c),
    "tanh": np.tanh,
}


def _per_channel_op(op: AffineConv) -> bool:
    """Depthwise with one output per channel: channel c in, channel c out."""
    return op.groups == op.in_channels == op.out_channels


def remove_dead(view: ChannelView) -> RulePlan:
    """The `dead_channels` rule: every op touching a removed channel is written again on the kept channels
    (reading its input as the plan leaves it), and every value that lost channels says so."""
    found = plan_channels(view)
    kept = found.kept_summary()
    if not found:
        return RulePlan(count=0, detail=kept)
    edits = [Replace(v, Apply(view.describe(v).input, op), (v,)) for v, op in found.ops.items()]
    edits += [Resize(v, int(keep.sum())) for v, keep in found.keep.items()]
    detail = f"{found.removed} channels removed" + (f"; {kept}" if kept else "")
    return RulePlan(edits, {}, found.removed, detail, all_or_nothing=True)


def plan_channels(view: ChannelView) -> ChannelPlan:
    values = list(view.values())
    desc = {v: describe_or_none(view, v) for v in values}
    consts: dict[Key, np.ndarray | None] = {}
    for v in values:
        consts[v] = _constants(view, v, desc[v], consts)

    # union-find over constant slots; a constant slot linked to a non-constant one is tainted
    parent: dict[tuple, tuple] = {}
    tainted: set[tuple] = set()

    def find(s):
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    def link(a: Key, ca: np.ndarray, b: Key, cb: np.ndarray):
        """Channels ca of value a are channels cb of value b."""
        va, vb = consts.get(a), consts.get(b)
        if va is not None and len(va) != len(ca):  # the two ops read a's channels differently: keep both
            tainted.update((a, int(i)) for i in np.flatnonzero(~np.isnan(va)))
            tainted.update((b, int(j)) for j in cb if vb is not None and not np.isnan(vb[j]))
            return
        for i, j in zip(ca, cb):
            ka = va is not None and not np.isnan(va[i])
            kb = vb is not None and not np.isnan(vb[j])
            if ka and kb:
                ra, rb = find((a, i)), find((b, j))
                if ra != rb:
                    parent[ra] = rb
            elif ka:
                tainted.add((a, i))
            elif kb:
                tainted.add((b, j))

    for v in values:
        c = consts[v]
        if c is not None:
            for i in np.flatnonzero(~np.isnan(c)):
                parent[(v, int(i))] = (v, int(i))
    for v in values:
        d, n = desc[v], _count(consts, v)
        if n is None:
            continue
        ch = np.arange(n)
        if isinstance(d, Affine) and _per_channel_op(d.op) or isinstance(d, Pointwise):
            link(d.input, ch, v, ch)
        elif isinstance(d, Sum):
            for u in d.inputs:
                link(u, ch, v, ch)
        elif isinstance(d, Concat):
            offset = 0
            for u in d.inputs:
                k = _count(consts, u) or 0
                link(u, np.arange(k), v, offset + np.arange(k))
                offset += k

    classes: dict[tuple, list[tuple]] = defaultdict(list)
    for s in parent:
        classes[find(s)].append(s)
    bad_roots = {find(s) for s in tainted}

    result = ChannelPlan()
    remove: dict[Key, set[int]] = defaultdict(set)
    for root, slots in classes.items():
        reason = "a branch of a sum or concat it joins is not constant" if root in bad_roots else None
        reason = reason or _pinned(view, slots, desc, consts)
        if reason:
            result.kept[reason] = result.kept.get(reason, 0) + 1
            continue
        result.removed += 1
        for v, i in slots:
            remove[v].add(i)

    # a tensor keeps one channel: put back the class of its last removed channel
    for v in list(remove):
        n = _count(consts, v)
        if n is not None and len(remove[v]) >= n:
            last = max(remove[v])
            slots = classes[find((v, last))]
            for u, i in slots:
                remove[u].discard(i)
            result.removed -= 1
            reason = "it is the last channel of its tensor"
            result.kept[reason] = result.kept.get(reason, 0) + 1
    remove = {v: s for v, s in remove.items() if s}
    if not remove:
        return ChannelPlan(kept=result.kept)

    for v, idx in remove.items():
        mask = np.ones(_count(consts, v), dtype=bool)
        mask[list(idx)] = False
        result.keep[v] = mask
    for v in values:
        d = desc[v]
        if not isinstance(d, Affine):
            continue
        keep_in, keep_out = result.keep.get(d.input), result.keep.get(v)
        if keep_in is None and keep_out is None:
            continue
        result.ops[v] = _shrunk(d.op, keep_in, keep_out, consts.get(d.input))
    return result


def _count(consts, v) -> int | None:
    c = consts.get(v)
    return None if c is None else len(c)


def _constants(view: ChannelView, v: Key, d, consts) -> np.ndarray | None:
    """Per-channel constant value of `v` (NaN where the channel is not constant), or None when the
    channel count is unknown."""
    layout = view.layout(v)
    if layout is None:
        return None
    out = np.full(layout.channels, np.nan)
    if isinstance(d, Affine):
        return _through_op(d.op, consts.get(d.input), out)
    if isinstance(d, Pointwise):
        c = consts.get(d.input)
        if c is None or len(c) != len(out):
            return out
        known = ~np.isnan(c)
        out[known] = np.asarray(d.fn(c[known]), dtype=np.float64)
        return out
    if isinstance(d, Sum):
        parts = [consts.get(u) for u in d.inputs]
        if any(p is None or len(p) != len(out) for p in parts):
            return out
        return sum(w * p for w, p in zip(d.weights, parts))
    if isinstance(d, Concat):
        parts = [consts.get(u) for u in d.inputs]
        if any(p is None for p in parts) or sum(map(len, parts)) != len(out):
            return out
        return np.concatenate(parts)
    return out


def _tap_sums(op: AffineConv) -> np.ndarray:
    """[O, I/g]: each kernel summed over its taps (what a constant input channel contributes)."""
    return op.weight.reshape(op.weight.shape[:2] + (-1,)).sum(-1)


def _through_op(op: AffineConv, c: np.ndarray | None, out: np.ndarray) -> np.ndarray:
    if op.out_channels != len(out):
        return out
    if c is None or len(c) != op.in_channels:
        c = np.full(op.in_channels, np.nan)
    # an input channel is usable when it is constant and, read through padding, zero
    usable = ~np.isnan(c) & ((c == 0) | (not op.has_padding()))
    nonzero = np.any(op.weight.reshape(op.weight.shape[:2] + (-1,)) != 0, axis=2)  # [O, I/g]
    per_in, per_out = op.weight.shape[1], op.out_channels // op.groups
    index = (np.arange(op.out_channels) // per_out)[:, None] * per_in + np.arange(per_in)[None, :]  # [O, I/g]
    constant = np.all(usable[index] | ~nonzero, axis=1)
    contribution = (_tap_sums(op) * np.where(nonzero, np.nan_to_num(c[index]), 0.0)).sum(1)
    out[constant] = op.bias[constant] + contribution[constant]
    return out


def _pinned(view: ChannelView, slots: list[tuple], desc, consts) -> str | None:
    """Why this constant class must stay, or None when every op touching it can drop it."""
    values = {v for v, _ in slots}
    for v, i in slots:
        d = desc.get(v)
        if d is None:
            return "it is produced by an op repfuse does not shrink"
        if isinstance(d, Affine) and not _per_channel_op(d.op) and d.op.groups != 1:
            return "it is produced by a grouped conv"
        readers = view.readers(v)
        if readers is None:
            return "it is a graph output or read by an op repfuse cannot see"
        for r in readers:
            rd = desc.get(r)
            if isinstance(rd, (Pointwise, Sum, Concat)) or (isinstance(rd, Affine) and _per_channel_op(rd.op)):
                if r not in values:
                    return "it reaches an op outside its class"  # defensive: linking puts them together
                continue
            if not isinstance(rd, Affine):
                return "it is read by an op repfuse does not shrink"
            if rd.op.groups != 1:
                return "it is read by a grouped conv"
            if consts[v][i] != 0 and rd.op.has_padding():
                return "a non-zero constant read through a padded conv is not a bias at the borders"
    return None


def _shrunk(op: AffineConv, keep_in: np.ndarray | None, keep_out: np.ndarray | None,
            c: np.ndarray | None) -> AffineConv:
    """The op on the kept channels; removed constant inputs join the bias."""
    w, b = op.weight, op.bias
    if _per_channel_op(op):
        keep = keep_out if keep_out is not None else keep_in
        return AffineConv(w[keep], b[keep], op.stride, op.pads, op.dilation, int(keep.sum()))
    if keep_out is not None:
        w, b = w[keep_out], b[keep_out]  # [O', I, *k]
    if keep_in is not None:
        gone = ~keep_in
        b = b + _tap_sums(AffineConv(w, b, op.stride, op.pads, op.dilation, 1))[:, gone] @ np.nan_to_num(c[gone])
        w = w[:, keep_in]  # [O', I', *k]
    return AffineConv(w, b, op.stride, op.pads, op.dilation, op.groups)

