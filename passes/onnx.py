"""ONNX adapter (on onnx_ir): read ONNX nodes into the algebra, write fused Conv / Gemm back.

Recognition is written here in ONNX's vocabulary (initializers and Constant
nodes are constants, attributes carry geometry, broadcasting decides what is
per-channel); planning is `repfuse.patterns.planner.plan`.  Only the main
graph is rewritten; custom domains, quantized (Q/DQ) regions and anything
unrecognized pass through.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (registers ir.passes.common)

from ..patterns import affine as A
from ..patterns.affine import Declined
from ..patterns.borders import border_fill
from ..patterns.channels import ACTIVATIONS, clip
from ..patterns.planner import (Affine, Concat, PadWith, Plan, Pointwise, Region, Scaled, Sum, padded, plan,
                                precision)
from .report import GraphStats, RegionRow, describe_op

__all__ = ["OnnxView", "fuse_model", "graph_stats"]

_QUANTIZED = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear"}


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant an input holds (initializer or Constant node), as numpy, else None.

    An initializer that is also a graph input (IR >= 4) is a default the caller may
    override: a runtime input, never a constant."""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def overridable(value: ir.Value | None) -> bool:
    """An initializer that is also a graph input: its value is only a default."""
    return value is not None and value.is_graph_input() and value.const_value is not None


OVERRIDABLE = "is a graph input (overridable default)"


def opset(graph: ir.Graph) -> int:
    imports = graph.opset_imports
    return imports.get("", imports.get("ai.onnx", onnx.defs.onnx_opset_version()))


def _dims(value: ir.Value) -> list | None:
    shape = value.shape
    if shape is None:
        return None
    return [d if isinstance(d, int) else None for d in shape]


# ops whose output's dim 0 is their first input's (shape-preserving, or reducing only later dims)
_KEEPS_BATCH = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softmax",
                "LogSoftmax", "Identity", "Dropout", "Cast", "BatchNormalization", "Conv", "ConvTranspose",
                "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "InstanceNormalization",
                "LayerNormalization", "Neg", "Abs", "Exp", "Sqrt", "Erf", "Elu", "Selu", "Softplus", "Gelu"}
_BROADCAST = {"Add", "Sub", "Mul", "Div"}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2"}


def _axes(node: ir.Node, index: int) -> list[int] | None:
    """Axes from the `axes` attribute or, in newer opsets, input `index` (constant); None if unknown."""
    if "axes" in node.attributes:
        return list(node.attributes.get_ints("axes"))
    v = node.inputs[index] if index < len(node.inputs) else None
    c = None if v is None else const_array(v)
    return None if c is None else [int(a) for a in c.reshape(-1)]


def _carried_batch(node: ir.Node, key):
    """The batch key of `node`'s first output when it is provably its input's dim 0, else None."""
    op, ins = node.op_type, node.inputs
    if node.domain not in ("", "ai.onnx") or not ins or ins[0] is None:
        return None
    x = ins[0]
    xd, od = _dims(x), _dims(node.outputs[0])
    a = node.attributes
    if op in _KEEPS_BATCH:
        return key(x)
    if op == "Gemm":
        return None if a.get_int("transA", 0) else key(x)
    if op == "MatMul":
        w = ins[1]
        return key(x) if xd is not None and len(xd) >= 2 and w is not None and w.shape is not None \
            and len(w.shape) == 2 else None
    if op == "Flatten":
        return key(x) if a.get_int("axis", 1) != 0 else None
    if op in _REDUCE or op in ("Squeeze", "Gather", "Transpose", "Unsqueeze", "Concat"):
        if xd is None or od is None:
            return None
        if op in _REDUCE:
            axes = _axes(node, 1)
            ok = bool(axes) and all(ax % len(xd) != 0 for ax in axes)
        elif op == "Squeeze":
            axes = _axes(node, 1)
            ok = bool(axes) and all(ax % len(xd) != 0 for ax in axes)
        elif op == "Unsqueeze":
            axes = _axes(node, 1)
            ok = axes is not None and all(ax % len(od) != 0 for ax in axes)
        elif op == "Gather":
            ok = a.get_int("axis", 0) % len(xd) != 0
        elif op == "Transpose":
            ok = list(a.get_ints("perm", range(len(xd))[::-1]))[:1] == [0]
        else:  # Concat: every input carries the same batch
            ok = a.get_int("axis", 0) % len(xd) != 0 and len({key(v) for v in ins if v is not None}) == 1
        return key(x) if ok else None
    if op == "Reshape":
        shape = const_array(ins[1]) if len(ins) > 1 and ins[1] is not None else None
        if shape is None or shape.size == 0 or xd is None or a.get_int("allowzero", 0):
            return None
        shape = [int(d) for d in shape.reshape(-1)]
        if shape[0] == 0:
            return key(x)  # 0 copies the input's dim
        if shape[0] != -1 or None in xd[1:]:
            return None
        rest = [xd[i] if d == 0 and i < len(xd) else d for i, d in enumerate(shape)][1:]
        if any(d <= 0 for d in rest):
            return None
        # x is [N, static...]: the -1 is N exactly when the other dims hold all of x's static elements
        return key(x) if int(np.prod(xd[1:], dtype=np.int64)) == int(np.prod(rest, dtype=np.int64)) else None
    if op in _BROADCAST and len(ins) == 2 and od is not None:
        keys = []
        for v in ins:
            vd = _dims(v) if v is not None else None
            if vd is None:
                return None
            if len(vd) < len(od):
                continue  # broadcast from the right: does not reach dim 0
            if vd[0] == 1 and (od[0] is None or od[0] != 1):
                continue  # a size-1 batch broadcasts
            keys.append(key(v))
        return keys[0] if keys and all(k == keys[0] for k in keys) else None
    return None


class OnnxView:
    """The planner's view of an onnx_ir graph; one planner key per single-output node value."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.attached: dict[ir.Value, list[ir.Node]] = {}  # value -> extra nodes removed with it
        self._values = [n.outputs[0] for n in graph if n.outputs and n.outputs[0] is not None]
        self._batch: dict[ir.Value, object] | None = None  # value -> key of its batch dim (see batch_key)

    # -- GraphView protocol
    def values(self):
        return self._values

    def single_consumer(self, value: ir.Value) -> bool:
        return not value.is_graph_output() and len(value.uses()) == 1

    def channels_and_rank(self, value: ir.Value):
        dims = _dims(value)
        if dims is None or len(dims) < 2 or dims[1] is None:
            return None
        if value.dtype is not None and not value.dtype.is_floating_point():
            return None
        return dims[1], len(dims) - 2

    def readers(self, value: ir.Value):
        """The values of the nodes reading `value` (patterns.channels); None when a graph output, a
        subgraph or a node with several used outputs reads it."""
        if value.is_graph_output():
            return None
        out = []
        for use in value.uses():
            node = use.node
            if node.graph is not self.graph or not node.outputs or node.outputs[0] is None:
                return None
            if any(o is not None and (o.uses() or o.is_graph_output()) for o in node.outputs[1:]):
                return None
            out.append(node.outputs[0])
        return out

    def batch_key(self, value: ir.Value):
        """A key equal for two values exactly when their batch dims are provably equal: the static
        size, or the symbol of the tensor it was carried from.  Shape inference names the batch of
        `Reshape(pi_k, [-1, 1, 1, 1])` afresh (unk__0), so symbols alone cannot tell a dynamic conv's
        attention from any other tensor; this follows dim 0 through ops that keep it."""
        if self._batch is None:
            self._batch = {}
            for node in self.graph:
                if node.outputs and node.outputs[0] is not None:
                    key = _carried_batch(node, self._batch_own)
                    if key is not None:
                        self._batch[node.outputs[0]] = key
        key = self._batch.get(value)
        return key if key is not None else self._batch_own(value)

    def _batch_own(self, value: ir.Value):
        if self._batch is not None and value in self._batch:
            return self._batch[value]
        shape = value.shape
        if shape is None or len(shape) == 0:
            return ("value", id(value))  # unknown: equal only to itself
        d = shape[0]
        if isinstance(d, int):
            return d
        return ("symbol", d.value) if getattr(d, "value", None) is not None else ("value", id(value))

    def describe(self, value: ir.Value):
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if any(o is not None and (o.uses() or o.is_graph_output()) for o in node.outputs[1:]):
            return None  # its other outputs are read: the node stays
        if node.op_type in _QUANTIZED or self._touches_quantized(node):
            raise Declined("quantized (Q/DQ) region")
        read = getattr(self, "_" + node.op_type, None)
        return read(node) if read is not None else None

    def _touches_quantized(self, node: ir.Node) -> bool:
        ins = [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
        outs = [u.node for o in node.outputs for u in o.uses()]
        return any(n.op_type in _QUANTIZED for n in ins + outs)

    # -- helpers
    def _input(self, node: ir.Node, index: int = 0) -> ir.Value:
        v = node.inputs[index]
        if v is None or const_array(v) is not None:
            raise Declined("input is a constant")
        return v

    def _const(self, node: ir.Node, index: int, what: str, optional: bool = False) -> np.ndarray | None:
        v = node.inputs[index] if index < len(node.inputs) else None
        if v is None:
            if optional:
                return None
            raise Declined(f"{what} is missing")
        if overridable(v):
            raise Declined(f"{what} {OVERRIDABLE}")
        arr = const_array(v)
        if arr is None:
            raise Declined(f"{what} is not a constant")
        return arr

    def _cr(self, value: ir.Value):
        cr = self.channels_and_rank(value)
        if cr is None:
            raise Declined("input shape or channel count unknown")
        return cr

    @staticmethod
    def _onnx_pads(pads: list[int], rank: int) -> A.Pads:
        """ONNX pads run [x1_begin, x2_begin, ..., x1_end, x2_end]."""
        if not pads:
            return ((0, 0),) * rank
        return tuple((pads[d], pads[d + rank]) for d in range(rank))

    def _auto_pad(self, node, x, kernel, stride, dilation, pads):
        mode = node.attributes.get_string("auto_pad", "NOTSET")
        rank = len(kernel)
        if mode in ("NOTSET", ""):
            return self._onnx_pads(pads, rank)
        if mode == "VALID":
            return ((0, 0),) * rank
        dims = _dims(x)
        out = []
        for d in range(rank):
            extent = dilation[d] * (kernel[d] - 1) + 1
            if stride[d] == 1:
                total = extent - 1
            else:  # total padding depends on the input size
                h = dims[2 + d] if dims else None
                if h is None:
                    raise Declined(f"auto_pad={mode} with stride > 1 and a dynamic input size")
                total = max((-(-h // stride[d]) - 1) * stride[d] + extent - h, 0)
            small, big = total // 2, total - total // 2
            out.append((small, big) if mode == "SAME_UPPER" else (big, small))
        return tuple(out)

    # -- readers (named after op types)
    def _Conv(self, node):
        x = self._input(node)
        w = self._const(node, 1, "conv weight")
        b = self._const(node, 2, "conv bias", optional=True)
        rank = w.ndim - 2
        a = node.attributes
        kernel = tuple(w.shape[2:])
        stride = tuple(a.get_ints("strides", [1] * rank))
        dilation = tuple(a.get_ints("dilations", [1] * rank))
        pads = self._auto_pad(node, x, kernel, stride, dilation, list(a.get_ints("pads", [])))
        return Affine(x, A.conv(w, b, stride, pads, dilation, a.get_int("group", 1)))

    def _BatchNormalization(self, node):
        x = self._input(node)
        if node.attributes.get_int("training_mode", 0):
            raise Declined("BatchNorm in training mode uses batch statistics")
        if opset(self.graph) < 14 and any(o is not None for o in node.outputs[1:]):
            raise Declined("BatchNorm with training outputs (opset <= 13) uses batch statistics")
        scale, bias, mean, var = (self._const(node, i, "BatchNorm parameters") for i in range(1, 5))
        eps = node.attributes.get_float("epsilon", 1e-5)
        return Affine(x, A.batchnorm(mean, var, scale, bias, eps, self._cr(x)[1]))

    def _Identity(self, node):
        x = self._input(node)
        return Affine(x, A.identity(*self._cr(x)))

    def _Dropout(self, node):
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            mode = const_array(node.inputs[2])
            if mode is None or bool(mode):
                return None
        return self._Identity(node)

    def _elementwise(self, node, kind):
        a, b = node.inputs[0], node.inputs[1]
        for v in (a, b):
            if overridable(v):
                raise Declined(f"{kind} operand {v.name} {OVERRIDABLE}")
        ca, cb = const_array(a), const_array(b)
        if ca is None and cb is None:
            if kind in ("add", "sub"):
                # No shape test: shape inference names equal dynamic dims differently.  The planner
                # only sums maps of one source whose channels and output sizes agree, so no
                # broadcasting can hide behind an accepted sum.
                return Sum((a, b), (1.0, 1.0 if kind == "add" else -1.0))
            return None
        if ca is not None and cb is not None:
            return None
        x, c, const_first = (a, cb, False) if cb is not None else (b, ca, True)
        channels, rank = self._cr(x)
        op = A.elementwise(kind, A.channel_vector(c, rank + 2, channels), const_first, rank)
        return None if op is None else Affine(x, op)

    def _Add(self, node):
        return self._elementwise(node, "add")

    def _Sub(self, node):
        return self._elementwise(node, "sub")

    def _Mul(self, node):
        if any(overridable(v) for v in node.inputs[:2]):
            return self._elementwise(node, "mul")  # declines, naming the input
        if node.inputs[0] is not node.inputs[1] and all(
                v is not None and const_array(v) is None for v in node.inputs[:2]):
            return self._scaled(node)
        return self._elementwise(node, "mul")

    def _scaled(self, node):
        """x * s with s a per-sample scalar [N, 1, ...] computed from data (a dynamic conv's attention)."""
        a, b = node.inputs[0], node.inputs[1]
        for x, s in ((a, b), (b, a)):
            xd, sd = _dims(x), _dims(s)
            if xd is None or sd is None or len(xd) != len(sd) or len(xd) < 2 or any(d != 1 for d in sd[1:]):
                continue
            if self.channels_and_rank(x) is not None and self.batch_key(s) == self.batch_key(x):
                return Scaled(x, s)
        return None

    # -- activations (patterns.channels carries per-channel constants through them)
    def _pointwise(self, node, fn):
        return Pointwise(self._input(node), fn)

    def _Relu(self, node):
        return self._pointwise(node, ACTIVATIONS["relu"])

    def _Sigmoid(self, node):
        return self._pointwise(node, ACTIVATIONS["sigmoid"])

    def _Tanh(self, node):
        return self._pointwise(node, ACTIVATIONS["tanh"])

    def _HardSwish(self, node):
        return self._pointwise(node, ACTIVATIONS["hardswish"])

    def _HardSigmoid(self, node):
        a = node.attributes
        alpha, beta = a.get_float("alpha", 0.2), a.get_float("beta", 0.5)
        if not (np.isclose(alpha, 1 / 6, rtol=1e-6) and beta == 0.5):
            return None  # torch's hardsigmoid only: the form patterns.channels names
        return self._pointwise(node, ACTIVATIONS["hardsigmoid"])

    def _Clip(self, node):
        if "min" in node.attributes or "max" in node.attributes:  # opset < 11
            low, high = node.attributes.get_float("min", None), node.attributes.get_float("max", None)
        else:
            bounds = []
            for i in (1, 2):
                v = node.inputs[i] if i < len(node.inputs) else None
                c = None if v is None else const_array(v)
                if v is not None and c is None:
                    return None  # data-dependent bounds
                bounds.append(None if c is None else float(c.reshape(())))
            low, high = bounds
        return self._pointwise(node, clip(low, high))

    def _Div(self, node):
        return self._elementwise(node, "div")

    def _Neg(self, node):
        x = self._input(node)
        c, rank = self._cr(x)
        return Affine(x, A.per_channel(-np.ones(c), np.zeros(c), rank))

    def _Concat(self, node):
        dims = _dims(node.outputs[0])
        axis = node.attributes.get_int("axis", 0)
        if dims is None or len(dims) < 2 or axis not in (1, 1 - len(dims)):
            return None
        if any(v is None or const_array(v) is not None for v in node.inputs):
            return None
        return Concat(tuple(node.inputs))

    def _Gemm(self, node):
        a = node.attributes
        if a.get_int("transA", 0):
            return None
        x = self._input(node)
        if _dims(x) is None or len(_dims(x)) != 2:
            raise Declined("Gemm input is not [N, C]")
        w = self._const(node, 1, "Gemm weight") * a.get_float("alpha", 1.0)
        w = w if a.get_int("transB", 0) else w.T  # [O, I]
        c = self._const(node, 2, "Gemm bias", optional=True)
        bias = None
        if c is not None:
            if c.size not in (1, w.shape[0]) or (c.ndim == 2 and c.shape[0] != 1):
                raise Declined("Gemm bias is not per-output")
            bias = np.broadcast_to(c.reshape(-1) * a.get_float("beta", 1.0), (w.shape[0],))
        return Affine(x, A.linear(w, bias))

    def _MatMul(self, node):
        x = self._input(node)
        w = self._const(node, 1, "MatMul weight")
        if w.ndim != 2 or _dims(x) is None or len(_dims(x)) != 2:
            raise Declined("MatMul is not [N, I] x [I, O]")
        return Affine(x, A.linear(w.T))  # [O, I]

    def _AveragePool(self, node):
        x = self._input(node)
        a = node.attributes
        kernel = tuple(a.get_ints("kernel_shape"))
        rank = len(kernel)
        stride = tuple(a.get_ints("strides", [1] * rank))
        if any(d != 1 for d in a.get_ints("dilations", [1] * rank)):
            raise Declined("dilated average pool")
        pads = self._auto_pad(node, x, kernel, stride, (1,) * rank, list(a.get_ints("pads", [])))
        channels, xr = self._cr(x)
        if xr != rank:
            raise Declined("pool rank differs from the input's")
        if a.get_string("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER") and any(p != (0, 0) for p in pads):
            raise Declined("auto_pad SAME average pool never counts its padding")
        dims = _dims(x)
        return Affine(x, A.avg_pool(channels, rank, kernel, stride, pads,
                                    count_include_pad=bool(a.get_int("count_include_pad", 0)),
                                    ceil_mode=bool(a.get_int("ceil_mode", 0)), input_size=dims[2:]))

    def _pad_geometry(self, node) -> tuple[ir.Value, A.Pads, float]:
        x = self._input(node)
        if node.attributes.get_string("mode", "constant") != "constant":
            raise Declined(f"{node.attributes.get_string('mode')} padding")
        dims = _dims(x)
        if dims is None:
            raise Declined("input rank unknown")
        pads = [int(p) for p in self._const(node, 1, "pads").reshape(-1)]
        value = self._const(node, 2, "pad value", optional=True) if len(node.inputs) > 2 else None
        axes = self._const(node, 3, "pad axes", optional=True) if len(node.inputs) > 3 else None
        n = len(dims)
        full = [0] * (2 * n)
        for i, axis in enumerate(range(n) if axes is None else [int(a) % n for a in axes.reshape(-1)]):
            k = len(pads) // 2
            full[axis], full[axis + n] = pads[i], pads[i + k]
        if full[0] or full[1] or full[n] or full[n + 1]:
            raise Declined("padding touches batch or channel dims")
        if any(p < 0 for p in full):
            raise Declined("negative padding crops the input")
        spatial = tuple((full[d], full[d + n]) for d in range(2, n))
        return x, spatial, 0.0 if value is None else float(value.reshape(()))

    def _Pad(self, node):
        if any(u.node.op_type in _BORDER_WRITE for u in node.outputs[0].uses()):
            return None  # the border writes that follow decide what this is
        x, pads, value = self._pad_geometry(node)
        return padded(x, self._cr(x)[0], pads, value)

    def _ScatterND(self, node):
        return self._border_fill(node)

    def _Transpose(self, node):
        return self._border_fill(node)

    def _border_fill(self, last: ir.Node):
        """Pad, then ScatterNDs (between Transposes) that write every border: padding with a per-channel constant.

        This is how the torch exporters write DBB's BN-and-pad layer.  The writes
        are replayed on a NaN-filled array of the padded shape and judged by
        `patterns.borders.border_fill`.
        """
        out = last.outputs[0]
        if any(u.node.op_type in _BORDER_WRITE for u in out.uses()) and self.single_consumer(out):
            return None  # not the end of the chain
        chain = [last]
        data = last.inputs[0]
        while data.producer() is not None and data.producer().op_type in _BORDER_WRITE:
            if not self.single_consumer(data):
                raise Declined("intermediate border write is read elsewhere")
            chain.append(data.producer())
            data = data.producer().inputs[0]
        pad = data.producer()
        if pad is None or pad.op_type != "Pad" or not any(n.op_type == "ScatterND" for n in chain):
            return None
        if not self.single_consumer(data):
            raise Declined("padded tensor is read before its border is written")
        x, pads, _ = self._pad_geometry(pad)
        shape = _dims(data)
        if shape is None or None in shape:
            raise Declined("border writes on a tensor of dynamic size")
        filled = np.full(shape, np.nan)
        axes = np.arange(len(shape))
        for step in reversed(chain):  # earliest first
            if step.op_type == "Transpose":
                perm = list(step.attributes.get_ints("perm", list(range(len(shape)))[::-1]))
                filled, axes = np.transpose(filled, perm), axes[perm]
                continue
            if step.attributes.get_string("reduction", "none") != "none":
                raise Declined("ScatterND with reduction")
            idx = self._const(step, 1, "scatter indices").astype(np.int64)
            upd = self._const(step, 2, "scatter updates").astype(np.float64)
            k = idx.shape[-1]
            filled[tuple(np.moveaxis(idx, -1, 0))] = upd.reshape(idx.shape[:-1] + filled.shape[k:])
        if list(axes) != list(range(len(shape))):
            raise Declined("border writes end in a transposed layout")
        fill = border_fill(filled, pads)
        self.attached[out] = [pad] + chain[1:]
        stored = self._const(chain[0] if chain[0].op_type == "ScatterND" else
                             next(n for n in chain if n.op_type == "ScatterND"), 2, "scatter updates").dtype
        return PadWith(x, pads, fill, precision(np.finfo(stored).eps))


_BORDER_WRITE = ("ScatterND", "Transpose")


# ---------------------------------------------------------------- writing back

def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _unique(graph: ir.Graph, base: str, taken: set[str]) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _shape_with(value: ir.Value, index: int, size) -> ir.Shape | None:
    """`value`'s shape with dim `index` replaced (None when the shape is unknown)."""
    if value.shape is None or len(value.shape) <= index:
        return None
    dims = list(value.shape)
    dims[index] = size
    return ir.Shape(dims)


def write_op(graph: ir.Graph, x: ir.Value, op: A.AffineConv, like: ir.Value, name: Callable[[str], str],
             stem: str, elementwise: bool = False) -> tuple[list[ir.Node], ir.Value]:
    """Nodes (not yet inserted) computing `op` on x, and their output, typed like `like` with op's channels.

    Rank 0 (x is [N, C]) follows `patterns.affine.linear_steps`: Gemm has no groups, so a grouped op is
    a dense Gemm or per-channel Mul / Add with [C] constants.  `elementwise`: a per-channel op of any
    rank is written as Mul + Add rather than as a depthwise Conv."""
    dtype = like.dtype.numpy() if like.dtype is not None and like.dtype.is_floating_point() else np.float32
    nodes: list[ir.Node] = []

    def const(what: str, array: np.ndarray) -> ir.Value:
        return _initializer(graph, name(f"{stem}.repfuse.{what}"), np.ascontiguousarray(array.astype(dtype)))

    def add(op_type: str, inputs, attrs=None) -> ir.Value:
        node = ir.node(op_type, inputs, attrs or {}, name=name(f"{stem}.repfuse.{op_type}"))
        nodes.append(node)
        out = node.outputs[0]
        out.name, out.type, out.shape = name(f"{stem}.repfuse.{op_type.lower()}"), like.type, \
            _shape_with(like, 1, op.out_channels)
        return out

    per = op.per_channel()
    if op.rank == 0:
        for kind, array in A.linear_steps(op):
            if kind == "linear":
                x = add("Gemm", [x, const("weight", array), const("bias", op.bias)], {"transB": 1})
            else:
                x = add("Mul" if kind == "mul" else "Add", [x, const("scale" if kind == "mul" else "shift", array)])
    elif per is not None and elementwise:
        shape = (-1,) + (1,) * op.rank  # [C, 1, ...]
        x = add("Mul", [x, const("scale", per[0].reshape(shape))])
        x = add("Add", [x, const("shift", per[1].reshape(shape))])
    else:
        x = add("Conv", [x, const("weight", op.weight), const("bias", op.bias)],
                {"kernel_shape": list(op.kernel), "strides": list(op.stride),
                 "pads": [p[0] for p in op.pads] + [p[1] for p in op.pads],
                 "dilations": list(op.dilation), "group": op.groups})
    return nodes, x


def apply_plan(view: OnnxView, onnx_plan: Plan, progress: Callable[[int, int], None] | None = None) -> None:
    graph = view.graph
    taken = {v.name for n in graph for v in n.outputs if v.name} | set(graph.initializers) | \
        {v.name for v in graph.inputs if v.name}
    replaced: dict[ir.Value, ir.Value] = {}
    for i, region in enumerate(onnx_plan.regions):
        root, op = region.root, region.op
        source = replaced.get(region.source, region.source)
        stem = root.producer().name or root.name or f"region{i}"
        nodes, out = write_op(graph, source, op, root, lambda base: _unique(graph, base, taken), stem)
        out.shape, out.type = root.shape, root.type
        for node in nodes:
            graph.insert_before(root.producer(), node)
        old_name = root.name
        ir.convenience.replace_all_uses_with(root, out, replace_graph_outputs=True)
        if root.is_graph_output() or any(o is out for o in graph.outputs):
            root.name = None
            out.name = old_name  # graph outputs keep their names
        replaced[root] = out
        doomed = []
        for v in region.nodes:
            doomed.extend(view.attached.get(v, []))
            doomed.append(v.producer())
        graph.remove(set(doomed), safe=True)  # also detaches them from their inputs
        if progress:
            progress(i + 1, len(onnx_plan.regions))


def fuse_model(model: ir.Model, max_rounds: int = 8, progress=None) -> tuple[list[RegionRow], dict[str, str]]:
    """Fuse every affine region of the main graph in place, to a fixed point.  Returns (regions, declined)."""
    rows: list[RegionRow] = []
    declined: dict[str, str] = {}
    for _ in range(max_rounds):
        view = OnnxView(model.graph)
        onnx_plan = plan(view)
        declined.update({_label(k): v for k, v in onnx_plan.declined.items()})
        if not onnx_plan.regions:
            break
        rows += [_row(r) for r in onnx_plan.regions]
        apply_plan(view, onnx_plan, progress)
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return rows, declined


def _label(value: ir.Value) -> str:
    node = value.producer()
    return f"{node.op_type} {node.name or value.name}" if node is not None else str(value.name)


def _row(region: Region) -> RegionRow:
    from collections import Counter

    kinds = Counter(v.producer().op_type for v in region.nodes)
    text = ", ".join(f"{k} x{c}" if c > 1 else k for k, c in sorted(kinds.items()))
    return RegionRow(_label(region.root), str(region.source.name), len(region.nodes), text, describe_op(region.op))


# ---------------------------------------------------------------- statistics

def graph_stats(model: ir.Model) -> GraphStats:
    """Ops by type, conv/gemm count, MACs per sample (where shapes are static), constant elements."""
    stats = GraphStats()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        stats.ops[node.op_type] += 1
        if node.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
            w = node.inputs[1] if len(node.inputs) > 1 else None
            w = None if w is None else ir.convenience.get_const_tensor(w)  # overridable defaults count too
            size = None if w is None else int(w.size)
            if w is None and node.op_type == "Conv" and "repfuse.samples" in node.metadata_props:
                # a dynamic conv's per-sample kernels ([N*O, I/g, *k], the batch as groups): count one sample
                dims = _dims(node.inputs[1])
                if dims and None not in dims:
                    size = int(np.prod(dims, dtype=np.int64)) // int(node.metadata_props["repfuse.samples"])
            if node.op_type != "MatMul":  # a Conv / Gemm whose weight is computed (unfolded slices) still counts
                stats.convs += 1
            if size is None:
                continue
            if node.op_type == "MatMul":
                stats.convs += 1
            out = _dims(node.outputs[0])
            if out and None not in out[2 if node.op_type.startswith("Conv") else 1:]:
                positions = int(np.prod(out[2:], dtype=np.int64)) if node.op_type.startswith("Conv") else 1
                stats.macs += positions * size
    stats.params = sum(int(v.const_value.size) for v in model.graph.initializers.values()
                       if v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point())
    return stats
