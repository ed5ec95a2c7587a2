"""PyTorch FX reader: FX nodes described to the algebra.

Every node is first read in one vocabulary (`passes.fx_dialects.normalize`: module calls,
functional calls and aten ops alike), so each reader in `READERS` is written once; a new op
is one entry in a table.
"""

from __future__ import annotations

import operator
import re
import weakref
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import fx

from ..patterns import affine
from ..patterns.affine import Declined
from ..patterns.borders import border_fill_of_writes
from ..patterns.channels import ACTIVATIONS, clip
from ..patterns.planner import (Affine, Concat, Layout, Permute, Pointwise, Regroup, Scaled, Sum, Transposed,
                                need_layout, padded, precision, read_once, splits_channels)
from .fx_dialects import ACTIVATION_MODULES, CONV_MODULES, IN_PLACE, SHAPE_OF_OTHER, Call, normalize
from ..patterns.report import GraphStats

aten = torch.ops.aten

__all__ = ["FxView", "Call", "normalize", "graph_stats", "op_kind", "node_shape"]

# Ops whose result is never a constant we may evaluate at plan time.
_IMPURE_NAMES = {"setitem", "delitem", "rand", "randn", "randint", "rand_like", "randn_like",
                 "randint_like", "dropout", "bernoulli", "normal", "uniform", "multinomial",
                 "empty", "empty_like"}
SHAPE_META = ("val", "example_value", "tensor_meta")  # the node meta keys that carry shape and dtype


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def is_pure(node: fx.Node) -> bool:
    name = _name(node.target).split(".")[0]
    return not (name in _IMPURE_NAMES or (name.endswith("_") and not name.endswith("__")))


def node_meta_tensor(node) -> Any:
    """The (often fake) tensor or tensor_meta recorded on a node by dynamo, export or ShapeProp."""
    if not isinstance(node, fx.Node):
        return None
    for key in SHAPE_META:
        v = node.meta.get(key)
        if isinstance(v, torch.Tensor) or (key == "tensor_meta" and v is not None and hasattr(v, "shape")):
            return v
    return None


def node_shape(node) -> tuple | None:
    t = node_meta_tensor(node)
    return None if t is None else tuple(t.shape)


def node_dtype(node) -> torch.dtype | None:
    return getattr(node_meta_tensor(node), "dtype", None)


# ---------------------------------------------------------------- the view

class FxView:
    """The rules' view of an FX graph.

    `constants` maps placeholder nodes to the tensors they hold (dynamo's parameters);
    get_attr nodes and module parameters are constants unless they require grad while grad
    is enabled.  Constant-only computations (weight slicing, masks, detach/view of
    parameters) are evaluated here, once per node.
    """

    asymmetric_padding = False  # torch's convs pad both ends alike: the writer adds an F.pad

    def __init__(self, gm: fx.GraphModule, constants: dict[fx.Node, torch.Tensor] | None = None):
        self.gm = gm
        self.graph = gm.graph
        self.constants = constants or {}
        self._const: dict[fx.Node, Any] = {}
        self.pad_fills: dict[fx.Node, list[fx.Node]] = {}  # padded node -> its border writes
        self.fill_precision: dict[fx.Node, float] = {}
        self._values = [n for n in self.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
        self._outputs: set[fx.Node] = set()
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        self._calls: dict[fx.Node, Call | Declined | None] = {}
        for n in self.graph.nodes:
            if n.op == "output":
                fx.node.map_arg(n.args, self._outputs.add)
            else:
                self._const[n] = self._constant_value(n)
        self.channels_last = self._token_values()

    # -- GraphView
    def values(self):
        return self._values

    def single_consumer(self, node: fx.Node) -> bool:
        readers = self.readers(node)
        return readers is not None and len(readers) == 1

    def readers(self, node: fx.Node):
        if node in self._outputs:
            return None
        fills = self.pad_fills.get(node, ())
        # `y.reshape_as(node)` reads only node's shape; the writer keeps node while anything still reads it
        return [u for u in node.users if u not in fills
                and not (u.op != "call_module" and u.target in SHAPE_OF_OTHER and u.args[0] is not node)]

    def layout(self, node: fx.Node) -> Layout | None:
        shape = node_shape(node)
        dtype = node_dtype(node)
        if shape is None or len(shape) < 2 or (dtype is not None and not dtype.is_floating_point):
            return None
        last = node in self.channels_last or len(shape) == 2
        channels = static_size(shape[-1] if last else shape[1])
        return None if channels is None else Layout(channels, 0 if last else len(shape) - 2)

    def foldable(self, node: fx.Node) -> bool:
        return node.op in ("call_function", "call_method") and isinstance(self._const.get(node), torch.Tensor)

    def label(self, node) -> str:
        """The node as users know it: its module's path when the node's own name does not say it
        (export names an add in stages.1.0 `add_3`: "stages.1.0/add_3")."""
        path = module_path(node)
        flat = re.sub(r"[^0-9A-Za-z]+", "_", path or "").strip("_")
        return node.name if not path or node.name.lstrip("_").startswith(flat) else f"{path}/{node.name}"

    def kind(self, node) -> str:
        return op_kind(node, self.gm)

    def call(self, node: fx.Node) -> Call | None:
        """The node in the common vocabulary (read once); raises Declined for a module that cannot be read."""
        return read_once(self._calls, node, lambda n: normalize(n, self.gm))

    def describe(self, node: fx.Node):
        if self.const(node) is not None:
            return None  # parameter-only computation, folded where it is read
        if not isinstance(node.meta.get("val", node.meta.get("example_value")), (torch.Tensor, type(None))):
            return None  # size arithmetic (SymInt), not a tensor
        call = self.call(node)
        read = READERS.get(call.op) if call is not None else None
        if read is None:
            return None
        if node.op != "call_module" and node.target in IN_PLACE:
            self._check_private_write(call["input"])
        try:
            return read(self, node, call)
        except (TypeError, ValueError) as e:  # a scalar or size known only at run time (symbolic)
            raise Declined(f"an argument is not a constant ({e})") from None

    def _check_private_write(self, target) -> None:
        """An in-place op reads like its pure form when no one else can see the write: its target is a
        fresh tensor (not a view, input or parameter) that only this op reads."""
        if not isinstance(target, fx.Node) or len(target.users) != 1:
            raise Declined("in-place op on a tensor that is read elsewhere")
        call = self.call(target) if target.op in ("call_function", "call_method", "call_module") else None
        if call is None or call.op not in _FRESH_RESULTS or call["inplace"]:
            raise Declined("in-place op on a view, input or parameter (the write may be seen elsewhere)")
        if target.op != "call_module" and target.target in IN_PLACE:  # a chain of in-place writes
            self._check_private_write(call["input"])

    # -- constants
    def const(self, arg):
        """The tensor (or Python number) an argument holds at plan time, else None."""
        if isinstance(arg, torch.Tensor) or (isinstance(arg, (int, float)) and not isinstance(arg, bool)):
            return arg
        return self._const.get(arg) if isinstance(arg, fx.Node) else None

    def need(self, arg, what: str):
        v = self.const(arg)
        if v is None and arg is not None:
            raise Declined(f"{what} is not a constant")
        return v

    def _constant_value(self, node: fx.Node):
        """Evaluated once per node, in topological order, so inputs are already known."""
        value = None
        if node.op == "placeholder":
            value = self.constants.get(node)
        elif node.op == "get_attr":
            value = _fetch_attr(self.gm, node.target)
            if isinstance(value, torch.Tensor) and value.requires_grad and torch.is_grad_enabled():
                value = None
        elif node.op in ("call_function", "call_method") and is_pure(node) and node.all_input_nodes:
            if all(self._const.get(n) is not None for n in node.all_input_nodes):
                value = self._evaluate(node)
        if isinstance(value, torch.Tensor):
            return _detached(value)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def _evaluate(self, node: fx.Node):
        args = fx.node.map_arg(node.args, self._const.get)
        kwargs = fx.node.map_arg(node.kwargs, self._const.get)
        try:
            with torch.no_grad():
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                return node.target(*args, **kwargs)
        except Exception:  # not evaluable on these values: treat as non-constant
            return None

    def input(self, arg) -> fx.Node:
        if not isinstance(arg, fx.Node) or self.const(arg) is not None:
            raise Declined("input is a constant")
        return arg

    def _token_values(self) -> set[fx.Node]:
        """Values read channels-last: what a linear reads or writes over the last dim of an N-D tensor
        ([B, N, C] tokens), reshapes of those that keep the last dim, and transposes that keep it last or move
        a channels-first value's channels there (a BatchNorm1d's [B, C, N] back to [B, N, C])."""
        out = set()
        for node in self._values:
            try:
                call = self.call(node)
            except Declined:
                continue
            op, x = (call.op, call["input"]) if call is not None else (None, None)
            shape = node_shape(x)
            if op in ("linear", "matmul", "addmm") and shape is not None and len(shape) > 2:
                out.update((x, node))
            elif op == "regroup" and (x in out or (shape is not None and len(shape) == 2)):
                out.add(node)
            elif op in ("permute", "transpose") and len(shape or ()) > 2:
                last = (_perm(node, call, len(shape)) or [None])[-1]
                if last == len(shape) - 1 and x in out or last == 1 and x not in out and _channels_first(self, x):
                    out.add(node)
        return out


# ---------------------------------------------------------------- readers, one per op of the vocabulary

def _conv(view: FxView, node, c: Call):
    if c["transposed"]:
        return _conv_transpose(view, node, c)
    x = view.input(c["input"])
    w = torch.as_tensor(view.need(c["weight"], "conv weight"))
    bias = view.need(c["bias"], "conv bias")
    rank = w.dim() - 2
    stride, dilation, padding = affine.as_tuple(c["stride"], rank), affine.as_tuple(c["dilation"], rank), c["padding"]
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise Declined(f"padding={padding!r}")
        total = [0] * rank if padding == "valid" else [d * (k - 1) for d, k in zip(dilation, w.shape[2:])]
        padding = [(t // 2, t - t // 2) for t in total]
    return Affine(x, affine.conv(_np(w), None if bias is None else _np(bias), stride, padding, dilation, c["groups"]))


def _conv_transpose(view: FxView, node, c: Call):
    if node.op == "call_module" and (len(node.args) > 1 or node.kwargs):
        raise Declined("transposed conv called with output_size (output_padding chosen per call)")
    x, w, bias = view.input(c["input"]), view.need(c["weight"], "conv weight"), view.need(c["bias"], "conv bias")
    rank = torch.as_tensor(w).dim() - 2
    geometry = [affine.as_tuple(c[k], rank) for k in ("stride", "padding", "output_padding", "dilation")]
    return Transposed(x, affine.conv_transpose(_np(w), None if bias is None else _np(bias), *geometry, c["groups"]))


def _batch_norm(view: FxView, node, c: Call):
    x = view.input(c["input"])
    if c["training"]:
        raise Declined("BatchNorm in training mode uses batch statistics")
    if c["mean"] is None or c["var"] is None:
        raise Declined("BatchNorm without running statistics")
    layout = need_layout(view, x)
    if layout.rank == 0 and len(node_shape(x)) > 2:
        raise Declined("BatchNorm over dim 1 of a tensor read channels-last")
    vals = [view.need(c[k], "BatchNorm statistics") for k in ("mean", "var", "weight", "bias")]
    eps = view.const(c["eps"])
    if eps is None:
        raise Declined("BatchNorm eps is a run-time input (torch.compile(dynamic=True) lifts module floats; "
                       "torch._dynamo.config.specialize_float = True keeps them constant)")
    return Affine(x, affine.batchnorm(*[None if v is None else _np(v) for v in vals], float(eps), layout.rank))


def _getitem(view: FxView, node, c: Call):
    src = c["input"]
    if isinstance(src, fx.Node) and src.target is aten._native_batch_norm_legit_no_training.default \
            and c["index"] == 0:
        x, weight, bias, mean, var, _, eps = src.args[:7]
        return _batch_norm(view, node, Call("batch_norm", dict(input=x, weight=weight, bias=bias, mean=mean, var=var,
                                                               training=False, eps=eps)))
    return None


def _linear_of(view: FxView, x, weight, bias):
    """y = x @ W.T + b over the last dim."""
    x = view.input(x)
    if len(node_shape(x) or ()) < 2:
        raise Declined("linear over an input of unknown shape")
    return Affine(x, affine.linear(_np(weight), None if bias is None else _np(bias)))


def _linear(view: FxView, node, c: Call):
    return _linear_of(view, c["input"], view.need(c["weight"], "linear weight"), view.need(c["bias"], "linear bias"))


def _matmul(view: FxView, node, c: Call):
    if c["beta"] not in (None, 1) or c["alpha"] not in (None, 1):
        return None
    m = view.const(c["mat2"])
    if not isinstance(m, torch.Tensor) or m.dim() != 2:
        return None
    bias = view.need(c["bias"], "addmm bias") if c["bias"] is not None else None
    if bias is not None and torch.as_tensor(bias).numel() != m.shape[1]:
        return None
    return _linear_of(view, c["input"], m.t(), bias)  # x @ M == linear(x, M.T)


def _pad(view: FxView, node, c: Call):
    x = view.input(c["input"])
    if c["mode"] != "constant":
        raise Declined(f"{c['mode']} padding")
    layout = need_layout(view, x)
    pad = [int(p) for p in c["pad"]]  # torch order: (last_begin, last_end, ...)
    if len(pad) % 2 or len(pad) // 2 > layout.rank:
        raise Declined("padding touches batch or channel dims")
    if any(p < 0 for p in pad):
        raise Declined("negative padding crops the input")
    pads = [(0, 0)] * layout.rank
    for i in range(len(pad) // 2):
        pads[layout.rank - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    fill = _border_fill(view, node, tuple(pads), layout.channels)
    value = float(c["value"] or 0.0) if fill is None else fill
    return padded(x, layout.channels, tuple(pads), value, view.fill_precision.get(node, 1e-5))


def _avg_pool(view: FxView, node, c: Call):
    x = view.input(c["input"])
    layout = need_layout(view, x)
    rank = layout.rank
    if len(node_shape(x)) != rank + 2 or rank == 0:
        raise Declined("input shape unknown or not channels-first")
    return Affine(x, affine.avg_pool(layout.channels, rank, c["kernel_size"], c["stride"], c["padding"],
                                     count_include_pad=c["count_include_pad"], ceil_mode=c["ceil_mode"],
                                     divisor=c["divisor_override"], input_size=node_shape(x)[2:]))


def _identity(view: FxView, node, c: Call):
    x = view.input(c["input"])
    return Affine(x, affine.identity(*need_layout(view, x)))


def _dropout(view: FxView, node, c: Call):
    return None if c["training"] is not False else _identity(view, node, c)


def _activation(view: FxView, node, c: Call):
    if c.op == "clamp":  # bounds from data are no fixed function of a channel's constant
        low, high = c["min"], c["max"]
        fn = clip(low, high) if all(v is None or isinstance(v, (int, float)) for v in (low, high)) else None
    else:
        fn = ACTIVATIONS[c["fn"]]
    return None if fn is None else Pointwise(view.input(c["input"]), fn)


def _per_channel(view: FxView, x, scale, shift):
    x = view.input(x)
    channels, rank = need_layout(view, x)
    return Affine(x, affine.per_channel(np.broadcast_to(scale, (channels,)), np.broadcast_to(shift, (channels,)), rank))


def _channel_const(view: FxView, x, c) -> np.ndarray:
    channels, rank = need_layout(view, x)
    if isinstance(c, (int, float)):
        return np.full(channels, float(c))
    return affine.channel_vector(_np(c), len(node_shape(x)), channels, rank)


def _sum(view: FxView, node, c: Call):
    a, b = c["input"], c["other"]
    ca, cb = view.const(a), view.const(b)
    sign = -1.0 if c.op == "sub" else 1.0
    if not isinstance(c["alpha"], (int, float)):
        return None
    wa, wb = 1.0, sign * c["alpha"]
    if ca is not None and cb is not None:
        return None
    if cb is not None:
        return _per_channel(view, a, wa, wb * _channel_const(view, a, cb))
    if ca is not None:
        return _per_channel(view, b, wb, wa * _channel_const(view, b, ca))
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return None
    if not same_shape(node_shape(a), node_shape(b)) or not same_shape(node_shape(node), node_shape(a)):
        raise Declined("operands of different shapes (broadcasting)")
    return Sum((a, b), (wa, wb))


def _mul(view: FxView, node, c: Call):
    a, b = c["input"], c["other"]
    ca, cb = view.const(a), view.const(b)
    if ca is None and cb is None:
        return _scaled(view, node, a, b)
    if ca is not None and cb is not None:
        return None
    x, k = (a, cb) if cb is not None else (b, ca)
    return _per_channel(view, x, _channel_const(view, x, k), 0.0)


def _scaled(view: FxView, node, a, b):
    """x * s with s a per-sample scalar [N, 1, ...] computed from data (a dynamic conv's attention)."""
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return None
    for x, s in ((a, b), (b, a)):
        xs, ss = node_shape(x), node_shape(s)
        if xs is None or ss is None or len(xs) != len(ss) or len(xs) < 2 or not same_shape(node_shape(node), xs):
            continue
        if same_shape(ss[:1], xs[:1]) and all(static_size(d) == 1 for d in ss[1:]) and view.layout(x):
            return Scaled(x, s)
    return None


def _div(view: FxView, node, c: Call):
    a, cb = c["input"], view.const(c["other"])
    if view.const(a) is None and cb is not None and c["rounding_mode"] is None:
        return _per_channel(view, a, 1.0 / _channel_const(view, a, cb), 0.0)
    return None


def _neg(view: FxView, node, c: Call):
    return _per_channel(view, c["input"], -1.0, 0.0)


def _regroup(view: FxView, node, c: Call):
    """A reshape that only regroups the leading dims of a channels-last value (tokens [B, N, C] -> [B*N, C])."""
    x, after = view.input(c["input"]), node_shape(node)
    layout = view.layout(x)  # channels last (rank 0), and the same channels after: only leading dims moved
    same = layout is not None and not layout.rank and after and static_size(after[-1]) == layout.channels
    if same and node in view.channels_last:
        return Regroup(x)
    if reason := splits_channels(node_shape(x), after and [static_size(d) or d for d in after], layout):
        raise Declined(reason)
    return None


def _perm(node, c: Call, ndim: int) -> tuple[int, ...] | None:
    """The permutation of a permute (dims as a list, or as x.permute(0, 2, 1)'s varargs) or a transpose."""
    dims = [c["dim0"], c["dim1"]] if c.op == "transpose" else node.args[1:] if isinstance(c["dims"], int) else c["dims"]
    if not all(isinstance(d, int) for d in dims or [None]):
        return None
    dims, perm = [d % ndim for d in dims], list(range(ndim))
    if c.op == "transpose":
        perm[dims[0]], perm[dims[1]] = dims[1], dims[0]
    return tuple(perm if c.op == "transpose" else dims)


def _permute(view: FxView, node, c: Call):
    x = view.input(c["input"])
    perm = None if node_shape(x) is None else _perm(node, c, len(node_shape(x)))
    return None if perm is None else Permute(x, perm)


def _channels_first(view: FxView, x) -> bool:
    """x is surely read channels-first: a conv, BatchNorm, pool or pad wrote it (aten's BatchNorm: item 0)."""
    try:
        call = view.call(x) if isinstance(x, fx.Node) else None
    except Declined:
        return False
    bn = call is not None and call.op == "getitem" and \
        getattr(call["input"], "target", None) is aten._native_batch_norm_legit_no_training.default
    return bn or call is not None and call.op in ("conv", "batch_norm", "avg_pool", "pad")


def _cat(view: FxView, node, c: Call):
    tensors, shape, layout = c["tensors"], node_shape(node), view.layout(node)
    if shape is None or layout is None or c["dim"] % len(shape) != len(shape) - 1 - layout.rank:
        return None  # not along the channel axis
    if not all(isinstance(t, fx.Node) and view.const(t) is None for t in tensors):
        return None
    return Concat(tuple(tensors))


# ops whose result is a new tensor (never a view of their input), so an in-place write into it is private
_FRESH_RESULTS = {"conv", "batch_norm", "linear", "addmm", "matmul", "add", "sub", "mul", "div", "cat", "pad",
                  "avg_pool", "activation", "clamp", "neg",
                  "conv_transpose"}
READERS = {"conv": _conv, "batch_norm": _batch_norm, "getitem": _getitem, "linear": _linear, "addmm": _matmul,
           "matmul": _matmul, "pad": _pad, "avg_pool": _avg_pool, "identity": _identity, "dropout": _dropout,
           "activation": _activation, "clamp": _activation, "add": _sum, "sub": _sum, "mul": _mul, "div": _div,
           "neg": _neg, "cat": _cat, "regroup": _regroup, "permute": _permute, "transpose": _permute,
           "conv_transpose": _conv_transpose}


# ---------------------------------------------------------------- DBB's border writes

def _border_fill(view: FxView, node, pads, channels) -> np.ndarray | None:
    """Recognize `out = pad(x); out[.., border, ..] = v` for every border (DBB's BN-and-pad).

    Writes are `setitem` (dynamo, symbolic_trace) or `copy_` into an `aten.slice`
    (torch.export); they are replayed on a NaN array and judged by `patterns.borders`.
    Only slices written relative to the ends count, so the result holds for every size.
    Returns the per-channel fill, None when there are no border writes.
    """
    rank = len(pads)
    writes = []  # (index tuple, value node, nodes to erase)
    for u in node.users:
        if u.target is operator.setitem and u.args[0] is node:
            writes.append((u.args[1], u.args[2], [u]))
        elif u.target is aten.slice.Tensor:
            write = _slice_copy(u, rank)
            if write is not None:
                writes.append(write)
    if not writes:
        return None
    erased = [n for _, _, nodes in writes for n in nodes]
    readers = [u for u in node.users if u not in erased]
    if readers and min(view.order[r] for r in readers) < max(view.order[n] for n in erased):
        raise Declined("padded tensor is read before its border is written")
    fills = []
    for index, value_node, _ in writes:
        value = view.const(value_node)
        if value is None:
            raise Declined("border value is not a constant")
        v = _channel_values(torch.as_tensor(value), channels, rank)
        if v is None:
            raise Declined("border value is not per-channel")
        fills.append((index, v))
    fill = border_fill_of_writes(fills, pads, channels)
    view.pad_fills[node] = erased
    view.fill_precision[node] = precision(torch.finfo(torch.as_tensor(view.const(writes[0][1])).dtype).eps)
    return fill


def _slice_copy(first: fx.Node, rank: int):
    """`copy_(slice(slice(...(padded, d0), d1)...), value)`: torch.export's form of one border write.
    Returns (index tuple, value node, nodes to erase), or None."""
    index, chain, node, parent = [slice(None)] * (rank + 2), [], first, first.args[0]
    while node.target is aten.slice.Tensor and len(node.users) == 1 and node.args[0] is parent:
        dim, start, stop = (list(node.args[1:4]) + [0, None, None])[:3]
        if not isinstance(dim, int) or not all(v is None or isinstance(v, int) for v in (start, stop)):
            return None
        stop = None if stop is None or stop >= 2**62 else stop  # "to the end" is INT64_MAX in aten
        if (start, stop) not in ((None, None), (0, None)):  # a whole-dim slice selects nothing
            if index[dim % (rank + 2)] != slice(None):
                return None
            index[dim % (rank + 2)] = slice(start, stop)
        chain.append(node)
        parent, node = node, next(iter(node.users))
    if node.target is not aten.copy_.default or not chain or node.args[0] is not chain[-1] or node.users:
        return None
    value = node.args[1]
    if isinstance(value, fx.Node) and value.target in (aten.expand.default, aten.expand_as.default):
        value = value.args[0]  # a constant broadcast to the (possibly symbolic) border shape
    return tuple(index), value, [node] + chain[::-1]


def _channel_values(t: torch.Tensor, channels: int, rank: int) -> np.ndarray | None:
    """Per-channel values of a fill tensor that may be expanded over the slab it writes."""
    if t.numel() == 1:
        return np.full(channels, float(t.reshape(())))
    t = t.reshape((1,) * (rank + 2 - t.dim()) + tuple(t.shape)) if t.dim() < rank + 2 else t
    if t.dim() != rank + 2 or t.shape[1] != channels:
        return None
    flat = t.transpose(0, 1).reshape(channels, -1)
    if not bool((flat == flat[:, :1]).all()):
        return None
    return _np(flat[:, 0])


# ---------------------------------------------------------------- helpers

class _PerTensor:
    """A cache keyed by tensor identity whose entries go when the tensor does.  (WeakKeyDictionary compares
    keys with ==, which a tensor answers elementwise.)"""

    def __init__(self):
        self._entries: dict[int, tuple] = {}

    def get(self, t: torch.Tensor):
        entry = self._entries.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def put(self, t: torch.Tensor, value) -> None:
        if id(t) not in self._entries:
            weakref.finalize(t, self._entries.pop, id(t), None)
        self._entries[id(t)] = (weakref.ref(t), value)


_AS_NUMPY = _PerTensor()  # tensor -> (version, float64 array)
_DETACHED = _PerTensor()  # tensor -> its detached alias


def _detached(t: torch.Tensor) -> torch.Tensor:
    """One detached alias per tensor (it shares the version counter), so `_np`'s cache sees the same key
    every rule round."""
    if not t.requires_grad:
        return t
    alias = _DETACHED.get(t)
    if alias is None:
        alias = t.detach()
        _DETACHED.put(t, alias)
    return alias


def _np(t) -> np.ndarray:
    """A constant as float64 numpy, converted once per tensor and version: every rule round reads every
    weight, and converting ResNet-18's 11M parameters each time was most of its fuse."""
    if not isinstance(t, torch.Tensor):
        return torch.as_tensor(t).to(torch.float64).numpy()
    cached = _AS_NUMPY.get(t)
    if cached is not None and cached[0] == t._version:
        return cached[1]
    array = t.detach().to("cpu", torch.float64).numpy()
    array.flags.writeable = False  # shared between reads: the algebra never edits its inputs in place
    _AS_NUMPY.put(t, (t._version, array))
    return array


def module_path(node: fx.Node) -> str:
    """The dotted path of the module a node was traced in ("stages.1.0"), from the graph's module stack
    (dynamo's `L['self']` prefix dropped); "" at the top level or when the graph kept no stack."""
    stack = node.meta.get("nn_module_stack") if isinstance(node, fx.Node) else None
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    return re.sub(r"^L\[['\"][^'\"]*['\"]\]\.?", "", path)


def static_size(d) -> int | None:
    """A size that is the same for every input: an int, or a symbolic size the capture pinned to one value."""
    if isinstance(d, int):
        return d
    try:
        expr = d.node.expr  # with the shape environment's replacements applied
        return int(expr) if expr.is_number else None
    except Exception:
        return None


def same_shape(a, b) -> bool:
    """Equal for every input (not just the example): equal ints, or the same symbolic expressions.
    Compares without asking the shape environment, so it adds no guard."""
    if a is None or b is None or len(a) != len(b):
        return False
    key = lambda d: d if isinstance(d, int) else getattr(getattr(d, "node", None), "expr", d)  # noqa: E731
    return all(key(x) == key(y) for x, y in zip(a, b))


def example_size(d) -> int | None:
    """A concrete size: the int itself, or the example value behind a symbolic size."""
    if isinstance(d, int):
        return d
    try:
        return int(d.node.hint)
    except Exception:
        return None


def _fetch_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# ---------------------------------------------------------------- statistics

_MODULE_KINDS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d",
                 nn.ConvTranspose1d: "conv_transpose1d", nn.ConvTranspose2d: "conv_transpose2d",
                 nn.ConvTranspose3d: "conv_transpose3d", nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm",
                 nn.BatchNorm3d: "batch_norm", nn.AvgPool1d: "avg_pool1d", nn.AvgPool2d: "avg_pool2d",
                 nn.AvgPool3d: "avg_pool3d", nn.MaxPool1d: "max_pool1d", nn.MaxPool2d: "max_pool2d",
                 nn.MaxPool3d: "max_pool3d", nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d",
                 **ACTIVATION_MODULES}  # named as the functional and aten graphs name them


def op_kind(node: fx.Node, gm: nn.Module) -> str:
    """A readable op type: the function name, the same for a module call that computes it (nn.Linear and
    F.linear are "linear"); else the module's class."""
    if node.op == "call_module":
        cls = type(gm.get_submodule(node.target))
        return _MODULE_KINDS.get(cls, cls.__name__)
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._opname
    return _name(node.target)


def _weight_shape(view: FxView, node: fx.Node):
    """The weight shape of a conv or linear node (also one repfuse cannot read), else None."""
    if node.op == "call_module":
        mod = view.gm.get_submodule(node.target)
        return tuple(mod.weight.shape) if type(mod) in CONV_MODULES or type(mod) is nn.Linear else None
    call = normalize(node, view.gm)
    if call is None or call.op not in ("conv", "linear"):
        return None
    w = view.const(call["weight"])
    return tuple(w.shape) if isinstance(w, torch.Tensor) else node_shape(call["weight"])


def graph_stats(view: FxView) -> GraphStats:
    """Ops by type, conv/linear count, MACs per sample and constant elements read."""
    stats = GraphStats()
    seen: set[int] = set()
    for node in view.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            kind = op_kind(node, view.gm)
            if kind not in ("getitem", "setitem", "detach", "size") and view.const(node) is None:
                stats.ops[kind] += 1
            wshape, out = _weight_shape(view, node), node_shape(node)
            if wshape is not None:
                stats.convs += 1
                # positions per sample: a conv's spatial dims, a linear's token dims ([B, N, C] -> N)
                dims = [] if out is None else out[2:] if len(wshape) > 2 else out[1:-1]
                dims = [example_size(d) for d in dims]
                if out is not None and None not in dims:
                    positions = int(np.prod(dims, dtype=np.int64))
                    samples = node.meta.get("repfuse_samples", 1)  # a dynamic conv runs the batch as groups
                    stats.macs += positions * int(np.prod(wshape, dtype=np.int64)) // samples
        tensors = []
        if node.op == "call_module":
            mod = view.gm.get_submodule(node.target)
            tensors = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        elif node.op in ("get_attr", "placeholder") and node.users:
            t = view.const(node)
            tensors = [t] if isinstance(t, torch.Tensor) else []
        for t in tensors:
            if t is not None and id(t) not in seen and t.is_floating_point():
                seen.add(id(t))
                stats.params += t.numel()
    return stats
