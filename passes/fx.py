"""PyTorch FX adapter: read FX nodes into the algebra, write fused convs back.

Understands the three shapes FX graphs come in: module calls (symbolic_trace),
torch-level functional calls (dynamo, with parameters as placeholders or as
get_attr after torch._dynamo.export) and aten calls.  Recognition is written
here, in FX's vocabulary; planning is `repfuse.patterns.planner.plan`.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from ..patterns import affine as A
from ..patterns.affine import Declined
from ..patterns.channels import ACTIVATIONS, clip
from ..patterns.planner import Affine, Concat, Plan, Pointwise, Scaled, Sum, padded, precision

aten = torch.ops.aten

__all__ = ["FxView", "fuse_graph_module", "apply_plan", "graph_stats"]

# Ops whose result is never a constant we may evaluate at plan time.
_IMPURE_NAMES = {"setitem", "delitem", "rand", "randn", "randint", "rand_like", "randn_like",
                 "randint_like", "dropout", "bernoulli", "normal", "uniform", "multinomial",
                 "empty", "empty_like"}


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _is_pure(node: fx.Node) -> bool:
    name = _name(node.target).split(".")[0]
    return not (name in _IMPURE_NAMES or (name.endswith("_") and not name.endswith("__")))


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def node_shape(node) -> tuple | None:
    """Static-or-symbolic shape recorded on a node by dynamo, export or ShapeProp."""
    if not isinstance(node, fx.Node):
        return None
    for key in ("val", "example_value"):
        v = node.meta.get(key)
        if isinstance(v, torch.Tensor):
            return tuple(v.shape)
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(tm.shape)
    return None


def node_dtype(node) -> torch.dtype | None:
    for key in ("val", "example_value"):
        v = node.meta.get(key) if isinstance(node, fx.Node) else None
        if isinstance(v, torch.Tensor):
            return v.dtype
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(tm, "dtype", None)


# ---------------------------------------------------------------- targets

_CONV = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
         aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BN_FUNCTIONAL = {F.batch_norm}  # (input, mean, var, weight, bias, training, momentum, eps)
_BN_TORCH = {torch.batch_norm, aten.batch_norm.default}  # (input, weight, bias, mean, var, training, momentum, eps, ...)
_LINEAR = {F.linear, aten.linear.default}
_PAD = {F.pad, torch._C._nn.pad, aten.constant_pad_nd.default, aten.pad.default}
_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
_AVG = {torch.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
        aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}
_AVG_MODULES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ADD = {operator.add, operator.iadd, torch.add, aten.add.Tensor, "add"}
_SUB = {operator.sub, operator.isub, torch.sub, aten.sub.Tensor, "sub"}
_MUL = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor, "mul"}
_DIV = {operator.truediv, torch.div, aten.div.Tensor, "div"}
_NEG = {operator.neg, torch.neg, aten.neg.default, "neg"}
_CAT = {torch.cat, torch.concat, aten.cat.default}
_IDENTITY = {torch.clone, aten.clone.default, "clone", "contiguous", aten.alias.default}
_DROPOUT = {F.dropout, torch.dropout, aten.dropout.default}
# elementwise activations (by the name patterns.channels.ACTIVATIONS knows them)
_ACTIVATION = {F.relu: "relu", torch.relu: "relu", aten.relu.default: "relu", "relu": "relu",
               F.relu6: "relu6", F.sigmoid: "sigmoid", torch.sigmoid: "sigmoid", aten.sigmoid.default: "sigmoid",
               "sigmoid": "sigmoid", F.hardsigmoid: "hardsigmoid", aten.hardsigmoid.default: "hardsigmoid",
               F.hardswish: "hardswish", aten.hardswish.default: "hardswish", F.silu: "silu",
               aten.silu.default: "silu", torch.tanh: "tanh", aten.tanh.default: "tanh", "tanh": "tanh"}
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid",
                       nn.Hardswish: "hardswish", nn.SiLU: "silu", nn.Tanh: "tanh"}
_CLAMP = {F.hardtanh: ("min_val", "max_val", -1.0, 1.0), aten.hardtanh.default: ("min_val", "max_val", -1.0, 1.0),
          torch.clamp: ("min", "max", None, None), aten.clamp.default: ("min", "max", None, None),
          "clamp": ("min", "max", None, None)}


# ---------------------------------------------------------------- the view

class FxView:
    """The planner's view of an FX graph.

    `constants` maps placeholder nodes to the tensors they hold (dynamo's
    parameters); get_attr nodes and module parameters are constants unless
    they require grad while grad is enabled.  Constant-only computations
    (weight slicing, masks, detach/view of parameters) are evaluated here.
    """

    def __init__(self, gm: fx.GraphModule, constants: dict[fx.Node, torch.Tensor] | None = None):
        self.gm = gm
        self.graph = gm.graph
        self.constants = constants or {}
        self._const: dict[fx.Node, Any] = {}
        self.pad_fills: dict[fx.Node, list[fx.Node]] = {}
        self.fill_precision: dict[fx.Node, float] = {}
        self._values = [n for n in self.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
        self._outputs: set[fx.Node] = set()
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        for n in self.graph.nodes:
            if n.op == "output":
                fx.node.map_arg(n.args, self._outputs.add)
            else:
                self._const[n] = self._constant_value(n)

    # -- GraphView protocol
    def values(self):
        return self._values

    def single_consumer(self, node: fx.Node) -> bool:
        if node in self._outputs:
            return False
        fills = self.pad_fills.get(node, ())
        return len([u for u in node.users if u not in fills]) == 1

    def readers(self, node: fx.Node):
        if node in self._outputs:
            return None
        fills = self.pad_fills.get(node, ())
        return [u for u in node.users if u not in fills]

    def channels_and_rank(self, node: fx.Node):
        shape = node_shape(node)
        if shape is None or len(shape) < 2 or _static(shape[1]) is None:
            return None
        dtype = node_dtype(node)
        if dtype is not None and not dtype.is_floating_point:
            return None
        return _static(shape[1]), len(shape) - 2

    def describe(self, node: fx.Node):
        if self.const(node) is not None:
            return None  # parameter-only computation, folded where it is read
        if not isinstance(node.meta.get("val", node.meta.get("example_value")), (torch.Tensor, type(None))):
            return None  # size arithmetic (SymInt), not a tensor
        read = self._reader(node)
        if read is None:
            return None
        try:
            return read(node)
        except (TypeError, ValueError) as e:  # a scalar or size known only at run time (symbolic)
            raise Declined(f"an argument is not a constant ({e})") from None

    # -- constants
    def const(self, arg):
        """The tensor (or Python number) an argument holds at plan time, else None."""
        if isinstance(arg, torch.Tensor) or (isinstance(arg, (int, float)) and not isinstance(arg, bool)):
            return arg
        return self._const.get(arg) if isinstance(arg, fx.Node) else None

    def _constant_value(self, node: fx.Node):
        """Evaluated once per node, in topological order, so inputs are already known."""
        value = None
        if node.op == "placeholder":
            value = self.constants.get(node)
        elif node.op == "get_attr":
            value = _fetch_attr(self.gm, node.target)
            if isinstance(value, torch.Tensor) and value.requires_grad and torch.is_grad_enabled():
                value = None
        elif node.op in ("call_function", "call_method") and _is_pure(node) and node.all_input_nodes:
            value = self._evaluate(node)
        if isinstance(value, torch.Tensor):
            return value.detach()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        return None

    def _evaluate(self, node: fx.Node):
        if any(self._const.get(n) is None for n in node.all_input_nodes):
            return None
        args = fx.node.map_arg(node.args, self._const.get)
        kwargs = fx.node.map_arg(node.kwargs, self._const.get)
        try:
            with torch.no_grad():
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                return node.target(*args, **kwargs)
        except Exception:  # not evaluable on these values: treat as non-constant
            return None

    def module_tensor(self, t: torch.Tensor | None):
        if t is None:
            return None
        if t.requires_grad and torch.is_grad_enabled():
            raise Declined("weights require grad while grad is enabled (training graph)")
        return t.detach()

    def need_const(self, arg, what: str):
        v = self.const(arg)
        if v is None and arg is not None:
            raise Declined(f"{what} is not a constant")
        return v

    # -- per-node readers
    def _reader(self, node: fx.Node) -> Callable | None:
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            t = type(mod)
            if t in _CONV_MODULES:
                return self._conv_module
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                return self._bn_module
            if t is nn.Linear:
                return self._linear_module
            if t in _AVG_MODULES:
                return self._avg_module
            if isinstance(mod, _PAD_MODULES):
                return self._pad_module
            if t is nn.Identity or (isinstance(mod, nn.modules.dropout._DropoutNd) and not mod.training):
                return self._identity
            if t in _ACTIVATION_MODULES or t is nn.Hardtanh:
                return self._activation_module
            return None
        target = node.target
        try:
            if target in _CONV:
                return self._conv
            if target is aten.convolution.default:
                return self._aten_convolution
            if target in _BN_FUNCTIONAL:
                return self._bn_functional
            if target in _BN_TORCH:
                return self._bn_torch
            if target is operator.getitem:
                return self._getitem
            if target in _LINEAR:
                return self._linear
            if target in (aten.addmm.default, aten.mm.default, torch.matmul, operator.matmul):
                return self._matmul
            if target in _PAD:
                return self._pad
            if target in _AVG:
                return self._avg
            if target in _ADD:
                return self._add
            if target in _SUB:
                return self._sub
            if target in _MUL:
                return self._mul
            if target in _DIV:
                return self._div
            if target in _NEG:
                return self._neg
            if target in _CAT:
                return self._cat
            if target in _IDENTITY:
                return self._identity
            if target in _DROPOUT:
                return self._dropout
            if target in _ACTIVATION:
                return self._activation
            if target in _CLAMP:
                return self._clamp
        except TypeError:  # unhashable target
            return None
        return None

    def _input(self, node: fx.Node, arg) -> fx.Node:
        if not isinstance(arg, fx.Node) or self.const(arg) is not None:
            raise Declined("input is a constant")
        return arg

    def _conv_op(self, weight, bias, stride, padding, dilation, groups, rank) -> A.AffineConv:
        w = torch.as_tensor(weight)
        if w.dim() != rank + 2:
            raise Declined("unsupported convolution weight layout")
        k = w.shape[2:]
        stride = A._tuple(stride, rank)
        dilation = A._tuple(dilation, rank)
        if isinstance(padding, str):
            if padding == "valid":
                padding = 0
            elif padding == "same":
                total = [d * (kk - 1) for d, kk in zip(dilation, k)]
                padding = [(t // 2, t - t // 2) for t in total]
            else:
                raise Declined(f"padding={padding!r}")
        return A.conv(_np(w), None if bias is None else _np(bias), stride, padding, dilation, groups)

    def _conv(self, node):
        rank = _CONV[node.target]
        x = self._input(node, node.args[0])
        w = self.need_const(_arg(node, 1, "weight"), "conv weight")
        b = self.need_const(_arg(node, 2, "bias"), "conv bias")
        op = self._conv_op(w, b, _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0),
                           _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1), rank)
        return Affine(x, op)

    def _aten_convolution(self, node):
        x, w, b, stride, padding, dilation, transposed, _, groups = node.args[:9]
        if transposed:
            return None
        x = self._input(node, x)
        w = self.need_const(w, "conv weight")
        rank = torch.as_tensor(w).dim() - 2
        return Affine(x, self._conv_op(w, self.need_const(b, "conv bias"), stride, padding, dilation,
                                       groups, rank))

    def _conv_module(self, node):
        mod = self.gm.get_submodule(node.target)
        if mod.padding_mode != "zeros":
            raise Declined(f"padding_mode={mod.padding_mode!r}")
        x = self._input(node, node.args[0])
        op = self._conv_op(self.module_tensor(mod.weight), self.module_tensor(mod.bias), mod.stride,
                           mod.padding, mod.dilation, mod.groups, _CONV_MODULES[type(mod)])
        return Affine(x, op)

    def _bn(self, node, x, mean, var, weight, bias, training, eps):
        x = self._input(node, x)
        if training:
            raise Declined("BatchNorm in training mode uses batch statistics")
        if mean is None or var is None:
            raise Declined("BatchNorm without running statistics")
        cr = self.channels_and_rank(x)
        if cr is None:
            raise Declined("input shape unknown")
        vals = [self.need_const(t, "BatchNorm statistics") for t in (mean, var, weight, bias)]
        if self.const(eps) is None:
            raise Declined("BatchNorm eps is a run-time input (torch.compile(dynamic=True) lifts module floats; "
                           "torch._dynamo.config.specialize_float = True keeps them constant)")
        eps = self.const(eps)
        return Affine(x, A.batchnorm(*[None if v is None else _np(v) for v in vals], float(eps), cr[1]))

    def _bn_functional(self, node):
        a = lambda i, n, d=None: _arg(node, i, n, d)  # noqa: E731
        return self._bn(node, a(0, "input"), a(1, "running_mean"), a(2, "running_var"), a(3, "weight"),
                        a(4, "bias"), a(5, "training", False), a(7, "eps", 1e-5))

    def _bn_torch(self, node):
        a = node.args
        return self._bn(node, a[0], a[3], a[4], a[1], a[2], a[5], a[7])

    def _bn_module(self, node):
        mod = self.gm.get_submodule(node.target)
        if mod.training or mod.running_mean is None:
            raise Declined("BatchNorm uses batch statistics (training mode or no running stats)")
        t = self.module_tensor
        return self._bn(node, node.args[0], t(mod.running_mean), t(mod.running_var), t(mod.weight),
                        t(mod.bias), False, mod.eps)

    def _getitem(self, node):
        src, index = node.args
        if isinstance(src, fx.Node) and src.target is aten._native_batch_norm_legit_no_training.default \
                and index == 0:
            x, weight, bias, mean, var, _, eps = src.args[:7]
            return self._bn(node, x, mean, var, weight, bias, False, eps)
        return None

    def _linear_of(self, node, x, weight, bias):
        x = self._input(node, x)
        shape = node_shape(x)
        if shape is None or len(shape) != 2:
            raise Declined("linear over inputs that are not [N, C]")
        return Affine(x, A.linear(_np(weight), None if bias is None else _np(bias)))

    def _linear(self, node):
        return self._linear_of(node, node.args[0], self.need_const(_arg(node, 1, "weight"), "linear weight"),
                               self.need_const(_arg(node, 2, "bias"), "linear bias"))

    def _linear_module(self, node):
        mod = self.gm.get_submodule(node.target)
        return self._linear_of(node, node.args[0], self.module_tensor(mod.weight), self.module_tensor(mod.bias))

    def _matmul(self, node):
        if node.target is aten.addmm.default:
            bias, x, mat = node.args[:3]
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                return None
        else:
            (x, mat), bias = node.args[:2], None
        m = self.const(mat)
        if not isinstance(m, torch.Tensor) or m.dim() != 2:
            return None
        b = self.need_const(bias, "addmm bias") if bias is not None else None
        if b is not None and torch.as_tensor(b).numel() != m.shape[1]:
            return None
        return self._linear_of(node, x, m.t(), b)  # x @ M == linear(x, M.T)

    def _pads_from_torch(self, x, pad) -> A.Pads:
        """torch pad lists run from the last dim backwards: (last_begin, last_end, ...)."""
        cr = self.channels_and_rank(x)
        if cr is None:
            raise Declined("input shape unknown")
        rank = cr[1]
        pad = [int(p) for p in pad]
        if len(pad) % 2 or len(pad) // 2 > rank:
            raise Declined("padding touches batch or channel dims")
        if any(p < 0 for p in pad):
            raise Declined("negative padding crops the input")
        pairs = [(0, 0)] * rank
        for i in range(len(pad) // 2):
            pairs[rank - 1 - i] = (pad[2 * i], pad[2 * i + 1])
        return tuple(pairs)

    def _pad(self, node):
        x = self._input(node, node.args[0])
        pad = _arg(node, 1, "pad")
        if node.target is aten.constant_pad_nd.default:
            mode, value = "constant", _arg(node, 2, "value", 0)
        else:
            mode, value = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
        if mode != "constant":
            raise Declined(f"{mode} padding")
        return self._padded(node, x, self._pads_from_torch(x, pad), value or 0.0)

    def _pad_module(self, node):
        mod = self.gm.get_submodule(node.target)
        x = self._input(node, node.args[0])
        return self._padded(node, x, self._pads_from_torch(x, mod.padding), float(getattr(mod, "value", 0.0)))

    def _padded(self, node, x, pads, value):
        channels = self.channels_and_rank(x)[0]
        fill = self._border_fill(node, pads, channels)
        return padded(x, channels, pads, float(value) if fill is None else fill, self.fill_precision.get(node, 1e-5))

    def _border_fill(self, node, pads, channels) -> np.ndarray | None:
        """Recognize `out = pad(x); out[.., border, ..] = v` for every border (DBB's BN-and-pad).

        Writes are `setitem` (dynamo, symbolic_trace) or `copy_` into an
        `aten.slice` (torch.export).  Only slices written relative to the ends
        (`0:p`, `-p:`) count, so the result holds for every input size.
        Returns the per-channel fill, None when there are no border writes;
        raises Declined when writes exist but do not fill exactly the border.
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
        if readers and min(self.order[r] for r in readers) < max(self.order[n] for n in erased):
            raise Declined("padded tensor is read before its border is written")
        need = {(d, side) for d, (b, e) in enumerate(pads) for side, p in (("begin", b), ("end", e)) if p}
        fill = None
        for index, value_node, _ in writes:
            value = self.const(value_node)
            if value is None:
                raise Declined("border value is not a constant")
            side = _border_slice(index, pads, rank)
            if side is None:
                raise Declined("in-place write to the padded tensor is not exactly a border")
            v = _channel_values(torch.as_tensor(value), channels, rank)
            if v is None:
                raise Declined("border value is not per-channel")
            if fill is not None and not np.array_equal(fill, v):
                raise Declined("borders are filled with different values")
            fill = v
            need.discard(side)
        if need:
            raise Declined("not every padded border is filled")
        self.pad_fills[node] = erased
        self.fill_precision[node] = precision(torch.finfo(torch.as_tensor(self.const(writes[0][1])).dtype).eps)
        return fill

    def _avg(self, node):
        rank = _AVG[node.target]
        a = lambda i, n, d=None: _arg(node, i, n, d)  # noqa: E731
        return self._avg_of(node, a(0, "input"), rank, a(1, "kernel_size"), a(2, "stride"), a(3, "padding", 0),
                            a(4, "ceil_mode", False), a(5, "count_include_pad", True), a(6, "divisor_override"))

    def _avg_module(self, node):
        mod = self.gm.get_submodule(node.target)
        return self._avg_of(node, node.args[0], _AVG_MODULES[type(mod)], mod.kernel_size, mod.stride, mod.padding,
                            mod.ceil_mode, mod.count_include_pad, getattr(mod, "divisor_override", None))

    def _avg_of(self, node, x, rank, kernel, stride, padding, ceil_mode, count_include_pad, divisor):
        x = self._input(node, x)
        cr = self.channels_and_rank(x)
        if cr is None or cr[1] != rank:
            raise Declined("input shape unknown or not channels-first")
        shape = node_shape(x)
        return Affine(x, A.avg_pool(cr[0], rank, kernel, stride, padding, count_include_pad=count_include_pad,
                                    ceil_mode=ceil_mode, divisor=divisor, input_size=shape[2:]))

    def _identity(self, node):
        x = self._input(node, node.args[0])
        cr = self.channels_and_rank(x)
        if cr is None:
            raise Declined("input shape unknown")
        return Affine(x, A.identity(*cr))

    def _dropout(self, node):
        training = _arg(node, 2, "training" if node.target is F.dropout else "train", True)
        if training:
            return None
        return self._identity(node)

    # -- activations (for dead-channel planning: constants pass through them)
    def _activation(self, node):
        return Pointwise(self._input(node, node.args[0]), ACTIVATIONS[_ACTIVATION[node.target]])

    def _clamp(self, node):
        low_name, high_name, low, high = _CLAMP[node.target]
        low, high = _arg(node, 1, low_name, low), _arg(node, 2, high_name, high)
        if not all(v is None or isinstance(v, (int, float)) for v in (low, high)):
            return None
        return Pointwise(self._input(node, node.args[0]), clip(low, high))

    def _activation_module(self, node):
        mod = self.gm.get_submodule(node.target)
        x = self._input(node, node.args[0])
        if type(mod) is nn.Hardtanh:
            return Pointwise(x, clip(mod.min_val, mod.max_val))
        return Pointwise(x, ACTIVATIONS[_ACTIVATION_MODULES[type(mod)]])

    # -- elementwise
    def _operands(self, node):
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        return (a, self.const(a)), (b, self.const(b))

    def _channel_const(self, node, x, c) -> np.ndarray:
        cr = self.channels_and_rank(x)
        shape = node_shape(x)
        if cr is None:
            raise Declined("input shape unknown")
        if isinstance(c, (int, float)):
            return np.full(cr[0], float(c))
        if shape is None:
            raise Declined("input shape unknown")
        return A.channel_vector(_np(c), len(shape), cr[0])

    def _affine_elementwise(self, node, x, scale, shift):
        x = self._input(node, x)
        cr = self.channels_and_rank(x)
        if cr is None:
            raise Declined("input shape unknown")
        return Affine(x, A.per_channel(np.broadcast_to(scale, (cr[0],)), np.broadcast_to(shift, (cr[0],)),
                                       cr[1]))

    def _sum(self, node, weights):
        (a, ca), (b, cb) = self._operands(node)
        alpha = node.kwargs.get("alpha", 1)
        if not isinstance(alpha, (int, float)):
            return None
        wa, wb = weights[0], weights[1] * alpha
        if ca is not None and cb is not None:
            return None
        if cb is not None:
            return self._affine_elementwise(node, a, wa, wb * self._channel_const(node, a, cb))
        if ca is not None:
            return self._affine_elementwise(node, b, wb, wa * self._channel_const(node, b, ca))
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            return None
        if not _same_shape(node_shape(a), node_shape(b)) or not _same_shape(node_shape(node), node_shape(a)):
            raise Declined("operands of different shapes (broadcasting)")
        if node.target in (operator.iadd, operator.isub) and len(a.users) > 1:
            raise Declined("in-place add on a tensor that is read elsewhere")
        return Sum((a, b), (wa, wb))

    def _add(self, node):
        return self._sum(node, (1.0, 1.0))

    def _sub(self, node):
        return self._sum(node, (1.0, -1.0))

    def _mul(self, node):
        (a, ca), (b, cb) = self._operands(node)
        if ca is None and cb is None:
            return self._scaled(node, a, b)
        if ca is not None and cb is not None:
            return None
        x, c = (a, cb) if cb is not None else (b, ca)
        return self._affine_elementwise(node, x, self._channel_const(node, x, c), 0.0)

    def _scaled(self, node, a, b):
        """x * s with s a per-sample scalar [N, 1, ...] computed from data (a dynamic conv's attention)."""
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            return None
        for x, s in ((a, b), (b, a)):
            xs, ss = node_shape(x), node_shape(s)
            if xs is None or ss is None or len(xs) != len(ss) or len(xs) < 2 or not _same_shape(node_shape(node), xs):
                continue
            if _same_shape(ss[:1], xs[:1]) and all(_static(d) == 1 for d in ss[1:]) and self.channels_and_rank(x):
                return Scaled(x, s)
        return None

    def _div(self, node):
        (a, ca), (b, cb) = self._operands(node)
        if ca is not None or cb is None or node.kwargs.get("rounding_mode") is not None:
            return None
        return self._affine_elementwise(node, a, 1.0 / self._channel_const(node, a, cb), 0.0)

    def _neg(self, node):
        return self._affine_elementwise(node, node.args[0], -1.0, 0.0)

    def _cat(self, node):
        tensors = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", 0)
        shape = node_shape(node)
        if shape is None or len(shape) < 2 or dim not in (1, 1 - len(shape)):
            return None
        if not all(isinstance(t, fx.Node) and self.const(t) is None for t in tensors):
            return None
        return Concat(tuple(tensors))


# ---------------------------------------------------------------- helpers

def _np(t) -> np.ndarray:
    return torch.as_tensor(t).detach().to("cpu", torch.float64).numpy()


SHAPE_META = ("val", "example_value", "tensor_meta")  # the node meta keys that carry shape and dtype


def _static(d) -> int | None:
    """A size that is the same for every input: an int, or a symbolic size the capture pinned to one value."""
    if isinstance(d, int):
        return d
    try:
        expr = d.node.expr  # with the shape environment's replacements applied
        return int(expr) if expr.is_number else None
    except Exception:
        return None


def _same_shape(a, b) -> bool:
    """Equal for every input (not just the example): equal ints, or the same symbolic expressions.
    Compares without asking the shape environment, so it adds no guard."""
    if a is None or b is None or len(a) != len(b):
        return False
    key = lambda d: d if isinstance(d, int) else str(getattr(getattr(d, "node", None), "expr", d))  # noqa: E731
    return all(key(x) == key(y) for x, y in zip(a, b))


def _hint(d) -> int | None:
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


def _border_slice(index, pads, rank):
    """(dim, 'begin'|'end') if `index` selects exactly one padded border, else None."""
    if not isinstance(index, tuple) or len(index) != rank + 2:
        return None
    if any(not isinstance(s, slice) or s != slice(None) for s in index[:2]):
        return None
    found = None
    for d, s in enumerate(index[2:]):
        if not isinstance(s, slice) or s.step not in (None, 1):
            return None
        if s == slice(None):
            continue
        if found is not None:
            return None
        b, e = pads[d]
        if b and s.start in (None, 0) and s.stop == b:
            found = (d, "begin")
        elif e and s.start == -e and s.stop is None:
            found = (d, "end")
        else:
            return None
    return found


# ---------------------------------------------------------------- writing back

_CONV_FN = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}


def to_tensor(array: np.ndarray, like: torch.Tensor | None) -> torch.Tensor:
    """A float64 numpy array as a torch tensor in the model's dtype and device."""
    dtype = like.dtype if like is not None and like.dtype.is_floating_point else torch.float32
    device = like.device if like is not None else "cpu"
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)


def _conv_call(graph: fx.Graph, x: fx.Node, op: A.AffineConv, w_node: fx.Node, b_node: fx.Node,
               groups: int | fx.Node | None = None) -> fx.Node:
    """One conv node (after an F.pad for asymmetric padding) with `op`'s geometry and the given weights."""
    sym = tuple(min(p) for p in op.pads)
    extra = [(bg - s, en - s) for (bg, en), s in zip(op.pads, sym)]
    if any(e != (0, 0) for e in extra):
        flat = [p for pair in reversed(extra) for p in pair]  # torch order: last dim first
        x = graph.call_function(F.pad, (x, flat))
    return graph.call_function(_CONV_FN[op.rank], (x, w_node, b_node, op.stride, sym, op.dilation,
                                                   op.groups if groups is None else groups))


def emit_affine(graph: fx.Graph, x: fx.Node, op: A.AffineConv, constant: Callable[[np.ndarray], fx.Node]) -> fx.Node:
    """The node computing `op` on x (inserted at the graph's insertion point); `constant(array)` makes the
    node holding a new constant.  F.linear has no groups: a grouped rank-0 op is Mul/Add or dense."""
    if op.rank == 0:
        steps = A.linear_steps(op)
        if steps[0][0] == "linear":
            return graph.call_function(F.linear, (x, constant(steps[0][1]), constant(op.bias)))  # W [O, I]
        shape_meta = {k: v for k, v in x.meta.items() if k in SHAPE_META}
        for kind, vector in steps:  # [C], broadcast over [N, C]
            x = graph.call_function(torch.mul if kind == "mul" else torch.add, (x, constant(vector)))
            x.meta.update(shape_meta)  # same shape and dtype: later rounds read them
        return x
    return _conv_call(graph, x, op, constant(op.weight), constant(op.bias))


def _replace(graph: fx.Graph, view: FxView, root: fx.Node, new: fx.Node, nodes) -> None:
    """Point root's users at `new`, then erase the region's nodes (and border writes) that died."""
    new.meta.update({k: v for k, v in root.meta.items() if k in SHAPE_META + ("stack_trace", "nn_module_stack")})
    root.replace_all_uses_with(new)
    for n in reversed(nodes):
        for fill in view.pad_fills.get(n, ()):
            _erase(graph, fill)
        _erase(graph, n)


def apply_plan(view: FxView, fx_plan: Plan, new_constant: Callable[[torch.Tensor, fx.Node], fx.Node]) -> None:
    """Replace every planned region by one conv / linear node.

    `new_constant(tensor, before)` creates the node that holds a new constant
    (get_attr for deploy, placeholder for torch.compile).
    """
    graph = view.graph
    replaced: dict[fx.Node, fx.Node] = {}  # root of an applied region -> its fused node
    for region in fx_plan.regions:
        root, source = region.root, replaced.get(region.source, region.source)
        like = example_like(region)
        with graph.inserting_before(root):
            new = emit_affine(graph, source, region.op, lambda a: new_constant(to_tensor(a, like), root))
        _replace(graph, view, root, new, region.nodes)
        replaced[root] = new


def _erase(graph: fx.Graph, node: fx.Node) -> None:
    """Erase a dead node, then any pure inputs it leaves dead (constant subgraphs)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.users or n.op in ("placeholder", "output") or getattr(n, "_erased", False):
            continue
        if n is not node and (n.op == "call_module" or not _is_pure(n)):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(inputs)


def fuse_graph_module(gm: fx.GraphModule, example_inputs=None, rules: frozenset[str] | None = None):
    """Rewrite `gm` in place with the enabled rules (default: patterns.rules defaults); returns the FusionReport.

    Works on graphs from torch.fx.symbolic_trace (module calls), torch._dynamo.export
    (torch functions) and torch.export (aten ops).  Shapes come from node meta;
    when they are missing, `example_inputs` are run through ShapeProp first.
    Parameters that require grad count as constants only under torch.no_grad().
    """
    from ..patterns import rules as R
    from .fx_rewrites import run_rules
    from .report import FusionReport

    if example_inputs is not None and any(node_shape(n) is None for n in gm.graph.nodes if n.op == "placeholder"):
        from torch.fx.passes.shape_prop import ShapeProp

        ShapeProp(gm).propagate(*example_inputs)
    before = graph_stats(FxView(gm))

    def constant_node(name: str, tensor: torch.Tensor, before_node: fx.Node) -> fx.Node:
        name = _free_name(gm, name)
        gm.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        with gm.graph.inserting_before(before_node):
            node = gm.graph.get_attr(name)
        node.meta["val"] = tensor
        return node

    run = run_rules(gm, None, constant_node, R.enabled() if rules is None else rules)
    _drop_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()
    after = graph_stats(FxView(gm))
    return FusionReport(before=before, after=after, regions=run.regions, declined=run.declined,
                        rules=list(run.rules.values()))


def example_like(region_or_node) -> torch.Tensor | None:
    """A tensor (often fake) with the dtype and device the fused weights should have: the root's,
    else the source's (a node an earlier round wrote may carry no metadata)."""
    root = getattr(region_or_node, "root", region_or_node)
    for node in (root, getattr(region_or_node, "source", None)):
        if not isinstance(node, fx.Node):
            continue
        for key in ("val", "example_value"):
            v = node.meta.get(key)
            if isinstance(v, torch.Tensor):
                return v
        tm = node.meta.get("tensor_meta")
        if tm is not None:
            return torch.empty(0, dtype=tm.dtype)
    return None


def _free_name(gm: nn.Module, name: str) -> str:
    candidate, i = name, 0
    while hasattr(gm, candidate):
        i += 1
        candidate = f"{name}_{i}"
    return candidate


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name, _ in list(gm.named_parameters(recurse=False)) + list(gm.named_buffers(recurse=False)):
        if name not in used:
            delattr(gm, name)
    gm.delete_all_unused_submodules()


# ---------------------------------------------------------------- report

def op_kind(node: fx.Node, gm: nn.Module) -> str:
    """A readable op type: module class for call_module, function name otherwise."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._opname
    return _name(node.target)


def _conv_weight_shape(view: FxView, node: fx.Node):
    if node.op == "call_module":
        mod = view.gm.get_submodule(node.target)
        if type(mod) in _CONV_MODULES:
            return tuple(mod.weight.shape), mod.groups
        if type(mod) is nn.Linear:
            return tuple(mod.weight.shape), 1
        return None
    if node.op != "call_function":
        return None
    target = node.target
    if target in _CONV or target is aten.convolution.default:
        w = view.const(node.args[1])
        groups = node.args[8] if target is aten.convolution.default else _arg(node, 6, "groups", 1)
    elif target in _LINEAR:
        w, groups = view.const(_arg(node, 1, "weight")), 1
    else:
        return None
    if isinstance(w, torch.Tensor):
        return tuple(w.shape), groups
    shape = node_shape(node.args[1]) if isinstance(node.args[1], fx.Node) else None
    return (shape, groups) if shape else None


def graph_stats(view: FxView):
    """Ops by type, conv count, MACs per sample and constant elements read."""
    from .report import GraphStats

    stats = GraphStats()
    seen: set[int] = set()
    for node in view.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            kind = op_kind(node, view.gm)
            if kind in ("getitem", "setitem", "detach", "size"):
                pass  # bookkeeping, not compute
            elif view.const(node) is None:
                stats.ops[kind] += 1
            ws = _conv_weight_shape(view, node)
            if ws is not None:
                stats.convs += 1
                (wshape, _), out = ws, node_shape(node)
                dims = [_hint(d) for d in out[2:]] if out is not None else [None]
                if None not in dims:
                    positions = int(np.prod(dims, dtype=np.int64))
                    samples = node.meta.get("repfuse_samples", 1)  # a dynamic conv runs the batch as groups
                    stats.macs += positions * int(np.prod(wshape, dtype=np.int64)) // samples
        tensors = []
        if node.op == "call_module":
            tensors = list(view.gm.get_submodule(node.target).parameters(recurse=False)) + \
                list(view.gm.get_submodule(node.target).buffers(recurse=False))
        elif node.op in ("get_attr", "placeholder") and node.users:
            t = view.const(node)
            tensors = [t] if isinstance(t, torch.Tensor) else []
        for t in tensors:
            if t is not None and id(t) not in seen and t.is_floating_point():
                seen.add(id(t))
                stats.params += t.numel()
    return stats


def region_rows(view: FxView, fx_plan: Plan):
    from collections import Counter

    from .report import RegionRow, describe_op

    rows = []
    for r in fx_plan.regions:
        kinds = Counter(op_kind(n, view.gm) for n in r.nodes)
        text = ", ".join(f"{k} x{c}" if c > 1 else k for k, c in sorted(kinds.items()))
        rows.append(RegionRow(str(r.root), str(r.source), len(r.nodes), text, describe_op(r.op)))
    return rows
