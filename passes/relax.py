"""TVM Relax adapter: read dataflow bindings into the algebra, emit R.nn.conv2d + R.add back.

Constants are `relax.Constant`s (module constants, or parameters bound with
`relax.transform.BindParams`) and permute_dims / reshape / astype of them.
Unbound function parameters are not constants, so ops reading them are left
alone.  Only dataflow blocks are rewritten; a var that leaves its block is a
region boundary.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..patterns import affine as A
from ..patterns.affine import Declined
from ..patterns.borders import border_fill
from ..patterns.channels import ACTIVATIONS, clip
from ..patterns.planner import Affine, Concat, PadWith, Plan, Pointwise, Scaled, Sum, padded, plan, precision

__all__ = ["RelaxView", "fuse_function"]


def _op_name(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def _constant(expr) -> np.ndarray | None:
    """The array of a Relax constant node (tvm.ir.expr.Constant since TVM 0.27), else None."""
    if isinstance(expr, tvm.ir.expr.Constant) and hasattr(expr.value, "numpy"):
        return expr.value.numpy()
    return None


def _type(var):
    """A var's tensor type: `ty` since TVM 0.27 (`struct_info` before)."""
    return getattr(var, "ty", None) or getattr(var, "struct_info", None)


def _static(dim) -> int | None:
    """A shape entry as int, or None when it is symbolic (IntImm moved modules across TVM versions)."""
    return int(dim) if type(dim).__name__ == "IntImm" else None


def _prim(arg) -> int | None:
    """An integer argument, given as an IntImm or a PrimValue wrapping one."""
    if type(arg).__name__ == "IntImm":
        return int(arg)
    value = getattr(arg, "value", None)
    return _static(value) if value is not None else None


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _scalar(arg) -> float | None:
    """A scalar argument (IntImm, FloatImm, or a PrimValue wrapping one) as float, else None."""
    if type(arg).__name__ in ("IntImm", "FloatImm"):
        return float(arg.value)
    value = getattr(arg, "value", None)
    return _scalar(value) if value is not None and not isinstance(value, (int, float)) else None


def _same_dim(a, b) -> bool:
    """Two shape entries that are provably equal (equal ints, or symbolic expressions equal for every value)."""
    sa, sb = _static(a), _static(b)
    if sa is not None or sb is not None:
        return sa == sb
    if a.same_as(b):
        return True
    analyzer = getattr(getattr(tvm, "sym", None), "Analyzer", None) or getattr(getattr(tvm, "arith", None),
                                                                            "Analyzer", None)
    try:  # tvm.sym since TVM 0.27 (tvm.arith before)
        return analyzer is not None and bool(analyzer().can_prove_equal(a, b))
    except Exception:  # noqa: BLE001 - unprovable is "not the same"
        return False


def _same_shape(a, b) -> bool:
    """Two vars' tensor types with provably equal shapes and equal dtypes."""
    ta, tb = _type(a), _type(b)
    if not all(isinstance(t, relax.TensorType) and hasattr(getattr(t, "shape", None), "values") for t in (ta, tb)):
        return False
    da, db = list(ta.shape.values), list(tb.shape.values)
    return str(ta.dtype) == str(tb.dtype) and len(da) == len(db) and all(map(_same_dim, da, db))


class RelaxView:
    """The planner's view of one Relax function; keys are binding vars."""

    def __init__(self, func: relax.Function):
        self.func = func
        self.bound: dict[relax.Var, relax.Expr] = {}
        self._values: list[relax.Var] = []
        self._uses: dict[relax.Var, int] = {}
        self._const: dict[relax.Var, np.ndarray | None] = {}
        self._users: dict[relax.Var, list[relax.Var]] = {}
        self._var_by_value: dict = {}
        self.attached: dict[relax.Var, list[relax.Var]] = {}  # var -> bindings dropped with it
        self._hidden: set[relax.Var] = set()  # vars read somewhere other than as a direct argument
        for block in func.body.blocks:
            for binding in block.bindings:
                if not isinstance(binding, relax.VarBinding):
                    for v in relax.analysis.free_vars(binding.value):  # match_cast and friends
                        self._hidden.add(v)
                        self._uses[v] = self._uses.get(v, 0) + 1
                    continue
                self.bound[binding.var] = binding.value
                self._var_by_value[binding.value] = binding.var
                if isinstance(block, relax.DataflowBlock):
                    self._values.append(binding.var)
                direct = _direct_args(binding.value)
                for v in relax.analysis.free_vars(binding.value):
                    self._uses[v] = self._uses.get(v, 0) + 1
                    self._users.setdefault(v, []).append(binding.var)
                    if not any(v.same_as(d) for d in direct):
                        self._hidden.add(v)
        for v in relax.analysis.free_vars(func.body.body):
            self._uses[v] = self._uses.get(v, 0) + 1
            self._hidden.add(v)

    # -- GraphView protocol
    def values(self):
        return self._values

    def single_consumer(self, var: relax.Var) -> bool:
        return isinstance(var, relax.DataflowVar) and self._uses.get(var, 0) == 1

    def readers(self, var: relax.Var):
        """The bindings reading `var` as a direct argument (keyed by their vars), or None when it leaves
        its dataflow block (function output) or is read inside a nested expression we cannot see."""
        if not isinstance(var, relax.DataflowVar) or var in self._hidden:
            return None
        return list(dict.fromkeys(self._users.get(var, [])))

    def channels_and_rank(self, var):
        shape, dtype = self._shape(var)
        if shape is None or len(shape) < 2 or shape[1] is None or not dtype.startswith(("float", "bfloat")):
            return None
        return shape[1], len(shape) - 2

    def describe(self, var: relax.Var):
        expr = self.bound.get(var)
        if expr is None or self.const(var) is not None:  # a function parameter, or a constant
            return None
        if isinstance(expr, relax.TupleGetItem):
            return self._tuple_get_item(expr)
        name = _op_name(expr)
        read = _READERS.get(name)
        return None if read is None else read(self, expr)

    # -- helpers
    @staticmethod
    def _shape(var) -> tuple[list | None, str]:
        ty = _type(var)
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            return None, ""
        dims = getattr(ty.shape, "values", None)
        if dims is None:
            return None, str(ty.dtype)
        return [_static(d) for d in dims], str(ty.dtype)

    def const(self, expr) -> np.ndarray | None:
        """The constant an expression holds (Constant, or permute_dims/reshape/astype of one)."""
        if not isinstance(expr, relax.Var):
            return _constant(expr)
        if expr in self._const:
            return self._const[expr]
        value = None
        bound = self.bound.get(expr)
        if bound is not None:
            value = self._fold(bound)
        self._const[expr] = value
        return value

    def _fold(self, expr) -> np.ndarray | None:
        """Evaluate a parameter-only computation with numpy (BN-and-pad fill values, transposed weights)."""
        if not isinstance(expr, relax.Call):
            return self.const(expr)
        name = _op_name(expr)
        fold = _FOLDS.get(name)
        if fold is None:
            return None
        args = [self._fold_arg(a) for a in expr.args]
        if any(a is None for a in args):
            return None
        try:
            return np.asarray(fold(expr, *args))
        except (ValueError, TypeError):
            return None

    def _fold_arg(self, arg):
        """A fold's argument: arrays for tensors, ShapeExpr as is, tuples of integers as int lists."""
        if isinstance(arg, relax.ShapeExpr):
            return arg
        if isinstance(arg, relax.Tuple):
            ints = [_prim(f) for f in arg.fields]
            if all(i is not None for i in ints):
                return ints
            items = [self.const(f) for f in arg.fields]
            return None if any(i is None for i in items) else items
        return self.const(arg)

    def _input(self, arg) -> relax.Var:
        if not isinstance(arg, relax.Var) or self.const(arg) is not None:
            raise Declined("input is a constant or not a variable")
        return arg

    def _need(self, arg, what: str) -> np.ndarray:
        value = self.const(arg)
        if value is None:
            raise Declined(f"{what} is not a constant (bind parameters with relax.transform.BindParams)")
        return value

    def _cr(self, var):
        cr = self.channels_and_rank(var)
        if cr is None:
            raise Declined("input shape or channel count unknown")
        return cr

    # -- readers
    def _conv(self, call):
        a = call.attrs
        rank = 2 if call.op.name == "relax.nn.conv2d" else 1
        if str(a.data_layout) != ("NCHW" if rank == 2 else "NCW") or str(a.kernel_layout) != ("OIHW" if rank == 2
                                                                                               else "OIW"):
            raise Declined(f"layout {a.data_layout}/{a.kernel_layout}")
        if str(a.out_layout) not in ("", str(a.data_layout)):
            raise Declined(f"out_layout {a.out_layout}")
        x = self._input(call.args[0])
        w = self._need(call.args[1], "conv weight")
        pad = _ints(a.padding)  # conv2d: top, left, bottom, right; conv1d: left, right
        if len(pad) == rank:
            pad = pad + pad
        pads = tuple((pad[d], pad[d + rank]) for d in range(rank))
        return Affine(x, A.conv(w, None, _ints(a.strides), pads, _ints(a.dilation), int(a.groups)))

    def _tuple_get_item(self, expr: relax.TupleGetItem):
        tup = expr.tuple_value
        if expr.index != 0 or not isinstance(tup, relax.Var) or _op_name(self.bound.get(tup)) != "relax.nn.batch_norm":
            return None
        if self._uses.get(tup, 0) != 1:
            raise Declined("BatchNorm's running statistics outputs are used")
        call = self.bound[tup]
        a = call.attrs
        if bool(getattr(a, "training", False)):
            raise Declined("BatchNorm in training mode uses batch statistics")
        x = self._input(call.args[0])
        c, rank = self._cr(x)
        if int(a.axis) not in (1, 1 - (rank + 2)):
            raise Declined("BatchNorm over a non-channel axis")
        gamma, beta, mean, var = (self._need(arg, "BatchNorm parameters") for arg in call.args[1:5])
        return Affine(x, A.batchnorm(mean, var, gamma if a.scale else None, beta if a.center else None,
                                     float(a.epsilon), rank))

    def _binary(self, call):
        kind = _ELEMENTWISE[call.op.name]
        a, b = call.args
        ca, cb = self.const(a), self.const(b)
        if ca is None and cb is None:
            if kind in ("add", "sub"):
                if not _same_shape(a, b):
                    raise Declined("operands of different or unknown shapes (broadcasting)")
                return Sum((a, b), (1.0, 1.0 if kind == "add" else -1.0))
            return self._scaled(call, a, b) if kind == "mul" else None
        if ca is not None and cb is not None:
            return None
        x, c, const_first = (a, cb, False) if cb is not None else (b, ca, True)
        x = self._input(x)
        channels, rank = self._cr(x)
        op = A.elementwise(kind, A.channel_vector(c, rank + 2, channels), const_first, rank)
        return None if op is None else Affine(x, op)

    def _scaled(self, call, a, b):
        """x * s with s a per-sample scalar [N, 1, ...] computed from data (a dynamic conv's attention)."""
        if not isinstance(a, relax.Var) or not isinstance(b, relax.Var):
            return None
        out = _type(self._var_of(call))
        for x, s in ((a, b), (b, a)):
            tx, ts = _type(x), _type(s)
            if not all(isinstance(t, relax.TensorType) and t.shape is not None and hasattr(t.shape, "values")
                       for t in (tx, ts, out)):
                continue
            xs, ss, os_ = list(tx.shape.values), list(ts.shape.values), list(out.shape.values)
            if len(xs) != len(ss) or len(xs) < 2 or len(os_) != len(xs) or str(tx.dtype) != str(ts.dtype):
                continue
            if not all(_same_dim(p, q) for p, q in zip(xs, os_)):
                continue  # s must not broadcast x
            if _same_dim(ss[0], xs[0]) and all(_static(d) == 1 for d in ss[1:]) and self.channels_and_rank(x):
                return Scaled(x, s)
        return None

    # -- activations (for dead-channel planning: constants pass through them)
    def _activation(self, call):
        return Pointwise(self._input(call.args[0]), ACTIVATIONS[_ACTIVATION[call.op.name]])

    def _clip(self, call):
        low, high = (_scalar(a) for a in call.args[1:3])
        if low is None or high is None:
            return None  # tensor bounds: not a fixed function of the channel constant
        return Pointwise(self._input(call.args[0]), clip(low, high))

    def _matmul(self, call):
        x, w = call.args
        w = self.const(w)
        if w is None or w.ndim != 2:
            return None
        x = self._input(x)
        shape, _ = self._shape(x)
        if shape is None or len(shape) != 2:
            raise Declined("matmul input is not [N, C]")
        return Affine(x, A.linear(w.T))  # x @ W == linear(x, W.T)

    def _avg_pool(self, call):
        a = call.attrs
        if str(a.layout) != "NCHW" or str(a.out_layout) not in ("", "NCHW"):
            raise Declined(f"layout {a.layout}")
        if any(d != 1 for d in _ints(a.dilation)):
            raise Declined("dilated average pool")
        x = self._input(call.args[0])
        c, rank = self._cr(x)
        pad = _ints(a.padding)
        pads = ((pad[0], pad[2]), (pad[1], pad[3]))
        shape, _ = self._shape(x)
        return Affine(x, A.avg_pool(c, 2, _ints(a.pool_size), _ints(a.strides), pads,
                                    count_include_pad=bool(a.count_include_pad), ceil_mode=bool(a.ceil_mode),
                                    input_size=shape[2:]))

    def _pad_geometry(self, call) -> tuple[relax.Var, A.Pads, float]:
        a = call.attrs
        if str(a.pad_mode) != "constant":
            raise Declined(f"{a.pad_mode} padding")
        x = self._input(call.args[0])
        _, rank = self._cr(x)
        width = _ints(a.pad_width)  # before/after for every axis: [b0, a0, b1, a1, ...]
        if len(width) != 2 * (rank + 2) or any(width[:4]):
            raise Declined("padding touches batch or channel dims")
        if any(p < 0 for p in width):
            raise Declined("negative padding crops the input")
        pads = tuple((width[2 * d], width[2 * d + 1]) for d in range(2, rank + 2))
        value = 0.0
        if len(call.args) > 1:
            pv = self.const(call.args[1])
            if pv is None:
                raise Declined("pad value is not a constant")
            value = float(pv.reshape(()))
        elif hasattr(a, "pad_value"):
            value = float(a.pad_value)
        return x, pads, value

    def _pad(self, call):
        if any(_op_name(self.bound.get(u)) == "relax.slice_scatter" for u in self._users.get(self._var_of(call), [])):
            return None  # the border writes that follow decide what this is
        x, pads, value = self._pad_geometry(call)
        return padded(x, self._cr(x)[0], pads, value)

    def _slice_scatter(self, call):
        """nn.pad followed by slice_scatters that write every border (DBB's BN-and-pad after torch.export)."""
        var = self._var_of(call)
        users = [u for u in self._users.get(var, []) if _op_name(self.bound.get(u)) == "relax.slice_scatter"]
        if users and self.single_consumer(var):
            return None  # not the end of the chain
        chain = [call]
        data = call.args[0]
        while _op_name(self.bound.get(data)) == "relax.slice_scatter":
            if not self.single_consumer(data):
                raise Declined("intermediate border write is read elsewhere")
            chain.append(self.bound[data])
            data = self.bound[data].args[0]
        pad = self.bound.get(data)
        if _op_name(pad) != "relax.nn.pad" or not self.single_consumer(data):
            return None
        x, pads, _ = self._pad_geometry(pad)
        shape, dtype = self._shape(data)
        if shape is None or None in shape:
            raise Declined("border writes on a tensor of dynamic size")
        filled = np.full(shape, np.nan)
        for write in reversed(chain):  # earliest first
            src = self.const(write.args[1])
            start, end, step = (_prim(a) for a in write.args[2:5])
            if src is None or None in (start, end, step):
                raise Declined("border write of a non-constant value or at a dynamic position")
            index = [slice(None)] * len(shape)
            index[int(write.attrs.axis) % len(shape)] = slice(start, end, step)
            filled[tuple(index)] = src
        fill = border_fill(filled, pads)
        self.attached[var] = [data] + [self._var_of(w) for w in chain[1:]]
        return PadWith(x, pads, fill, precision(np.finfo(dtype).eps))

    def _var_of(self, expr) -> relax.Var:
        return self._var_by_value[expr]

    def _concat(self, call):
        if int(call.attrs.axis) != 1:
            return None
        tup = call.args[0]
        if not isinstance(tup, relax.Tuple):
            return None
        items = list(tup.fields)
        if not all(isinstance(v, relax.Var) and self.const(v) is None for v in items):
            return None
        return Concat(tuple(items))


def _shape_of(shape_expr) -> list[int]:
    dims = [_static(d) for d in shape_expr.values]
    if None in dims:
        raise ValueError("symbolic shape")
    return dims


def _strided_slice(e, a, axes, begin, end, strides=None):
    strides = strides or [1] * len(axes)
    if any(st <= 0 for st in strides):
        raise ValueError("negative strides: clamping rules differ from numpy's")
    index = [slice(None)] * a.ndim
    for ax, b, en, st in zip(axes, begin, end, strides):
        index[ax] = slice(b, en, st)
    return a[tuple(index)]


def _take(e, a, idx):
    axis = e.attrs.axis
    n = a.size if axis is None else a.shape[int(axis)]
    if np.any(idx < 0) or np.any(idx >= n):
        raise ValueError("index out of range: TVM's modes differ from numpy's")
    return np.take(a, idx, axis=None if axis is None else int(axis))


_FOLDS = {
    "relax.add": lambda e, a, b: a + b,
    "relax.subtract": lambda e, a, b: a - b,
    "relax.multiply": lambda e, a, b: a * b,
    "relax.divide": lambda e, a, b: a / b,
    "relax.sqrt": lambda e, a: np.sqrt(a),
    "relax.negative": lambda e, a: -a,
    "relax.reshape": lambda e, a, s: a.reshape(_shape_of(s)),
    "relax.broadcast_to": lambda e, a, s: np.broadcast_to(a, _shape_of(s)),
    "relax.permute_dims": lambda e, a: np.transpose(a, None if e.attrs.axes is None else _ints(e.attrs.axes)),
    "relax.astype": lambda e, a: a.astype(str(e.attrs.dtype)),
    "relax.strided_slice": _strided_slice,  # one-shot NAS weight slicing
    "relax.take": _take,
    "relax.concat": lambda e, items: np.concatenate(items, axis=int(e.attrs.axis)),
    "relax.expand_dims": lambda e, a: np.expand_dims(a, tuple(_ints(e.attrs.axis))),
    "relax.squeeze": lambda e, a: np.squeeze(a, None if e.attrs.axis is None else tuple(_ints(e.attrs.axis))),
}

# elementwise activations, by the name patterns.channels.ACTIVATIONS knows them
_ACTIVATION = {"relax.nn.relu": "relu", "relax.sigmoid": "sigmoid", "relax.tanh": "tanh", "relax.nn.silu": "silu"}

_ELEMENTWISE = {"relax.add": "add", "relax.subtract": "sub", "relax.multiply": "mul", "relax.divide": "div"}

_READERS = {
    "relax.nn.conv2d": RelaxView._conv,
    "relax.nn.conv1d": RelaxView._conv,
    "relax.add": RelaxView._binary,
    "relax.subtract": RelaxView._binary,
    "relax.multiply": RelaxView._binary,
    "relax.divide": RelaxView._binary,
    "relax.matmul": RelaxView._matmul,
    "relax.nn.avg_pool2d": RelaxView._avg_pool,
    "relax.nn.pad": RelaxView._pad,
    "relax.concat": RelaxView._concat,
    "relax.slice_scatter": RelaxView._slice_scatter,
    "relax.clip": RelaxView._clip,
    **{name: RelaxView._activation for name in _ACTIVATION},
}


def _direct_args(expr) -> list:
    """The expressions a binding reads directly: a call's arguments (and the items of a tuple argument),
    a tuple's fields, a tuple item's tuple."""
    if isinstance(expr, relax.Call):
        out = []
        for a in expr.args:
            out.extend(a.fields if isinstance(a, relax.Tuple) else [a])
        return out
    if isinstance(expr, relax.Tuple):
        return list(expr.fields)
    if isinstance(expr, relax.TupleGetItem):
        return [expr.tuple_value]
    return [expr]


# ---------------------------------------------------------------- rewriting

def affine_expr(emit, op: A.AffineConv, source: relax.Expr, dtype: str) -> relax.Expr:
    """An AffineConv as Relax, its last call left for the caller to bind (`emit` binds the others):
    conv2d / conv1d + bias add; a per-channel op as multiply / add by [1, C, 1, ...] constants (a rewrite
    never adds a conv the graph did not have); a rank-0 op as its `affine.linear_steps` (matmul has no
    groups: matmul with W.T + bias, or multiply / add)."""
    def const(a):
        return relax.const(np.ascontiguousarray(a.astype(dtype)), dtype)

    pc = op.per_channel()
    if op.rank == 0 or pc is not None:
        steps = A.linear_steps(op) if op.rank == 0 else A.per_channel_steps(op)
        if steps[0][0] == "linear":  # [N, I] @ [I, O] + b
            steps = [("matmul", steps[0][1].T)] + ([("add", op.bias)] if np.any(op.bias) else [])
        make = {"matmul": relax.op.matmul, "mul": relax.op.multiply, "add": relax.op.add}
        expr = source
        for i, (kind, value) in enumerate(steps):
            value = value if kind == "matmul" else value.reshape((1, -1) + (1,) * op.rank)  # [1, C, 1, ...]
            expr = make[kind](emit(expr) if i else expr, const(value))
        return expr
    pads = [p[0] for p in op.pads] + [p[1] for p in op.pads]
    if op.rank not in (1, 2):
        raise Declined("only 1-D and 2-D convolutions are emitted for Relax")
    conv = relax.op.nn.conv2d if op.rank == 2 else relax.op.nn.conv1d
    body = conv(source, const(op.weight), strides=list(op.stride), padding=pads, dilation=list(op.dilation),
                groups=op.groups)
    if not np.any(op.bias):
        return body
    return relax.op.add(emit(body), const(op.bias.reshape((1, -1) + (1,) * op.rank)))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    """Emit the fused op at each region root; drop the region's other bindings."""

    def __init__(self, mod, roots: dict, dropped: set):
        super().__init__(mod)
        self.roots = roots  # root var -> Region
        self.dropped = dropped  # vars of bindings that disappear
        self.failed: str | None = None  # a Declined from the writer (raised here it would cross TVM's FFI)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var = binding.var
        if var in self.dropped:
            return
        region = self.roots.get(var)
        if region is None:
            super().visit_var_binding_(binding)
            return
        source = self.visit_expr(region.source)
        try:
            expr = affine_expr(self.builder_.emit, region.op, source, str(_type(var).dtype))
        except Declined as e:
            self.failed = self.failed or str(e)
            super().visit_var_binding_(binding)
            return
        if isinstance(var, relax.DataflowVar):
            new = self.builder_.emit(expr)
        else:
            new = self.builder_.emit_output(expr)
        self.set_var_remap(var, new)


def _already_canonical(view: RelaxView, region) -> bool:
    """op + constant add is what we would emit (op: conv/matmul, or a per-channel multiply as dead_channels
    emits one): rewriting it changes nothing.  An add of two tensors (a residual) is not that."""
    if len(region.nodes) != 2:
        return False
    first, second = (view.bound[v] for v in region.nodes)
    if _op_name(second) != "relax.add" or not any(a.same_as(region.nodes[0]) for a in second.args) or \
            all(view.const(a) is None for a in second.args):
        return False
    return _op_name(first) in ("relax.multiply", "relax.nn.conv2d", "relax.nn.conv1d", "relax.matmul")


def fuse_function(mod: tvm.IRModule, func: relax.Function) -> tuple[relax.Function, Plan]:
    """Fuse every affine region of one Relax function; returns the new function and the plan."""
    original = func
    func = relax.analysis.remove_all_unused(func)  # dead reads would count as consumers
    view = RelaxView(func)
    relax_plan = plan(view)
    regions = [r for r in relax_plan.regions if r.op.rank in (0, 1, 2) and not _already_canonical(view, r)]
    if not regions:
        return original, relax_plan
    relax_plan.regions = regions
    roots = {r.root: r for r in regions}
    dropped = {v for r in regions for v in r.nodes[:-1]}
    dropped |= {a for r in regions for v in r.nodes for a in view.attached.get(v, ())}
    for r in regions:  # batch_norm tuples whose item 0 went into a region
        for v in r.nodes:
            item = view.bound.get(v)
            if isinstance(item, relax.TupleGetItem) and isinstance(item.tuple_value, relax.Var):
                dropped.add(item.tuple_value)
    rewriter = _Rewriter(mod, roots, dropped)
    new_func = rewriter.visit_expr(func)
    if rewriter.failed:
        raise Declined(rewriter.failed)
    new_func = relax.analysis.remove_all_unused(new_func)
    return new_func, relax_plan
