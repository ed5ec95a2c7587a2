"""ONNX's size and index arithmetic read by `patterns.shapes`: `Sizes(value)` is the value as a `Sym`.

Used for border writes whose positions are computed at run time (the torch exporters with dynamic
shapes).  One table entry per op; an op not in the table, or one whose inputs leave the symbolic
fragment, gives an unknown, never a guess.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from ..patterns.shapes import Algebra, Lin, Sym

__all__ = ["Sizes"]

_DEPTH = 200  # deeper size arithmetic is left unknown


class Sizes:
    """Memoized evaluation of values as Syms; `seeds` gives some values outright (the padded input, with its
    dims as symbols).  `read` collects the nodes evaluated: the ones that read a tensor only for its shape."""

    def __init__(self, const: Callable[[ir.Value], np.ndarray | None], seeds: dict):
        self.alg, self.const, self.memo, self.read = Algebra(), const, dict(seeds), set()
        self._depth = 0

    def __call__(self, value: ir.Value | None) -> Sym | None:
        if value is None:
            return None
        if value not in self.memo:
            self.memo[value] = self._evaluate(value)
        return self.memo[value]

    def _evaluate(self, value: ir.Value) -> Sym | None:
        array = self.const(value)
        if array is not None:
            return self.alg.constant(array)
        node, rank = value.producer(), None if value.shape is None else len(value.shape)
        op = _OPS.get(node.op_type) if node is not None and node.domain in ("", "ai.onnx") else None
        out = None
        if op is not None and self._depth < _DEPTH and value is node.outputs[0]:
            self.read.add(node)
            self._depth += 1
            try:
                out = op(self, node)
            except (ValueError, IndexError, TypeError, ZeroDivisionError):  # shapes that do not fit: unknown
                out = None
            finally:
                self._depth -= 1
        if out is None or rank is not None and out.rank != rank:
            return None if rank is None else self.alg.unknown(rank)
        return out

    # -- helpers for the op table
    def ints(self, node: ir.Node, index: int, attribute: str | None = None) -> list[int] | None:
        """Constant ints from an input, or (older opsets) an attribute."""
        if attribute is not None and attribute in node.attributes:
            return list(node.attributes.get_ints(attribute))
        v = node.inputs[index] if index < len(node.inputs) else None
        array = None if v is None else self.const(v)
        return None if array is None else [int(a) for a in np.asarray(array).reshape(-1)]

    def entries(self, node: ir.Node, index: int) -> list | None:
        return self.alg.entries(self(node.inputs[index] if index < len(node.inputs) else None))

    def scalar(self, node: ir.Node, index: int) -> Lin | None:
        return self.alg.scalar(self(node.inputs[index] if index < len(node.inputs) else None))


def _integer(value: ir.Value) -> bool:
    return value.dtype is not None and value.dtype.is_integer()


def _binary(fn):
    def read(s: Sizes, node: ir.Node):
        a, b = s(node.inputs[0]), s(node.inputs[1])
        return None if a is None or b is None else s.alg.elementwise(fn, a, b)
    return read


def _mul(a: Lin, b: Lin):
    return b.scale(a.number) if a.number is not None else a.scale(b.number) if b.number is not None else None


def _div(s: Sizes, node: ir.Node):
    def exact(a: Lin, b: Lin):  # integer division by a constant that divides every term
        k = b.number
        if not k or a.const % k or any(c % k for _, c in a.terms):
            return None
        return Lin(a.const // k, {n: c // k for n, c in a.terms})
    return _binary(exact)(s, node) if _integer(node.outputs[0]) else None


def _where(s: Sizes, node: ir.Node):
    c, x, y = (s(v) for v in node.inputs[:3])
    pick = lambda c, x, y: None if c.number is None else x if c.number else y  # noqa: E731
    return None if None in (c, x, y) else s.alg.elementwise(pick, c, x, y)


def _cast(s: Sizes, node: ir.Node):
    x = node.inputs[0]
    to = ir.DataType(node.attributes.get_int("to", 0))
    if x.dtype is None or x.dtype.is_integer() != to.is_integer() or x.dtype.is_floating_point() != \
            to.is_floating_point():
        return None  # a cast between ints and floats may round: not followed
    return s(x)


def _shape(s: Sizes, node: ir.Node):
    x = s(node.inputs[0])
    a = node.attributes
    return None if x is None else s.alg.shape_of(x, a.get_int("start", 0), a.get_int("end", None))


def _gather(s: Sizes, node: ir.Node):
    x, index = s(node.inputs[0]), s.const(node.inputs[1])
    return None if x is None or index is None else s.alg.gather(x, index, node.attributes.get_int("axis", 0) % x.rank)


def _slice(s: Sizes, node: ir.Node):
    x = s(node.inputs[0])
    if x is None:
        return None
    starts, ends = s.entries(node, 1), s.entries(node, 2)
    axes = s.ints(node, 3) if len(node.inputs) > 3 and node.inputs[3] is not None else list(range(len(starts or ())))
    steps = s.entries(node, 4) if len(node.inputs) > 4 and node.inputs[4] is not None else [Lin(1)] * len(axes or ())
    if starts is None or ends is None or axes is None or steps is None:
        return s.alg.unknown(x.rank)
    return s.alg.slice(x, starts, ends, [a % x.rank for a in axes], steps)


def _range(s: Sizes, node: ir.Node):
    return s.alg.range(*(s.scalar(node, i) for i in range(3)))


def _unsqueeze(s: Sizes, node: ir.Node):
    x, axes = s(node.inputs[0]), s.ints(node, 1, "axes")
    return None if x is None or axes is None else s.alg.unsqueeze(x, axes)


def _squeeze(s: Sizes, node: ir.Node):
    x = s(node.inputs[0])
    given = "axes" in node.attributes or len(node.inputs) > 1 and node.inputs[1] is not None
    axes = s.ints(node, 1, "axes") if given else None
    return None if x is None or given and axes is None else s.alg.squeeze(x, axes)


def _reshape(s: Sizes, node: ir.Node):
    x, dims = s(node.inputs[0]), s.entries(node, 1)
    if x is None or dims is None:
        return None
    return s.alg.reshape(x, dims, bool(node.attributes.get_int("allowzero", 0)))


def _expand(s: Sizes, node: ir.Node):
    x, dims = s(node.inputs[0]), s.entries(node, 1)
    return None if x is None or dims is None else s.alg.expand(x, dims)


def _concat(s: Sizes, node: ir.Node):
    parts = [s(v) for v in node.inputs]
    return None if not parts or None in parts else s.alg.concat(parts, node.attributes.get_int("axis", 0))


def _transpose(s: Sizes, node: ir.Node):
    x = s(node.inputs[0])
    if x is None:
        return None
    return s.alg.transpose(x, list(node.attributes.get_ints("perm", list(range(x.rank))[::-1])))


def _constant_of_shape(s: Sizes, node: ir.Node):
    dims, value = s.entries(node, 0), node.attributes.get("value")
    fill = 0 if value is None else value.as_tensor().numpy().reshape(-1)[0].item()
    return None if dims is None else s.alg.expand(s.alg.constant(np.asarray(fill)), dims)


def _pad(s: Sizes, node: ir.Node):
    """The shape of a Pad with constant pads (its values are not followed)."""
    x, pads = s(node.inputs[0]), s.ints(node, 1, "pads")
    if x is None or pads is None or len(node.inputs) > 3 and node.inputs[3] is not None:
        return None
    n = x.rank
    return s.alg.pad(x, [(pads[i], pads[i + n]) for i in range(n)]) if len(pads) == 2 * n else None


def _scatter_nd(s: Sizes, node: ir.Node):
    x = s(node.inputs[0])
    return None if x is None else Sym(x.shape, None)  # the shape of its data


_OPS = {
    "Identity": lambda s, node: s(node.inputs[0]), "Cast": _cast, "Shape": _shape, "Gather": _gather,
    "Slice": _slice, "Range": _range, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Reshape": _reshape,
    "Expand": _expand, "Concat": _concat, "Transpose": _transpose, "ConstantOfShape": _constant_of_shape,
    "Add": _binary(lambda a, b: a + b), "Sub": _binary(lambda a, b: a - b), "Mul": _binary(_mul), "Div": _div,
    "Neg": lambda s, node: None if s(node.inputs[0]) is None else s.alg.elementwise(lambda a: -a, s(node.inputs[0])),
    "Equal": lambda s, node: _binary(s.alg.equal)(s, node), "Where": _where, "Pad": _pad, "ScatterND": _scatter_nd,
}
