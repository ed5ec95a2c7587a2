"""TVM Relax reader: one function's dataflow bindings as the planners' GraphView (keys are binding vars).

Constants are `relax.Constant`s (module constants, or parameters bound with `relax.transform.BindParams`) and what
`_FOLDS` computes from them.  Only dataflow blocks are read.  A conv or matmul whose only reader adds a per-channel
constant is one Affine at the add (a transposed conv, one Transposed), as `relax_write` writes it.  A reshape that
keeps a channels-last value's channels last is a `Regroup` (TVM writes an N-D linear as reshape, matmul, reshape;
the planner does not rewrite a region of one op and such views).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..patterns import affine
from ..patterns.affine import Declined
from ..patterns.borders import border_fill
from ..patterns.channels import ACTIVATIONS, clip
from ..patterns.planner import (Affine, Concat, Layout, PadWith, Permute, Pointwise, Regroup, Scaled, Sum,
                                Transposed, describe_or_none, keeps_channels_last, need_layout, padded, precision,
                                read_once, splits_channels)

__all__ = ["RelaxView"]


def _op_name(expr) -> str | None:
    return expr.op.name if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) else None


def _constant(expr) -> np.ndarray | None:
    """The array of a Relax constant node (tvm.ir.expr.Constant since TVM 0.27), else None."""
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) and hasattr(expr.value, "numpy") else None


def _dtype(var) -> str:
    return str(getattr(getattr(var, "ty", None), "dtype", ""))


def _static(dim) -> int | None:
    """A shape entry as int, or None when it is symbolic (IntImm moved modules across TVM versions)."""
    return int(dim) if isinstance(dim, int) or type(dim).__name__ == "IntImm" else None


def _dims(var) -> list | None:
    """A tensor var's shape: ints where static, the symbolic PrimExprs elsewhere; None when unknown."""
    ty = getattr(var, "ty", None)  # TVM 0.27's struct info
    values = getattr(getattr(ty, "shape", None), "values", None) if isinstance(ty, relax.TensorType) else None
    return None if values is None else [d if _static(d) is None else _static(d) for d in values]


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _scalar(arg) -> float | None:
    """A scalar argument (IntImm, FloatImm, or a PrimValue wrapping one) as float, else None."""
    if type(arg).__name__ in ("IntImm", "FloatImm"):
        return float(arg.value)
    value = getattr(arg, "value", None)
    return _scalar(value) if value is not None and not isinstance(value, (int, float)) else None


def _int_arg(arg) -> int | None:
    """An integer argument, given as an IntImm or a PrimValue wrapping one."""
    return None if (value := _scalar(arg)) is None or value != int(value) else int(value)


def _same_dim(a, b) -> bool:
    """Two shape entries that are provably equal (equal ints, or symbolic expressions equal for every value)."""
    sa, sb = _static(a), _static(b)
    if sa is not None or sb is not None:
        return sa == sb
    try:  # tvm.sym since TVM 0.27 (tvm.arith before)
        return a.same_as(b) or bool((getattr(tvm, "sym", None) or tvm.arith).Analyzer().can_prove_equal(a, b))
    except Exception:  # noqa: BLE001 - unprovable is "not the same"
        return False


def _same_shape(a, b) -> bool:
    """Two vars' tensor types with provably equal shapes and equal dtypes."""
    da, db = _dims(a), _dims(b)
    return None not in (da, db) and _dtype(a) == _dtype(b) and len(da) == len(db) and all(map(_same_dim, da, db))


def _direct_args(expr) -> list:
    """What a binding reads directly: call arguments (a tuple argument's items), tuple fields, an item's tuple."""
    items = expr.args if isinstance(expr, relax.Call) else getattr(expr, "fields", [getattr(expr, "tuple_value", expr)])
    return [f for a in items for f in (a.fields if isinstance(a, relax.Tuple) else [a])]


class RelaxView:
    """The planners' view of one Relax function."""

    def __init__(self, func: relax.Function):
        self.bound: dict[relax.Var, relax.Expr] = {}
        self._values: list[relax.Var] = []
        self.users: dict[relax.Var, list] = {}  # var -> the vars of all bindings reading it (None: the body)
        self._hidden: set[relax.Var] = set()  # vars read somewhere other than as a direct argument
        self._const: dict[relax.Var, np.ndarray | None] = {}
        self._described: dict = {}  # var -> description or Declined (a view is read many times per rule)
        self.attached: dict[relax.Var, list[relax.Var]] = {}  # var -> bindings that go with it
        self._bias_of: dict[relax.Var, relax.Var] = {}  # bias add -> the conv / matmul it is read with
        for block in func.body.blocks:
            for binding in block.bindings:
                value = getattr(binding, "value", None)
                direct = _direct_args(value) if isinstance(binding, relax.VarBinding) else []
                for v in relax.analysis.free_vars(value):  # match_cast and friends read too
                    self.users.setdefault(v, []).append(binding.var)
                    if not any(v.same_as(d) for d in direct):
                        self._hidden.add(v)
                if isinstance(binding, relax.VarBinding):
                    self.bound[binding.var] = value
                    if isinstance(block, relax.DataflowBlock):
                        self._values.append(binding.var)
        for v in relax.analysis.free_vars(func.body.body):
            self.users.setdefault(v, []).append(None)
            self._hidden.add(v)
        self._last = self._channels_last()
        for var in self._values:
            if _op_name(self.bound[var]) == "relax.add":
                self._read_with_bias(var)
        self._host = {conv: add for add, conv in self._bias_of.items()}

    # -- GraphView protocol
    def values(self):
        return [v for v in self._values if v not in self._host]

    def single_consumer(self, var) -> bool:
        return isinstance(var, relax.DataflowVar) and len(self.users.get(var, ())) == 1

    def readers(self, var):
        """The bindings reading `var` as a direct argument; None when it leaves its block or a nested expr reads it."""
        if not isinstance(var, relax.DataflowVar) or var in self._hidden:
            return None
        return list(dict.fromkeys(self._host.get(r, r) for r in self.users.get(var, [])))

    def layout(self, var) -> Layout | None:
        dims = _dims(var)
        if dims is None or len(dims) < 2 or not _dtype(var).startswith(("float", "bfloat")):
            return None
        axis = len(dims) - 1 if var in self._last else 1
        return Layout(dims[axis], len(dims) - 1 - axis) if isinstance(dims[axis], int) else None

    def foldable(self, var) -> bool:
        """A dataflow var computing (`_FOLDS`) a constant of its static shape, not a layout op over a Constant."""
        if not isinstance(var, relax.DataflowVar) or not isinstance(self.bound.get(var), relax.Call) \
                or self._layout_of_constant(var):
            return False
        value, dims = self.const(var), _dims(var)
        return value is not None and dims is not None and list(value.shape) == [_static(d) for d in dims]

    def label(self, var) -> str:
        return str(getattr(var, "name", None) or getattr(var, "name_hint", var))  # `name` since TVM 0.27

    def kind(self, var) -> str:
        expr = self.bound.get(self._bias_of.get(var, var))
        if isinstance(expr, relax.TupleGetItem):
            expr = self.bound.get(expr.tuple_value)
        return (_op_name(expr) or type(expr).__name__).rsplit(".", 1)[-1]

    def describe(self, var):
        return read_once(self._described, var, self._describe)

    # -- reading
    def _describe(self, var):
        expr = self.bound.get(var)
        if expr is None or self.const(var) is not None or not _dtype(var).startswith(("float", "bfloat")):
            return None  # a function parameter, a constant, or not a tensor of numbers (index arithmetic)
        read = RelaxView._batch_norm if isinstance(expr, relax.TupleGetItem) else _READERS.get(_op_name(expr))
        d = None if read is None else read(self, var, expr)
        if isinstance(d, Affine):  # what the op does must be what the tensors' layouts say
            for v, channels in ((var, d.op.out_channels), (d.input, d.op.in_channels)):
                if (layout := self.layout(v)) is not None and layout != (channels, d.op.rank):
                    raise Declined(f"{self.kind(var)} reads {layout.channels} channels and {layout.rank} spatial "
                                   f"dims where the op has {channels} and {d.op.rank}")
        return d

    def _regroup(self, var, call):
        """A reshape of a channels-last value that keeps its channels last: only the leading dims move."""
        x, before, after = call.args[0], self.layout(call.args[0]), self.layout(var)
        same = before is not None and after is not None and before == after and not before.rank
        if same and _keeps_last_dim(call, var):
            return Regroup(self._input(x))
        if reason := splits_channels(_dims(x), _dims(var), before):
            raise Declined(reason)
        return None

    def _permute(self, var, call):
        """A transpose (permute_dims): a view the planner may carry a pointwise region across."""
        x = self._input(call.args[0])
        return None if _dims(x) is None else Permute(x, _axes(call, len(_dims(x))))

    def _read_with_bias(self, add):
        """conv / matmul + per-channel constant, the conv read by nothing else: one Affine (Transposed) at the add."""
        d = describe_or_none(self, add)
        inner = d.input if isinstance(d, Affine) and d.op.per_channel() is not None else None
        if _op_name(self.bound.get(inner)) not in _WEIGHTED or not self.single_consumer(inner):
            return
        di = describe_or_none(self, inner)
        if isinstance(di, Transposed) and affine.check_then_per_channel(di.op, d.op) is None:
            read = Transposed(di.input, affine.then_per_channel(di.op, d.op))
        elif isinstance(di, Affine) and affine.check_compose(d.op, di.op) is None:
            read = Affine(di.input, affine.compose(d.op, di.op))
        else:
            return
        self._described[add], self._bias_of[add], self.attached[add] = read, inner, [inner]

    def _channels_last(self) -> set:
        """[B, ..., C] values (3-D and up) a matmul with a constant weight reads or writes and those elementwise
        ops chain to them; a value that a channels-first op (conv, BatchNorm, pool, pad) touches stays so.  A
        permute_dims keeping the last axis last is such a link; one moving a channels-first value's axis 1 last
        makes its result channels-last ([B, C, N] -> [B, N, C] after a BatchNorm1d)."""
        last, first, links, moves = set(), set(), [], []
        for var, expr in self.bound.items():
            name = _op_name(expr)
            args = [a for a in getattr(expr, "args", ()) if isinstance(a, relax.Var)]
            if name == "relax.matmul" and self.const(expr.args[1]) is not None:
                last.update([a for a in expr.args[:1] if isinstance(a, relax.Var)] + [var])
            elif name in _ELEMENTWISE or name in _ACTIVATION or name == "relax.clip" or _keeps_last_dim(expr, var):
                links += [(a, var) for a in args if self.const(a) is None]
            elif name in _CHANNELS_FIRST or isinstance(expr, relax.TupleGetItem):
                first.update(args + [var])
            elif name == "relax.permute_dims" and args and len(_dims(var) or ()) > 2:
                axes = _axes(expr, len(_dims(var)))
                (links if axes[-1] == len(axes) - 1 else moves if axes[-1] == 1 else []).append((args[0], var))
        while True:
            while grow := [(a, b) for a, b in links if (a in last) != (b in last) and not {a, b} & first]:
                last.update(v for link in grow for v in link)
            if not (grow := {b for a, b in moves if a in first and not {a, b} & last and b not in first}):
                break
            last |= grow
        return {v for v in last - first if len(_dims(v) or ()) >= 3}

    def const(self, expr) -> np.ndarray | None:
        """The constant an expression holds (a Constant, or what `_FOLDS` compute from constants)."""
        if not isinstance(expr, relax.Var):
            return _constant(expr)
        if expr not in self._const:
            bound = self.bound.get(expr)
            self._const[expr] = self._fold(bound) if isinstance(bound, relax.Call) else self.const(bound)
        return self._const[expr]

    def _fold(self, call: relax.Call) -> np.ndarray | None:
        """Evaluate a parameter-only computation with numpy (BN-and-pad fill values, transposed weights)."""
        fold = _FOLDS.get(_op_name(call))
        args = [] if fold is None else [self._fold_arg(a) for a in call.args]
        if fold is None or any(a is None for a in args):
            return None
        try:
            return np.asarray(fold(call, *args))
        except (ValueError, TypeError):
            return None

    def _fold_arg(self, arg):
        """A fold's argument: arrays for tensors, static shapes and tuples of integers as int lists."""
        if isinstance(arg, relax.ShapeExpr):
            dims = [_static(d) for d in arg.values]
            return None if None in dims else dims
        if isinstance(arg, relax.Tuple):
            ints = [_int_arg(f) for f in arg.fields]
            items = ints if None not in ints else [self.const(f) for f in arg.fields]
            return None if any(i is None for i in items) else items
        return self.const(arg) if _scalar(arg) is None else _scalar(arg)

    def _layout_of_constant(self, expr) -> bool:
        """A layout op over a Constant (or over such ops): folding it computes nothing."""
        call = self.bound.get(expr) if isinstance(expr, relax.Var) else None
        return _constant(expr) is not None or _op_name(call) in _LAYOUT and self._layout_of_constant(call.args[0])

    def _input(self, arg) -> relax.Var:
        if not isinstance(arg, relax.Var) or self.const(arg) is not None:
            raise Declined("input is a constant or not a variable")
        return arg

    def _need(self, arg, what: str) -> np.ndarray:
        if (value := self.const(arg)) is None:
            raise Declined(f"{what} is not a constant (bind parameters with relax.transform.BindParams)")
        return value

    def _channel_axis(self, var, axis) -> bool:
        rank, ndim = need_layout(self, var).rank, len(_dims(var))
        return int(axis) % ndim == ndim - 1 - rank

    # -- readers (the _READERS table): var, its bound expression -> a description, None, or Declined
    def _conv(self, var, call):
        a = call.attrs
        rank = 2 if call.op.name == "relax.nn.conv2d" else 1
        if (str(a.data_layout), str(a.kernel_layout)) != (("NCHW", "OIHW") if rank == 2 else ("NCW", "OIW")):
            raise Declined(f"layout {a.data_layout}/{a.kernel_layout}")
        if str(a.out_layout) not in ("", str(a.data_layout)):
            raise Declined(f"out_layout {a.out_layout}")
        x, w = self._input(call.args[0]), self._need(call.args[1], "conv weight")
        return Affine(x, affine.conv(w, None, _ints(a.strides), _pads(a, rank), _ints(a.dilation), int(a.groups)))

    def _conv_transpose(self, var, call):
        a, rank = call.attrs, _TRANSPOSED[call.op.name]
        data = ("NCW", "NCHW", "NCDHW")[rank - 1]
        if (str(a.data_layout), str(a.kernel_layout)) != (data, "IO" + data[2:]) or str(a.out_layout) not in ("", data):
            raise Declined(f"layout {a.data_layout}/{a.kernel_layout}/{a.out_layout}")
        x, w = self._input(call.args[0]), self._need(call.args[1], "conv weight")  # [I, O/g, *k]
        return Transposed(x, affine.conv_transpose(w, None, _ints(a.strides), _pads(a, rank), _ints(a.output_padding),
                                                   _ints(a.dilation), int(a.groups)))

    def _batch_norm(self, var, item: relax.TupleGetItem):
        tup = item.tuple_value
        if item.index != 0 or not isinstance(tup, relax.Var) or _op_name(self.bound.get(tup)) != "relax.nn.batch_norm":
            return None
        if len(self.users.get(tup, ())) != 1:
            raise Declined("BatchNorm's running statistics outputs are used")
        call, a = self.bound[tup], self.bound[tup].attrs
        if getattr(a, "training", False):
            raise Declined("BatchNorm in training mode uses batch statistics")
        x = self._input(call.args[0])
        if not self._channel_axis(x, a.axis):
            raise Declined("BatchNorm over a non-channel axis")
        gamma, beta, mean, variance = (self._need(arg, "BatchNorm parameters") for arg in call.args[1:5])
        self.attached[var] = [tup]
        return Affine(x, affine.batchnorm(mean, variance, gamma if a.scale else None, beta if a.center else None,
                                     float(a.epsilon), need_layout(self, x).rank))

    def _binary(self, var, call):
        kind = _ELEMENTWISE[call.op.name]
        a, b = call.args
        ca, cb = self.const(a), self.const(b)
        if ca is None and cb is None:
            if kind in ("add", "sub"):
                if not _same_shape(a, b):
                    raise Declined("operands of different or unknown shapes (broadcasting)")
                return Sum((a, b), (1.0, 1.0 if kind == "add" else -1.0))
            return self._scaled(var, a, b) if kind == "mul" else None
        if ca is not None and cb is not None:
            return None
        x, c, const_first = (self._input(a), cb, False) if cb is not None else (self._input(b), ca, True)
        channels, rank = need_layout(self, x)
        op = affine.elementwise(kind, affine.channel_vector(c, len(_dims(x)), channels, rank), const_first, rank)
        return None if op is None else Affine(x, op)

    def _scaled(self, var, a, b):
        """x * s with s a per-sample scalar [N, 1, ...] computed from data (a dynamic conv's attention)."""
        for x, s in ((a, b), (b, a)):
            xs, ss = _dims(x), _dims(s)
            if isinstance(x, relax.Var) and isinstance(s, relax.Var) and _same_shape(x, var) and self.layout(x) \
                    and len(ss or ()) == len(xs) and _dtype(s) == _dtype(x) and _same_dim(ss[0], xs[0]) \
                    and all(_static(d) == 1 for d in ss[1:]):  # x's shape is the product's: s broadcasts, x not
                return Scaled(x, s)
        return None

    # activations, for dead-channel planning: constants pass through them
    def _activation(self, var, call):
        return Pointwise(self._input(call.args[0]), ACTIVATIONS[_ACTIVATION[call.op.name]])

    def _clip(self, var, call):
        low, high = (_scalar(a) for a in call.args[1:3])
        if low is None or high is None:
            return None  # tensor bounds: not a fixed function of the channel constant
        return Pointwise(self._input(call.args[0]), clip(low, high))

    def _matmul(self, var, call):
        x, w = call.args[0], self.const(call.args[1])
        if w is None or w.ndim != 2:
            return None  # a product of two tensors (attention) is not affine
        x = self._input(x)
        if len(_dims(x) or ()) < 2:
            raise Declined("matmul input is not [..., C]")
        return Affine(x, affine.linear(w.T))  # x @ W == linear(x, W.T), over the last axis

    def _gather(self, var, call):
        """Constant-index rows along a spatial axis: TVM's torch frontend's reflect / replicate / circular padding."""
        x, rows = call.args[0], self.const(call.args[1])
        layout, dims = self.layout(x), _dims(x)
        if rows is None or rows.ndim != 1 or layout is None or self.const(x) is not None or call.attrs.axis is None:
            return None  # an embedding lookup (constant table, data indices) is not padding either
        axis = int(call.attrs.axis) % len(dims)
        n = dims[axis]
        if axis < len(dims) - layout.rank or not isinstance(n, int):
            return None
        b = next((b for b in range(len(rows) - n + 1) if np.array_equal(rows[b:b + n], np.arange(n))), None)
        if b is None or len(rows) == n:
            return None  # not the input's rows with some added before or after
        a = len(rows) - n - b
        for mode, (before, after) in {"reflect": (np.arange(b, 0, -1), np.arange(n - 2, n - 2 - a, -1)),
                                      "replicate": (np.zeros(b), np.full(a, n - 1)),
                                      "circular": (np.arange(n - b, n), np.arange(a))}.items():
            if np.array_equal(rows[:b], before) and np.array_equal(rows[b + n:], after):
                raise Declined(f"{mode} padding")
        return None

    def _avg_pool(self, var, call):
        a = call.attrs
        if str(a.layout) != "NCHW" or str(a.out_layout) not in ("", "NCHW"):
            raise Declined(f"layout {a.layout}")
        if any(d != 1 for d in _ints(a.dilation)):
            raise Declined("dilated average pool")
        x = self._input(call.args[0])
        pad = _ints(a.padding)
        return Affine(x, affine.avg_pool(need_layout(self, x).channels, 2, _ints(a.pool_size), _ints(a.strides),
                                    ((pad[0], pad[2]), (pad[1], pad[3])), count_include_pad=bool(a.count_include_pad),
                                    ceil_mode=bool(a.ceil_mode), input_size=_dims(x)[2:]))

    def _pad_geometry(self, call) -> tuple[relax.Var, affine.Pads, float]:
        a = call.attrs
        if str(a.pad_mode) != "constant":
            raise Declined(f"{a.pad_mode} padding")
        x = self._input(call.args[0])
        rank = need_layout(self, x).rank
        width = _ints(a.pad_width)  # before/after for every axis: [b0, a0, b1, a1, ...]
        if len(width) != 2 * (rank + 2) or any(width[:4]):
            raise Declined("padding touches batch or channel dims")
        if any(p < 0 for p in width):
            raise Declined("negative padding crops the input")
        if len(call.args) > 1:  # TVM 0.27 keeps the value in the attributes
            raise Declined("pad value given as a tensor")
        return x, tuple((width[2 * d], width[2 * d + 1]) for d in range(2, rank + 2)), float(a.pad_value)

    def _pad(self, var, call):
        if any(_op_name(self.bound.get(u)) == "relax.slice_scatter" for u in self.users.get(var, [])):
            return None  # the border writes that follow decide what this is
        x, pads, value = self._pad_geometry(call)
        return padded(x, need_layout(self, x).channels, pads, value)

    def _slice_scatter(self, var, call):
        """nn.pad followed by slice_scatters that write every border (DBB's BN-and-pad after torch.export)."""
        if self.single_consumer(var) and \
                any(_op_name(self.bound.get(u)) == "relax.slice_scatter" for u in self.users.get(var, [])):
            return None  # not the end of the chain
        chain, data = [(var, call)], call.args[0]
        while _op_name(self.bound.get(data)) == "relax.slice_scatter":
            if not self.single_consumer(data):
                raise Declined("intermediate border write is read elsewhere")
            chain.append((data, self.bound[data]))
            data = self.bound[data].args[0]
        if _op_name(self.bound.get(data)) != "relax.nn.pad" or not self.single_consumer(data):
            return None
        x, pads, _ = self._pad_geometry(self.bound[data])
        shape = _dims(data)
        if not all(isinstance(d, int) for d in shape or [None]):
            raise Declined("border writes on a tensor of dynamic size")
        filled = np.full(shape, np.nan)
        for _, write in reversed(chain):  # earliest first
            src = self.const(write.args[1])
            start, end, step = (_int_arg(a) for a in write.args[2:5])
            if src is None or None in (start, end, step):
                raise Declined("border write of a non-constant value or at a dynamic position")
            axis = int(write.attrs.axis) % len(shape)
            filled[(slice(None),) * axis + (slice(start, end, step),)] = src
        fill = border_fill(filled, pads)
        self.attached[var] = [data] + [v for v, _ in chain[1:]]
        return PadWith(x, pads, fill, precision(np.finfo(_dtype(data)).eps))

    def _concat(self, var, call):
        tup, layout = call.args[0], self.layout(var)
        if not isinstance(tup, relax.Tuple) or call.attrs.axis is None or layout is None \
                or not self._channel_axis(var, call.attrs.axis):
            return None
        items = tuple(tup.fields)
        parts = [self.layout(v) if isinstance(v, relax.Var) and self.const(v) is None else None for v in items]
        return Concat(items) if all(p is not None and p.rank == layout.rank for p in parts) else None


def _pads(attrs, rank: int) -> affine.Pads:
    """A conv's padding: every dim's begin, then every end (conv2d: top, left, bottom, right), or one per dim."""
    pad = _ints(attrs.padding)
    return pad if len(pad) == rank else tuple(zip(pad[:rank], pad[rank:]))


def _axes(call, ndim: int) -> tuple[int, ...]:
    """A permute_dims's permutation (None: reversed, as numpy)."""
    return tuple(range(ndim))[::-1] if call.attrs.axes is None else tuple(int(a) % ndim for a in call.attrs.axes)


def _keeps_last_dim(expr, var) -> bool:
    """A reshape of a tensor var that keeps its last dim (tokens [B, N, C] <-> [B*N, C])."""
    return _op_name(expr) == "relax.reshape" and keeps_channels_last(_dims(expr.args[0]), _dims(var))


def _strided_slice(e, a, axes, begin, end, strides=None):
    index = [slice(None)] * a.ndim
    for ax, b, en, st in zip(axes, begin, end, strides or [1] * len(axes)):
        if st <= 0:
            raise ValueError("negative strides: clamping rules differ from numpy's")
        index[ax] = slice(b, en, st)
    return a[tuple(index)]


def _take(e, a, idx):
    axis = None if e.attrs.axis is None else int(e.attrs.axis)
    if np.any(idx < 0) or np.any(idx >= (a.size if axis is None else a.shape[axis])):
        raise ValueError("index out of range: TVM's modes differ from numpy's")
    return np.take(a, idx, axis=axis)


def _pad_constant(e, a):
    width = _ints(e.attrs.pad_width)  # [b0, a0, b1, a1, ...]
    if str(e.attrs.pad_mode) != "constant" or any(p < 0 for p in width):
        raise ValueError("only non-negative constant padding folds")
    return np.pad(a, [(width[2 * d], width[2 * d + 1]) for d in range(a.ndim)],
                  constant_values=np.asarray(float(e.attrs.pad_value), a.dtype))


_FOLDS = {
    "relax.add": lambda e, a, b: a + b, "relax.subtract": lambda e, a, b: a - b,
    "relax.multiply": lambda e, a, b: a * b, "relax.divide": lambda e, a, b: a / b,
    "relax.sqrt": lambda e, a: np.sqrt(a), "relax.abs": lambda e, a: np.abs(a), "relax.negative": lambda e, a: -a,
    "relax.arange": lambda e, start, end, step: np.arange(start, end, step).astype(str(e.attrs.dtype)),
    "relax.reshape": lambda e, a, s: a.reshape(s), "relax.broadcast_to": lambda e, a, s: np.broadcast_to(a, s),
    "relax.permute_dims": lambda e, a: np.transpose(a, None if e.attrs.axes is None else _ints(e.attrs.axes)),
    "relax.astype": lambda e, a: a.astype(str(e.attrs.dtype)),
    "relax.strided_slice": _strided_slice,  # one-shot NAS weight slicing
    "relax.take": _take,
    "relax.concat": lambda e, items: np.concatenate(items, axis=int(e.attrs.axis)),
    "relax.expand_dims": lambda e, a: np.expand_dims(a, tuple(_ints(e.attrs.axis))),
    "relax.squeeze": lambda e, a: np.squeeze(a, None if e.attrs.axis is None else tuple(_ints(e.attrs.axis))),
    # weights built from smaller ones (OREPA: einsum products, a 1x1 kernel padded to 3x3)
    "relax.matmul": lambda e, a, b: np.matmul(a, b),
    "relax.nn.pad": _pad_constant,
}

# reshaping ops that the frontends put on parameters (a bias viewed as [1, C, 1, 1], a transposed weight)
_LAYOUT = ("relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.squeeze", "relax.broadcast_to",
           "relax.astype")

# elementwise activations, by the name patterns.channels.ACTIVATIONS knows them
_ACTIVATION = {"relax.nn.relu": "relu", "relax.sigmoid": "sigmoid", "relax.tanh": "tanh", "relax.nn.silu": "silu"}
_ELEMENTWISE = {"relax.add": "add", "relax.subtract": "sub", "relax.multiply": "mul", "relax.divide": "div"}
_TRANSPOSED = {"relax.nn.conv1d_transpose": 1, "relax.nn.conv2d_transpose": 2, "relax.nn.conv3d_transpose": 3}
_WEIGHTED = ("relax.nn.conv2d", "relax.nn.conv1d", "relax.matmul", *_TRANSPOSED)  # the writer adds their bias
_CHANNELS_FIRST = ("relax.nn.conv2d", "relax.nn.conv1d", "relax.nn.batch_norm", "relax.nn.avg_pool2d",
                   "relax.nn.pad", "relax.slice_scatter", *_TRANSPOSED)

_READERS = {
    "relax.nn.conv2d": RelaxView._conv, "relax.nn.conv1d": RelaxView._conv, "relax.matmul": RelaxView._matmul,
    "relax.take": RelaxView._gather, "relax.nn.avg_pool2d": RelaxView._avg_pool, "relax.nn.pad": RelaxView._pad,
    "relax.concat": RelaxView._concat, "relax.slice_scatter": RelaxView._slice_scatter, "relax.clip": RelaxView._clip,
    "relax.reshape": RelaxView._regroup, "relax.permute_dims": RelaxView._permute,
    **dict.fromkeys(_TRANSPOSED, RelaxView._conv_transpose),
    **{name: RelaxView._binary for name in _ELEMENTWISE}, **{name: RelaxView._activation for name in _ACTIVATION},
}
