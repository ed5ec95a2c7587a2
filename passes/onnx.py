"""ONNX reader (onnx_ir): READERS maps an op type to what it means to the rules, in ONNX's vocabulary (initializers
and Constant nodes are constants, attributes carry geometry, broadcasting decides what is per-channel);
`OnnxView.foldable` is ONNX's folding policy.  Custom domains, Q/DQ regions and unknown ops pass through."""

from __future__ import annotations

from contextlib import suppress

import numpy as np
import onnx
import onnx_ir as ir

from ..patterns import affine
from ..patterns.affine import Declined
from ..patterns.borders import band, border_fill, border_fill_of_writes, scatter_write
from ..patterns.channels import ACTIVATIONS, clip
from ..patterns.planner import (Affine, Concat, Layout, PadWith, Permute, Pointwise, Regroup, Scaled, Sum,
                                Transposed, describe_or_none, keeps_channels_last, need_layout, padded, precision,
                                read_once, splits_channels)
from ..patterns.report import GraphStats
from ..patterns.shapes import Lin, Sym
from .onnx_sizes import Sizes

__all__ = ["OnnxView", "READERS", "graph_stats"]

QUANTIZED = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear"}
OVERRIDABLE = "is a graph input (overridable default)"


def _const_tensor(value: ir.Value):
    """The tensor an initializer or Constant node gives `value`, else None (data not read yet)."""
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is None or producer.op_type != "Constant" or producer.domain not in ("", "ai.onnx"):
        return None
    attr = producer.attributes.get("value")  # the exporters' form, read directly: get_const_tensor is slow
    if attr is not None and attr.type == ir.AttributeType.TENSOR:
        return attr.value
    return ir.convenience.get_const_tensor(value)  # value_float, value_ints, ...


def _constant(value: ir.Value | None) -> bool:  # const_array(value) is not None, without reading external data
    return value is not None and not value.is_graph_input() and _const_tensor(value) is not None


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant an input holds (initializer or Constant node), else None.  An initializer that is also
    a graph input (IR >= 4) is a default the caller may override: a runtime input, never a constant."""
    return _const_tensor(value).numpy() if _constant(value) else None


def overridable(value: ir.Value | None) -> bool:
    return value is not None and value.is_graph_input() and value.const_value is not None


def opset(graph: ir.Graph) -> int:
    return graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", onnx.defs.onnx_opset_version()))


def _dims(value: ir.Value) -> list | None:
    return None if value.shape is None else [d if isinstance(d, int) else None for d in value.shape]


def _used(values) -> bool:
    return any(v is not None and (v.uses() or v.is_graph_output()) for v in values)


_KEEPS_BATCH = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softmax", "LogSoftmax",
                "Identity", "Dropout", "Cast", "BatchNormalization", "Conv", "ConvTranspose", "MaxPool", "AveragePool",
                "GlobalAveragePool", "GlobalMaxPool", "InstanceNormalization", "LayerNormalization", "Neg", "Abs",
                "Exp", "Sqrt", "Erf", "Elu", "Selu", "Softplus", "Gelu"}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "Squeeze"}


def _carried_batch(node: ir.Node, key):
    """The batch key of `node`'s first output when it is provably its input's dim 0, else None (the batch of a
    dynamic conv's attention)."""
    op, ins, a = node.op_type, node.inputs, node.attributes
    if node.domain not in ("", "ai.onnx") or not ins or ins[0] is None:
        return None
    xd, od = _dims(ins[0]), _dims(node.outputs[0])
    ok = op in _KEEPS_BATCH or op == "Gemm" and not a.get_int("transA", 0) or op == "Flatten" and a.get_int("axis", 1)
    if op == "MatMul":
        ok = len(xd or ()) >= 2 and ins[1] is not None and len(ins[1].shape or ()) == 2
    elif op == "Reshape":
        shape = const_array(ins[1])
        if shape is None or shape.size == 0 or xd is None or a.get_int("allowzero", 0):
            return None
        shape = [int(d) for d in shape.reshape(-1)]
        rest = [xd[i] if d == 0 and i < len(xd) else d for i, d in enumerate(shape)][1:]
        # 0 copies the input's dim; x is [N, static...]: -1 is N when the other dims hold all of x's elements
        ok = shape[0] == 0 or shape[0] == -1 and None not in xd[1:] and all(d > 0 for d in rest) and \
            int(np.prod(xd[1:], dtype=np.int64)) == int(np.prod(rest, dtype=np.int64))
    elif ok or not xd or not od:
        pass
    elif op in _REDUCE or op == "Unsqueeze":
        c = const_array(ins[1]) if len(ins) > 1 else None  # axes: attribute, or an input from opset 13 on
        axes = list(a.get_ints("axes")) if "axes" in a else None if c is None else [int(v) for v in c.reshape(-1)]
        n = len(od if op == "Unsqueeze" else xd)
        ok = axes is not None and (bool(axes) or op == "Unsqueeze") and all(ax % n != 0 for ax in axes)
    elif op in ("Gather", "Concat"):  # a Concat's inputs all carry the same batch
        ok = a.get_int("axis", 0) % len(xd) != 0 and (op == "Gather" or len({key(v) for v in ins}) == 1)
    elif op == "Transpose":
        ok = list(a.get_ints("perm", range(len(xd))[::-1]))[:1] == [0]
    elif op in ("Add", "Sub", "Mul", "Div") and len(ins) == 2 and all(v is not None for v in ins) \
            and all(v.shape is not None for v in ins):
        # broadcasting from the right does not reach dim 0; a size-1 batch broadcasts
        keys = {key(v) for v in ins if len(v.shape) == len(od) and not (_dims(v)[0] == 1 and od[0] != 1)}
        return keys.pop() if len(keys) == 1 else None
    return key(ins[0]) if ok else None


_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli"}
_GROWTH = 64 * 1024  # a fold may add this many bytes over its constant inputs (Expand, Tile, ConstantOfShape)


def _may_fold(node: ir.Node) -> bool:
    return (node.domain in ("", "ai.onnx") and node.op_type not in QUANTIZED | _NONDETERMINISTIC | {"Constant"}
            and any(v is not None for v in node.inputs)
            and not any(t.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for t in node.attributes.values())
            # Q/DQ regions pass through, even on weights (a Transpose of an int8 weight is part of one)
            and not any(u.node.op_type in QUANTIZED for o in node.outputs for u in o.uses()))


def _fold(graph: ir.Graph) -> dict[ir.Value, np.ndarray]:
    """Every value computed from constants only, with its array.  The candidates run in one onnx.reference
    evaluation; a node the evaluator cannot run, or whose output outgrows its inputs (unless it only ever becomes
    a weight), stays with all it feeds."""
    order, produced, dtype_only = [], set(), set()
    for node in graph:
        like = _dtype_read(node)
        if _may_fold(node) and all(v is None or v in produced or _constant(v) or v is like for v in node.inputs):
            order.append(node)
            produced.update(node.outputs)
            if like is not None:
                dtype_only.add(like)
    leaves = dict.fromkeys(v for node in order for v in node.inputs if v is not None and v not in produced)
    # the constants the candidates read; an input read for its dtype only is fed as an empty array
    leaves = {v: np.empty(0, v.dtype.numpy()) if v in dtype_only and not _constant(v) else const_array(v)
              for v in leaves}
    known, results = dict(leaves), _evaluate(order, leaves, graph.opset_imports) if order else {}
    weights = _weight_bound(order)
    for node in order:
        ins = [v for v in node.inputs if v is not None]
        outs = [results.get(o) for o in node.outputs]
        if all(v in known for v in ins) and all(isinstance(o, np.ndarray) and o.dtype.kind in "fiub" for o in outs) \
                and (all(o in weights for o in node.outputs)
                     or sum(o.nbytes for o in outs) <= sum(known[v].nbytes for v in ins) + _GROWTH):
            known.update(zip(node.outputs, outs))
    return {v: a for v, a in known.items() if v not in leaves and not v.is_graph_output()}


_WEIGHT_SLOTS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def _weight_bound(order: list[ir.Node]) -> set[ir.Value]:
    """Fold candidates' outputs that only ever become a conv's or linear's weight (OREPA's outer-product
    weights): their size is the weight's, so the growth limit does not apply to them."""
    candidates, bound = set(order), set()
    for node in reversed(order):
        for out in node.outputs:
            uses = list(out.uses())
            if uses and all(_WEIGHT_SLOTS.get(u.node.op_type) == u.idx or
                            (u.node in candidates and all(o in bound for o in u.node.outputs)) for u in uses):
                bound.add(out)
    return bound


def _dtype_read(node: ir.Node) -> ir.Value | None:
    """CastLike's second input, of which only the element type matters (the exporters' `CastLike(0, x)`
    zero bias): a constant once that type is known."""
    if node.op_type == "CastLike" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2:
        like = node.inputs[1]
        if like is not None and like.dtype is not None:
            with suppress(Exception):
                like.dtype.numpy()
                return like
    return None


def _evaluate(order: list[ir.Node], leaves: dict, opsets: dict[str, int]) -> dict:
    """Outputs of `order` (topologically sorted) from the constant `leaves`; values that fail are missing."""
    from onnx.reference import ReferenceEvaluator

    local: dict[ir.Value, str] = {}
    name = lambda v: "" if v is None else local.setdefault(v, f"v{len(local)}")  # noqa: E731
    ids = [onnx.helper.make_opsetid(d, v) for d, v in opsets.items() if d in ("", "ai.onnx")]
    protos = [ir.serde.serialize_node(node) for node in order]
    for proto, node in zip(protos, order):  # local names: the graph's may be empty or repeat across scopes
        proto.input[:], proto.output[:] = map(name, node.inputs), map(name, node.outputs)
    feeds = {name(v): a for v, a in leaves.items()}

    def run(nodes, outs: list[ir.Value]) -> dict:
        inputs = sorted({i for p in nodes for i in p.input if i in feeds})
        info = onnx.helper.make_empty_tensor_value_info
        g = onnx.helper.make_graph(nodes, "fold", [info(i) for i in inputs], [info(name(o)) for o in outs])
        model = onnx.helper.make_model(g, opset_imports=ids)
        return dict(zip(outs, ReferenceEvaluator(model).run(None, {i: feeds[i] for i in inputs})))

    with suppress(Exception):  # the common case: everything at once
        return run(protos, [o for n in order for o in n.outputs])
    results = {}  # one node at a time, skipping what fails
    for node, proto in zip(order, protos):
        with suppress(Exception):
            if all(i in feeds for i in proto.input if i):
                results.update(got := run([proto], list(node.outputs)))
                feeds.update((name(o), a) for o, a in got.items())
    return results


_SAME_AXES = {"Add", "Sub", "Mul", "Div", "Neg", "Identity", "Dropout", "Relu", "Sigmoid", "Tanh", "HardSwish",
              "HardSigmoid", "Clip"}  # the output is read on its inputs' axes
_CHANNELS_FIRST = {"Conv", "ConvTranspose", "BatchNormalization", "AveragePool", "Pad", "ScatterND", "Concat"}
_BORDER_WRITE = ("ScatterND", "Transpose")


class OnnxView:
    """The rules' view of an onnx_ir graph; a key is a node's output value."""

    def __init__(self, graph: ir.Graph):
        self.graph, self._values, self._described = graph, [o for n in graph for o in n.outputs], {}
        self._batch = self._folded = self._last = None  # computed when first asked

    def values(self):
        return self._values

    def single_consumer(self, value: ir.Value) -> bool:
        return not value.is_graph_output() and len(value.uses()) == 1

    def readers(self, value: ir.Value):
        nodes = [u.node for u in value.uses()]
        if value.is_graph_output() or any(n.graph is not self.graph or _used(n.outputs[1:]) for n in nodes):
            return None  # a graph output, a subgraph, or a node whose other outputs are read
        return [self._pair(n) or n.outputs[0] for n in nodes]

    def layout(self, value: ir.Value) -> Layout | None:
        dims = _dims(value)
        if dims is None or len(dims) < 2 or value.dtype is not None and not value.dtype.is_floating_point():
            return None
        last = len(dims) > 2 and self._channels_last().get(value, False)  # None: read both ways
        c = dims[-1] if last else dims[1]
        return None if last is None or c is None else Layout(c, 0 if last else len(dims) - 2)

    def foldable(self, value: ir.Value) -> bool:
        self._folded = _fold(self.graph) if self._folded is None else self._folded
        return value in self._folded

    def folded(self, value: ir.Value) -> np.ndarray:
        return self._folded[value]

    def label(self, value: ir.Value) -> str:
        node = value.producer()
        return f"{node.op_type} {node.name or value.name}" if node is not None else str(value.name)

    def kind(self, value: ir.Value) -> str:
        return value.producer().op_type if value.producer() is not None else "input"

    def describe(self, value: ir.Value):
        return read_once(self._described, value, self._read)

    def _read(self, value: ir.Value):
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx") or value is not node.outputs[0] \
                or _used(node.outputs[1:]):
            return None  # only a node's first output is read, and only when the others are unused
        near = [v.producer() for v in node.inputs if v is not None] + [u.node for u in value.uses()]
        if node.op_type in QUANTIZED or any(n is not None and n.op_type in QUANTIZED for n in near):
            raise Declined("quantized (Q/DQ) region")
        reader = READERS.get(node.op_type)
        return None if reader is None else reader(self, node)

    def _channels_last(self) -> dict:
        """{value: True (channels last) or None (also read channels-first)}: classes of values joined by ops
        that keep their inputs' axes (and reshapes that keep the last dim); a class a MatMul or Gemm over the
        last dim reads or writes is channels-last."""
        if self._last is None:
            parent: dict = {}

            def find(v):
                while parent.setdefault(v, v) is not v:
                    parent[v] = v = parent[parent[v]]
                return v

            last, first, transposes = [], [], []
            for node in self.graph:
                ins = [v for v in node.inputs if v is not None and not _constant(v)]
                if not ins:
                    continue
                if node.op_type in _SAME_AXES or (node.op_type in ("Reshape", "Flatten")
                                                  and keeps_channels_last(*map(_dims, (ins[0], node.outputs[0])))):
                    for v in ins[:1] if node.op_type in ("Reshape", "Flatten") else ins:
                        parent[find(v)] = find(node.outputs[0])
                elif node.op_type in ("MatMul", "Gemm") and _constant(node.inputs[1]) and \
                        not node.attributes.get_int("transA", 0):
                    last += [ins[0], node.outputs[0]]
                elif node.op_type in _CHANNELS_FIRST:
                    first += ins + [node.outputs[0]]
                elif node.op_type == "Transpose" and len(node.inputs[0].shape or ()) > 2:
                    transposes.append(node)
            roots, mixed = {find(v) for v in last}, {find(v) for v in first if len(v.shape or ()) > 2}
            roots |= _to_channels_last(transposes, find, roots, {find(v) for v in first})
            self._last = {v: True if find(v) not in mixed else None for v in list(parent) if find(v) in roots}
        return self._last

    def _pair(self, node: ir.Node) -> ir.Value | None:
        """The Add read with this MatMul as one N-D linear (its description reads the MatMul's input), or None."""
        if node.op_type != "MatMul" or not self.single_consumer(node.outputs[0]):
            return None
        add = next(iter(node.outputs[0].uses())).node
        d = describe_or_none(self, add.outputs[0]) if add.op_type == "Add" else None
        return add.outputs[0] if isinstance(d, Affine) and d.input is not node.outputs[0] else None

    def batch_key(self, value: ir.Value):
        """Equal for two values exactly when their batch dims provably are: the static size, or the symbol of the
        tensor it was carried from (shape inference names the batch of Reshape(pi_k, [-1, 1, 1, 1]) afresh)."""
        if self._batch is None:
            self._batch = {}
            for node in self.graph:
                if (key := _carried_batch(node, self.batch_key)) is not None:
                    self._batch[node.outputs[0]] = key
        if value in self._batch:
            return self._batch[value]
        d = value.shape[0] if value.shape else None
        if isinstance(d, int):
            return d
        return ("symbol", d.value) if getattr(d, "value", None) is not None else ("value", id(value))

    def input(self, node: ir.Node) -> ir.Value:
        if node.inputs[0] is None or _constant(node.inputs[0]):
            raise Declined("input is a constant")
        return node.inputs[0]

    def const(self, node: ir.Node, index: int, what: str, optional: bool = False) -> np.ndarray | None:
        v = node.inputs[index] if index < len(node.inputs) else None
        arr = const_array(v)
        if arr is None and not (v is None and optional):
            raise Declined(f"{what} " + ("is missing" if v is None else OVERRIDABLE if overridable(v) else
                                         "is not a constant"))
        return arr

    def need_layout(self, value: ir.Value) -> Layout:
        """`planner.need_layout`, saying why when the value is read both channels-first and channels-last."""
        if self.layout(value) is None and self._channels_last().get(value, False) is None:
            raise Declined("input is read both channels-first and channels-last (a MatMul over its last dim)")
        return need_layout(self, value)

    def pads(self, node, x, kernel, stride, dilation) -> affine.Pads:
        """ONNX pads [x1_begin, x2_begin, ..., x1_end, x2_end], or what auto_pad gives."""
        mode, rank, dims = node.attributes.get_string("auto_pad", "NOTSET"), len(kernel), _dims(x) or []
        if mode == "VALID":
            return ((0, 0),) * rank
        if mode in ("NOTSET", ""):
            pads = list(node.attributes.get_ints("pads", [])) or [0] * 2 * rank
            return tuple((pads[d], pads[d + rank]) for d in range(rank))
        out = []
        for d in range(rank):
            extent = dilation[d] * (kernel[d] - 1) + 1
            h = dims[2 + d] if 2 + d < len(dims) else None
            if stride[d] != 1 and h is None:  # the total then depends on the input size
                raise Declined(f"auto_pad={mode} with stride > 1 and a dynamic input size")
            total = extent - 1 if stride[d] == 1 else max((-(-h // stride[d]) - 1) * stride[d] + extent - h, 0)
            out.append((total // 2, total - total // 2)[::1 if mode == "SAME_UPPER" else -1])
        return tuple(out)


def _conv(view: OnnxView, node):
    x, w, a = view.input(node), view.const(node, 1, "conv weight"), node.attributes
    stride, dilation = (tuple(a.get_ints(k, [1] * (w.ndim - 2))) for k in ("strides", "dilations"))
    pads, bias = view.pads(node, x, w.shape[2:], stride, dilation), view.const(node, 2, "conv bias", optional=True)
    return Affine(x, affine.conv(w, bias, stride, pads, dilation, a.get_int("group", 1)))


def _conv_transpose(view: OnnxView, node):
    x, w, a = view.input(node), view.const(node, 1, "ConvTranspose weight"), node.attributes  # w [I, O/g, *k]
    if "output_shape" in a or a.get_string("auto_pad", "NOTSET") not in ("NOTSET", "", "VALID"):
        raise Declined("ConvTranspose with output_shape or auto_pad SAME (padding follows the input size)")
    ones, zeros = [1] * (w.ndim - 2), [0] * (w.ndim - 2)
    stride, dilation = (tuple(a.get_ints(k, ones)) for k in ("strides", "dilations"))
    pads, bias = view.pads(node, x, w.shape[2:], stride, dilation), view.const(node, 2, "bias", optional=True)
    out_pad = tuple(a.get_ints("output_padding", zeros))
    return Transposed(x, affine.conv_transpose(w, bias, stride, pads, out_pad, dilation, a.get_int("group", 1)))


def _batchnorm(view: OnnxView, node):
    x = view.input(node)
    if node.attributes.get_int("training_mode", 0):
        raise Declined("BatchNorm in training mode uses batch statistics")
    if opset(view.graph) < 14 and any(o is not None for o in node.outputs[1:]):
        raise Declined("BatchNorm with training outputs (opset <= 13) uses batch statistics")
    scale, bias, mean, var = (view.const(node, i, "BatchNorm parameters") for i in range(1, 5))
    eps = node.attributes.get_float("epsilon", 1e-5)
    return Affine(x, affine.batchnorm(mean, var, scale, bias, eps, view.need_layout(x).rank))


def _identity(view: OnnxView, node):
    x, training = view.input(node), node.inputs[2] if node.op_type == "Dropout" and len(node.inputs) > 2 else None
    if training is not None and (not _constant(training) or bool(const_array(training))):
        return None  # training mode, or a mode given at run time
    return Affine(x, affine.scale(affine.identity(*view.need_layout(x)), -1.0 if node.op_type == "Neg" else 1.0))


def _elementwise(view: OnnxView, node):
    kind = node.op_type.lower()  # add, sub, mul, div
    a, b = node.inputs[0], node.inputs[1]
    if node.outputs[0].dtype is not None and not node.outputs[0].dtype.is_floating_point():
        return None  # size or index arithmetic: no tensor op to fuse
    for v in filter(overridable, (a, b)):
        raise Declined(f"{kind} operand {v.name} {OVERRIDABLE}")
    ca, cb = const_array(a), const_array(b)
    if ca is None and cb is None:
        if kind in ("add", "sub"):
            # No shape test: shape inference names equal dynamic dims differently.  The planner only
            # sums maps of one source whose channels and output sizes agree: no broadcast hides there.
            return Sum((a, b), (1.0, 1.0 if kind == "add" else -1.0))
        return _scaled(view, a, b) if kind == "mul" and a is not b else None
    if ca is not None and cb is not None:
        return None
    x, c = (a, cb) if cb is not None else (b, ca)
    layout = view.need_layout(x)
    vector = affine.channel_vector(c, len(x.shape), layout.channels, layout.rank)
    op = affine.elementwise(kind, vector, ca is not None, layout.rank)
    mm = x.producer()
    if op is not None and kind == "add" and len(x.shape) > layout.rank + 2 and mm is not None \
            and mm.op_type == "MatMul" and view.single_consumer(x):
        # MatMul + Add is how ONNX writes an N-D linear (and how it is written back): read as one op,
        # so that a linear alone is a fixed point
        try:
            inner = _matmul(view, mm)
        except Declined:
            return Affine(x, op)
        return Affine(inner.input, affine.compose(op, inner.op))
    return None if op is None else Affine(x, op)


def _scaled(view: OnnxView, a: ir.Value, b: ir.Value):
    """x * s with s a per-sample scalar [N, 1, ...] computed from data (a dynamic conv's attention)."""
    for x, s in ((a, b), (b, a)):
        xd, sd = _dims(x), _dims(s)
        if xd and sd and len(xd) == len(sd) >= 2 and all(d == 1 for d in sd[1:]) and view.layout(x) is not None \
                and view.batch_key(s) == view.batch_key(x):
            return Scaled(x, s)
    return None


def _pointwise(view: OnnxView, node):
    """An activation: Clip with constant bounds, HardSigmoid in torch's form (the one patterns.channels names)."""
    a, bounds = node.attributes, [node.inputs[i] if i < len(node.inputs) else None for i in (1, 2)]
    if node.op_type == "Clip" and ("min" in a or "max" in a):  # opset < 11
        fn = clip(a.get_float("min", None), a.get_float("max", None))
    elif node.op_type == "Clip" and any(v is not None and not _constant(v) for v in bounds):
        return None  # data-dependent bounds
    elif node.op_type == "Clip":
        fn = clip(*(None if v is None else float(const_array(v).reshape(())) for v in bounds))
    elif node.op_type != "HardSigmoid" or (np.isclose(a.get_float("alpha", 0.2), 1 / 6, rtol=1e-6)
                                           and a.get_float("beta", 0.5) == 0.5):
        fn = ACTIVATIONS[node.op_type.lower()]
    else:
        return None
    return Pointwise(view.input(node), fn)


def _concat(view: OnnxView, node):
    n, inputs = len(node.outputs[0].shape or ()), tuple(node.inputs)
    on_channels = n >= 2 and node.attributes.get_int("axis", 0) in (1, 1 - n)
    return Concat(inputs) if on_channels and not any(v is None or _constant(v) for v in inputs) else None


def _to_channels_last(transposes, find, roots: set, first: set) -> set:
    """Classes a Transpose makes channels-last: it moves axis 1 of a channels-first value (one a channels-first
    op reads or writes) to the end ([B, C, N] -> [B, N, C] after a BatchNorm1d)."""
    out = set()
    for node in transposes:
        x, perm = node.inputs[0], _perm(node)
        if perm[-1] == 1 and find(x) in first and find(x) not in roots | out:
            out.add(find(node.outputs[0]))
    return out


def _perm(node: ir.Node) -> tuple[int, ...]:
    return tuple(node.attributes.get_ints("perm", list(range(len(node.inputs[0].shape)))[::-1]))


def _gemm(view: OnnxView, node):
    """Y = alpha * A' B' + beta * C, a linear over A's last axis; with transA=1 over A's first (A is [K, M]), read
    as a Permute: the linear of A's transpose (ops before it act on A's axis 1, not the axis the Gemm reads)."""
    a = node.attributes
    x = view.input(node)
    if len(x.shape or ()) != 2:
        raise Declined("Gemm input is not [N, C]")
    w = view.const(node, 1, "Gemm weight") * a.get_float("alpha", 1.0)
    w = w if a.get_int("transB", 0) else w.T  # [O, I]
    c = view.const(node, 2, "Gemm bias", optional=True)
    if c is not None and (c.size not in (1, w.shape[0]) or c.ndim == 2 and c.shape[0] != 1):
        raise Declined("Gemm bias is not per-output")
    bias = None if c is None else np.broadcast_to(c.reshape(-1) * a.get_float("beta", 1.0), (w.shape[0],))  # [O]
    return Permute(x, (1, 0), affine.linear(w, bias)) if a.get_int("transA", 0) else Affine(x, affine.linear(w, bias))


def _matmul(view: OnnxView, node):
    x, w = view.input(node), view.const(node, 1, "MatMul weight")
    layout = view.layout(x)
    if w.ndim != 2 or layout is None or layout.rank != 0:
        raise Declined("MatMul is not [..., I] x [I, O] over its input's channels")
    return Affine(x, affine.linear(w.T))  # [O, I]


def _regroup(view: OnnxView, node):
    """Reshape / Flatten that only regroups the leading dims of a channels-last value ([B, N, C] -> [B*N, C])."""
    x = node.inputs[0]
    before, after = (None, None) if x is None or _constant(x) else (view.layout(x), view.layout(node.outputs[0]))
    if before is not None and before == after and before.rank == 0:
        return Regroup(x)
    if reason := splits_channels(_dims(x), _dims(node.outputs[0]), before):
        raise Declined(reason)
    return None


def _transpose(view: OnnxView, node):
    """A Transpose: part of DBB's border writes when a Pad or ScatterND is next to it, else a view (`Permute`)."""
    near, up = [u.node for u in node.outputs[0].uses()], node
    while up is not None and up.op_type in _BORDER_WRITE:
        near.append(up)
        up = None if up.inputs[0] is None else up.inputs[0].producer()
    if any(n.op_type == "ScatterND" for n in near) or up is not None and up.op_type == "Pad":
        return _border_fill(view, node)
    x = node.inputs[0]
    return None if x is None or _constant(x) or x.shape is None else Permute(x, _perm(node))


def _average_pool(view: OnnxView, node):
    x, a = view.input(node), node.attributes
    kernel = tuple(a.get_ints("kernel_shape"))
    stride = tuple(a.get_ints("strides", [1] * len(kernel)))
    if any(d != 1 for d in a.get_ints("dilations", [1] * len(kernel))):
        raise Declined("dilated average pool")
    pads, layout = view.pads(node, x, kernel, stride, (1,) * len(kernel)), view.need_layout(x)
    if layout.rank != len(kernel):
        raise Declined("pool rank differs from the input's")
    if a.get_string("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER") and any(p != (0, 0) for p in pads):
        raise Declined("auto_pad SAME average pool never counts its padding")
    return Affine(x, affine.avg_pool(layout.channels, layout.rank, kernel, stride, pads,
                                count_include_pad=bool(a.get_int("count_include_pad", 0)),
                                ceil_mode=bool(a.get_int("ceil_mode", 0)), input_size=_dims(x)[2:]))


def _pad_geometry(view: OnnxView, node) -> tuple[ir.Value, affine.Pads, float]:
    x = view.input(node)
    if node.attributes.get_string("mode", "constant") != "constant":
        raise Declined(f"{node.attributes.get_string('mode')} padding")
    n = len(x.shape or ())
    if not n:
        raise Declined("input rank unknown")
    pads = [int(p) for p in view.const(node, 1, "pads").reshape(-1)]
    value, axes = (view.const(node, i, what, optional=True) for i, what in ((2, "pad value"), (3, "pad axes")))
    full, k = [0] * (2 * n), len(pads) // 2
    for i, axis in enumerate(range(n) if axes is None else [int(a) % n for a in axes.reshape(-1)]):
        full[axis], full[axis + n] = pads[i], pads[i + k]
    if full[0] or full[1] or full[n] or full[n + 1]:
        raise Declined("padding touches batch or channel dims")
    if any(p < 0 for p in full):
        raise Declined("negative padding crops the input")
    return x, tuple((full[d], full[d + n]) for d in range(2, n)), 0.0 if value is None else float(value.reshape(()))


def _pad(view: OnnxView, node):
    if any(u.node.op_type in _BORDER_WRITE for u in node.outputs[0].uses()):
        return None  # the border writes that follow decide what this is
    x, pads, value = _pad_geometry(view, node)
    return padded(x, view.need_layout(x).channels, pads, value)


def _border_fill(view: OnnxView, last: ir.Node):
    """Pad, then ScatterNDs (between Transposes) that write every border: padding with a per-channel constant, as
    the torch exporters write DBB's BN-and-pad.  The writes replayed on NaNs are judged by `border_fill`; with
    dynamic shapes or positions computed at run time, by `_dynamic_border_fill`."""
    out = last.outputs[0]
    if _continues(out) or _shape_only(out):
        return None  # not the end of the chain
    chain, data = [last], last.inputs[0]
    while data.producer() is not None and data.producer().op_type in _BORDER_WRITE:
        chain.append(data.producer())
        data = data.producer().inputs[0]
    pad, scatters = data.producer(), [n for n in chain if n.op_type == "ScatterND"]
    if pad is None or pad.op_type != "Pad" or not scatters:
        return None
    x, pads, _ = _pad_geometry(view, pad)
    shape = _dims(data)
    if shape is None or None in shape or not all(_constant(v) for n in scatters for v in n.inputs[1:3]):
        return _dynamic_border_fill(view, x, pads, data, chain)
    if not view.single_consumer(data):
        raise Declined("padded tensor is read before its border is written")
    if not all(view.single_consumer(n.outputs[0]) for n in chain[1:]):
        raise Declined("intermediate border write is read elsewhere")
    filled, axes = np.full(shape, np.nan), np.arange(len(shape))
    for step in reversed(chain):  # earliest first
        if step.op_type == "Transpose":
            perm = list(step.attributes.get_ints("perm", list(range(len(shape)))[::-1]))
            filled, axes = np.transpose(filled, perm), axes[perm]
        elif step.attributes.get_string("reduction", "none") != "none":
            raise Declined("ScatterND with reduction")
        else:
            idx = view.const(step, 1, "scatter indices").astype(np.int64)
            upd = view.const(step, 2, "scatter updates").astype(np.float64)
            filled[tuple(np.moveaxis(idx, -1, 0))] = upd.reshape(idx.shape[:-1] + filled.shape[idx.shape[-1]:])
    if list(axes) != list(range(len(shape))):
        raise Declined("border writes end in a transposed layout")
    eps = np.finfo(view.const(scatters[0], 2, "scatter updates").dtype).eps
    return PadWith(x, pads, border_fill(filled, pads), precision(eps))


def _shape_only(value: ir.Value) -> bool:
    """Read for its shape alone (Shape, through Slices and Transposes): the exporters' index arithmetic."""
    uses = value.uses()
    return bool(uses) and not value.is_graph_output() and all(
        u.node.op_type == "Shape" or u.node.op_type in ("Slice", "Transpose") and u.idx == 0
        and _shape_only(u.node.outputs[0]) for u in uses)


def _continues(value: ir.Value) -> bool:
    """Written again by a later border write (or transposed back for its readers)."""
    return any(u.node.op_type == "ScatterND" and u.idx == 0 or
               u.node.op_type == "Transpose" and not _shape_only(u.node.outputs[0]) for u in value.uses())


def _dynamic_border_fill(view: OnnxView, x: ir.Value, pads: affine.Pads, data: ir.Value, chain: list[ir.Node]):
    """The border writes when sizes or positions are computed at run time: each ScatterND is read symbolically
    in the dims of the padded input (`passes.onnx_sizes`), and must write a band at a fixed distance from the
    ends, one value per channel, for every input size on which the graph runs."""
    layout = view.need_layout(x)
    rank = len(x.shape)
    if layout.rank != rank - 2:
        raise Declined("border writes on a tensor that is not channels-first")
    dims = [Lin(d) if isinstance(d, int) else Lin(0, {f"d{i}": 1}) for i, d in enumerate(x.shape)]
    sizes = Sizes(const_array, {x: Sym(tuple(dims), None)})
    axes, writes = list(range(rank)), []
    for step in reversed(chain):  # earliest first
        if step.op_type == "Transpose":
            axes = [axes[p] for p in step.attributes.get_ints("perm", list(range(rank))[::-1])]
            continue
        if step.attributes.get_string("reduction", "none") != "none":
            raise Declined("ScatterND with reduction")
        target, indices, updates = (sizes(v) for v in step.inputs[:3])
        if target is None or indices is None or updates is None or target.rank != rank:
            raise Declined("border write at positions computed in a way repfuse cannot follow")
        box, values = scatter_write(sizes.alg, target, indices, updates, axes.index(1))
        index = [slice(None)] * rank
        for j, (offset, extent) in enumerate(box):
            index[axes[j]] = band(sizes.alg, offset, extent, target.shape[j])
        if values.size not in (1, layout.channels):
            raise Declined("border value is not one per channel")
        writes.append((tuple(index), np.broadcast_to(values, (layout.channels,))))
    if axes != list(range(rank)):
        raise Declined("border writes end in a transposed layout")
    # before its last write the tensor may be read only by the writes' own index arithmetic (for its shape)
    for v, what in [(data, "padded tensor is read before its border is written")] + \
            [(n.outputs[0], "intermediate border write is read elsewhere") for n in chain[1:]]:
        if v.is_graph_output() or any(u.idx != 0 and u.node in chain or u.node not in chain and u.node not in
                                      sizes.read for u in v.uses()):
            raise Declined(what)
    fill = border_fill_of_writes(writes, pads, layout.channels)
    return PadWith(x, pads, fill, precision(np.finfo(data.dtype.numpy()).eps))


READERS = {
    "Conv": _conv, "BatchNormalization": _batchnorm, "Identity": _identity, "Dropout": _identity, "Neg": _identity,
    **dict.fromkeys(("Add", "Sub", "Mul", "Div"), _elementwise), "Clip": _pointwise, "Concat": _concat, "Gemm": _gemm,
    **dict.fromkeys(("Relu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid"), _pointwise), "AveragePool": _average_pool,
    "MatMul": lambda view, node: None if view._pair(node) is not None else _matmul(view, node),
    "Pad": _pad, "ScatterND": _border_fill, "Transpose": _transpose, "Reshape": _regroup, "Flatten": _regroup,
    "ConvTranspose": _conv_transpose,
}


def graph_stats(model: ir.Model) -> GraphStats:
    """Ops by type, conv/gemm count, MACs per sample (where shapes are static), constant elements."""
    stats = GraphStats()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        stats.ops[node.op_type] += 1
        if node.op_type not in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
            continue
        w = node.inputs[1] if len(node.inputs) > 1 else None
        w = None if w is None else ir.convenience.get_const_tensor(w)  # overridable defaults count too
        size = None if w is None else int(w.size)
        dims = _dims(node.inputs[1]) if w is None and "repfuse.samples" in node.metadata_props else None
        if dims and None not in dims:  # a dynamic conv's kernels [N*O, I/g, *k] (the batch as groups): one sample's
            size = int(np.prod(dims, dtype=np.int64)) // int(node.metadata_props["repfuse.samples"])
        stats.convs += node.op_type != "MatMul" or size is not None  # a Conv / Gemm with computed weights counts
        out, conv = _dims(node.outputs[0]), node.op_type.startswith("Conv")
        if size is not None and out and None not in out[2 if conv else 1:]:
            stats.macs += (int(np.prod(out[2:], dtype=np.int64)) if conv else 1) * size
    stats.params = sum(int(v.const_value.size) for v in model.graph.initializers.values()
                       if v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point())
    return stats
