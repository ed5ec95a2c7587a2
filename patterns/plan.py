"""What a rule returns, and how an IR writes it.

A rule reads a `GraphView` and returns a `RulePlan`: edits (replace a value by a term
built from a small vocabulary; or record that a value lost channels) and declines.
It never touches an IR.  The vocabulary:

    Key          an existing value (as the graph has it when the edit is written: an
                 earlier edit of the same plan may have replaced it)
    Constant     the value the view computed for a key at plan time (constant folding)
    Apply        an AffineConv on a term; `lower` decides how it is written (one conv,
                 one linear, or a per-channel scale and shift); or a ConvTranspose
    Relu         relu of a term
    Reshape      a term reshaped like an existing value (tokens [B, N, C] <-> [B*N, C])
    Permute      a term's axes permuted (a linear's output transposed to [B, C, N] for a BatchNorm1d)
    BatchedConv  one conv whose kernel differs per sample (dynamic-conv aggregation)

Each IR has one writer: an `Emitter` (constant, conv, conv_transpose, linear, scale_shift,
relu, reshape, permute, batched_conv) that `emit` drives over a term, plus the IR's own walk that
places the result, replaces uses and removes what died.  An IR that cannot express an edit says why
(`Writer.cannot_write`) and the driver records a decline; a rule never guesses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol, Union

import numpy as np

from .affine import AffineConv, ConvTranspose, regroup

Key = Hashable


@dataclass(frozen=True)
class Decline:
    """A rule left `node` alone for `reason`; `rule` is added by the driver."""

    rule: str
    node: str
    reason: str


# ---------------------------------------------------------------- terms

@dataclass(frozen=True, eq=False)
class Constant:
    """The plan-time value the view computed for `of`, stored as one constant."""

    of: Key


@dataclass(frozen=True, eq=False)
class Apply:
    """op(input): one conv, one linear or a per-channel scale and shift, as `lower(op)` decides for
    every IR; or one transposed conv."""

    input: "Term"
    op: AffineConv | ConvTranspose


@dataclass(frozen=True, eq=False)
class Relu:
    """max(input, 0): Ghost concat's cheap half keeps its ReLU."""

    input: "Term"


@dataclass(frozen=True, eq=False)
class Reshape:
    """input reshaped to the shape of the existing value `like` (only leading batch dims differ); with
    `perm`, to the shape that transposing by `perm` turns into like's (`unpermuted`): a Permute follows."""

    input: "Term"
    like: Key
    perm: tuple[int, ...] | None = None


@dataclass(frozen=True, eq=False)
class Permute:
    """input with its axes permuted as numpy.transpose(input, perm) does."""

    input: "Term"
    perm: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class BatchedConv:
    """conv(x[n], W[n]) + b[n] with W[n] = sum_k pi_k[n] W_k + W_S and b[n] = sum_k pi_k[n] b_k + b_S."""

    input: "Term"
    scales: tuple  # K keys of per-sample scalars pi_k, each [N, 1, ...]
    weights: np.ndarray  # [K, O, I/g, *k]
    biases: np.ndarray  # [K, O]
    static: AffineConv  # W_S, b_S and the geometry every W_k shares

    @property
    def has_static_weight(self) -> bool:
        return bool(np.any(self.static.weight))


Term = Union[Key, Constant, Apply, Relu, Reshape, Permute, BatchedConv]


def unpermuted(shape, perm: tuple[int, ...] | None) -> list | None:
    """The shape S with transpose(S, perm) == `shape` (`shape` itself without perm; None when unknown)."""
    if shape is None or perm is None:
        return None if shape is None else list(shape)
    return [shape[perm.index(i)] for i in range(len(perm))]


# ---------------------------------------------------------------- edits and plans

@dataclass(eq=False)
class Replace:
    """`value` becomes `term`; the nodes of `erase` (a region, value last) die with it."""

    value: Key
    term: Term
    erase: tuple = ()


@dataclass(eq=False)
class Resize:
    """`value` is computed by the same op, now with `channels` channels (dead-channel removal)."""

    value: Key
    channels: int


@dataclass
class RulePlan:
    edits: list = field(default_factory=list)  # Replace and Resize, in the order they are written
    declines: dict = field(default_factory=dict)  # key -> reason
    count: int = 0  # what the report counts: regions fused, channels removed, values folded...
    detail: str = ""
    all_or_nothing: bool = False  # the edits only make sense together (channels removed on both ends)
    regions: list = field(default_factory=list)  # planner.Region rows for the report (affine)
    summary: Callable | None = None  # (count, detail) of the edits written, when an IR declined some

    def signature(self, label: Callable[[Key], str]) -> list:
        """The structure of the plan without its numbers: equal signatures write the same graph."""
        return [(type(e).__name__, label(e.value), _shape(e.term if isinstance(e, Replace) else e.channels, label),
                 tuple(map(label, getattr(e, "erase", ())))) for e in self.edits]


def _shape(term, label) -> Any:
    if isinstance(term, Apply):
        return ("apply", _shape(term.input, label), term.op.signature())
    if isinstance(term, Relu):
        return ("relu", _shape(term.input, label))
    if isinstance(term, Reshape):
        return ("reshape", _shape(term.input, label), label(term.like), term.perm)
    if isinstance(term, Permute):
        return ("permute", _shape(term.input, label), term.perm)
    if isinstance(term, BatchedConv):
        return ("batched", _shape(term.input, label), tuple(map(label, term.scales)), term.weights.shape)
    if isinstance(term, Constant):
        return ("constant", label(term.of))
    return term if isinstance(term, int) else label(term)


# ---------------------------------------------------------------- lowering: one decision for every IR

def lower(op: AffineConv | ConvTranspose) -> list[tuple]:
    """How an AffineConv is written, in every IR:

    * per-channel (y_c = s_c x_c + t_c, any rank): [("scale_shift", s or None, t or None)], never a new
      conv (a step that does nothing is left out, at least one stays);
    * no spatial dims: [("linear", W[O, I], b[O])]; linear layers have no groups, so a grouped one is
      written block-diagonally dense;
    * otherwise [("conv", op)];
    * a ConvTranspose: [("conv_transpose", op)].
    """
    if isinstance(op, ConvTranspose):
        return [("conv_transpose", op)]
    per = op.per_channel()
    if per is not None:
        scale, shift = per
        keep_scale = bool(np.any(scale != 1)) or not np.any(shift)
        return [("scale_shift", scale if keep_scale else None, shift if np.any(shift) else None)]
    if op.rank == 0:
        return [("linear", regroup(op.weight, op.groups, 1), op.bias)]  # [O, I]
    return [("conv", op)]


def written_steps(op: AffineConv) -> int:
    """Elementwise passes the scale-shift form takes (0 when it is a conv or linear)."""
    step = lower(op)[0]
    return 0 if step[0] != "scale_shift" else sum(v is not None for v in step[1:])


class Emitter(Protocol):
    """The handful of methods an IR implements; each returns the IR value it built."""

    def constant(self, of: Key) -> Any: ...
    def conv(self, x: Any, op: AffineConv) -> Any: ...
    def conv_transpose(self, x: Any, op: ConvTranspose) -> Any: ...
    def linear(self, x: Any, weight: np.ndarray, bias: np.ndarray) -> Any: ...
    def scale_shift(self, x: Any, scale: np.ndarray | None, shift: np.ndarray | None, rank: int) -> Any: ...
    def relu(self, x: Any) -> Any: ...
    def reshape(self, x: Any, like: Key, perm: tuple[int, ...] | None = None) -> Any: ...
    def permute(self, x: Any, perm: tuple[int, ...]) -> Any: ...
    def batched_conv(self, x: Any, term: BatchedConv) -> Any: ...


def emit(out: Emitter, term: Term, value_of: Callable[[Key], Any]) -> Any:
    """Build `term` with the IR's emitter; `value_of(key)` is the key's current IR value."""
    if isinstance(term, Constant):
        return out.constant(term.of)
    if isinstance(term, Apply):
        x = emit(out, term.input, value_of)
        for step in lower(term.op):
            if step[0] == "conv":
                x = out.conv(x, step[1])
            elif step[0] == "conv_transpose":
                x = out.conv_transpose(x, step[1])
            elif step[0] == "linear":
                x = out.linear(x, step[1], step[2])
            else:
                x = out.scale_shift(x, step[1], step[2], term.op.rank)
        return x
    if isinstance(term, Relu):
        return out.relu(emit(out, term.input, value_of))
    if isinstance(term, Reshape):
        return out.reshape(emit(out, term.input, value_of), term.like, term.perm)
    if isinstance(term, Permute):
        return out.permute(emit(out, term.input, value_of), term.perm)
    if isinstance(term, BatchedConv):
        return out.batched_conv(emit(out, term.input, value_of), term)
    return value_of(term)


def reshape_sizes(target, source, static: Callable, same: Callable):
    """How an IR reshapes the fused op's output (the source's leading dims, then channels) to `target`'s
    shape: "same" when the leading dims already agree, else one entry per target dim: its static size,
    ("dim", j) for the source dim j it equals (dim i itself first), or -1 (at most once); None when that
    cannot be said.  `static(d)` is a dim's size or None, `same(a, b)` proves two dims equal."""
    if target is None or source is None:
        return None
    lead = list(source)[:-1]
    if len(target) == len(lead) + 1 and all(map(same, target, lead)):
        return "same"
    sizes = []
    for i, d in enumerate(target):
        order = ([i] if i < len(lead) else []) + list(range(len(lead)))
        match = next((j for j in order if same(d, lead[j])), None)
        sizes.append(static(d) if static(d) is not None else -1 if match is None else ("dim", match))
    return sizes if sizes.count(-1) <= 1 else None


def source_of(term: Term) -> Key | None:
    """The existing value a term reads (its innermost key); None for a Constant."""
    *_, innermost = terms(term)
    return None if isinstance(innermost, Constant) else innermost


def terms(term: Term):
    """Every sub-term of `term`, outermost first."""
    yield term
    inner = getattr(term, "input", None)
    if inner is not None:
        yield from terms(inner)
