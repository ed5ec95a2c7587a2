"""ONNX writer (onnx_ir): the rules' plans (`patterns.plan`) written back as nodes, and the entry `run_rules`."""

from __future__ import annotations

from contextlib import suppress
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (registers ir.passes.common)

from ..patterns.affine import AffineConv, ConvTranspose
from ..patterns.plan import (BatchedConv, Permute, Replace, Reshape, Resize, emit, reshape_sizes, source_of, terms,
                             unpermuted)
from ..patterns.rules import Run, enabled, run
from .onnx import OnnxView, opset

__all__ = ["run_rules", "Adapter", "Emitter"]


def run_rules(model: ir.Model, rules: frozenset[str] | None = None,
              progress: Callable[[int, int], None] | None = None) -> Run:
    """Rewrite `model`'s main graph in place with the enabled rules (default: those on by default), to a
    fixed point; `progress(i, n)` is called for every edit written."""
    return run(Adapter(model, progress), enabled() if rules is None else frozenset(rules))


class Emitter:
    """`patterns.plan.Emitter`: one term's nodes, uniquely named, typed as the value `start` names and shaped as it
    with their channel count (as the source when the term ends in views of the fused op: reshape, transpose)."""

    def __init__(self, view: OnnxView, value_of: Callable):
        self.view, self.graph, self.value_of = view, view.graph, value_of
        self.taken = {v.name for n in ir.traversal.RecursiveGraphIterator(self.graph) for v in n.outputs if v.name}
        self.taken |= set(self.graph.initializers) | {v.name for v in self.graph.inputs if v.name}

    def start(self, target: ir.Value, term) -> None:
        self.target, self.nodes, self.stem = target, [], target.producer().name or target.name or "repfuse"
        self.source = source_of(term)
        self.shaped = self.source if isinstance(term, (Reshape, Permute)) else target
        floating = target.dtype is not None and target.dtype.is_floating_point()
        self.dtype = target.dtype.numpy() if floating else np.float32

    def name(self, what: str) -> str:
        base = f"{self.stem}.repfuse.{what}"
        candidates = (f"{base}_{i}" if i else base for i in range(len(self.taken) + 1))
        name = next(n for n in candidates if n not in self.taken)
        self.taken.add(name)
        return name

    def initializer(self, what: str, array: np.ndarray) -> ir.Value:
        name = self.name(what)
        value = ir.val(name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
        self.graph.register_initializer(value)
        return value

    def weight(self, what: str, array: np.ndarray) -> ir.Value:
        return self.initializer(what, array.astype(self.dtype))

    def ints(self, what: str, values) -> ir.Value:
        return self.initializer(what, np.asarray(values, dtype=np.int64))

    def node(self, op: str, inputs, attrs=None, channels: int | None = None, shape=None, into=None) -> ir.Value:
        """One node; its output has `shape`, or the target's shape with `channels` channels."""
        node = ir.node(op, inputs, attrs or {}, name=self.name(op))
        (self.nodes if into is None else into).append(node)
        out = node.outputs[0]
        out.name, out.type = self.name(op.lower()), self.target.type
        out.shape = ir.Shape(shape) if shape is not None else \
            None if channels is None else _resized(self.shaped, self.view.layout(self.shaped), channels)
        return out

    def constant(self, of: ir.Value) -> ir.Value:
        return self.initializer("folded", np.asarray(self.view.folded(of)))

    def conv(self, x: ir.Value, op: AffineConv) -> ir.Value:
        inputs = [x, self.weight("weight", op.weight), self.weight("bias", op.bias)]  # [O, I/g, *k], [O]
        return self.node("Conv", inputs, {**_geometry(op), "group": op.groups}, op.out_channels)

    def conv_transpose(self, x: ir.Value, op: ConvTranspose) -> ir.Value:
        inputs = [x, self.weight("weight", op.weight), self.weight("bias", op.bias)]  # [I, O/g, *k], [O]
        attrs = {**_geometry(op), "output_padding": list(op.output_padding), "group": op.groups}
        return self.node("ConvTranspose", inputs, attrs, op.out_channels)

    def linear(self, x: ir.Value, weight: np.ndarray, bias: np.ndarray) -> ir.Value:
        """Gemm on [N, I]; Gemm is 2-D only, so tokens [..., I] get MatMul + Add."""
        if x.shape is not None and len(x.shape) == 2:
            attrs, t = {"transB": 1}, x.producer()
            if t in self.nodes and t.op_type == "Transpose":  # our own [M, K] -> [K, M]: Gemm reads A transposed
                x, attrs["transA"] = t.inputs[0], 1  # (the Transpose, now unread, goes with the dead nodes)
            inputs = [x, self.weight("weight", weight), self.weight("bias", bias)]  # [O, I], [O]
            return self.node("Gemm", inputs, attrs, len(bias))
        y = self.node("MatMul", [x, self.weight("weight", weight.T)], channels=len(bias))  # [I, O]
        return self.node("Add", [y, self.weight("bias", bias)], channels=len(bias)) if np.any(bias) else y

    def scale_shift(self, x: ir.Value, scale, shift, rank: int) -> ir.Value:
        shape = (-1,) + (1,) * rank  # [C, 1 x rank]: broadcast from the right onto the channel axis
        for op, vector in (("Mul", scale), ("Add", shift)):
            if vector is not None:
                x = self.node(op, [x, self.weight(op.lower(), vector.reshape(shape))], channels=len(vector))
        return x

    def relu(self, x: ir.Value) -> ir.Value:
        return self.node("Relu", [x], shape=x.shape)

    def reshape(self, x: ir.Value, like: ir.Value, perm=None) -> ir.Value:
        """x (the fused op on the source: the source's leading dims) reshaped to like's shape (read through perm)."""
        sizes = _target_shape(like, self.source, perm)
        shape = unpermuted(like.shape, perm)
        return x if sizes == "same" else self.node("Reshape", [x, self.ints("shape", sizes)], shape=shape)

    def permute(self, x: ir.Value, perm) -> ir.Value:
        shape = None if x.shape is None else [x.shape[p] for p in perm]
        return self.node("Transpose", [x], {"perm": list(perm)}, shape=shape)

    def batched_conv(self, x: ir.Value, term: BatchedConv) -> ir.Value:
        """A static batch N runs as groups: conv([1, N*C, ...], [N*O, I/g, *k], group=N*g); ONNX's group is an
        attribute, so a dynamic batch runs in a Scan, one sample at a time."""
        static, (k, o), n = term.static, term.biases.shape, self.target.shape[0]
        n = n if isinstance(n, int) else None
        column = self.ints("column", [-1, 1])
        pi = self.node("Concat", [self.node("Reshape", [self.value_of(s), column], shape=[n, 1]) for s in term.scales],
                       {"axis": 1}, shape=[n, k])  # [N, K]
        if n is None:
            return self._scan(x, pi, term)
        zeros = [0] * static.rank  # Reshape's 0 keeps the spatial dims
        merged = self.node("Reshape", [x, self.ints("merge", [1, -1] + zeros)])  # [1, N*C, ...]
        y = self.node("Conv", [merged, *self._kernels(pi, term, n)], {**_geometry(static), "group": n * static.groups},
                      shape=[1, n * o] + list(self.target.shape)[2:])  # [1, N*O, ...]
        y.producer().metadata_props["repfuse.samples"] = str(n)  # graph_stats counts one sample's kernel
        return self.node("Reshape", [y, self.ints("split", [n, o] + zeros)])  # [N, O, ...]

    def _scan(self, x: ir.Value, pi: ir.Value, term: BatchedConv) -> ir.Value:
        """One sample at a time: the body builds the sample's kernel and runs Conv with the static group."""
        body, shape = [], None if x.shape is None else ir.Shape(list(x.shape)[1:])  # a sample: [C, ...]
        xi = ir.Value(name=self.name("sample"), type=x.type, shape=shape)
        pii = ir.Value(name=self.name("sample_pi"), type=self.target.type, shape=ir.Shape([len(term.scales)]))

        def axis0(op, v):  # Unsqueeze / Squeeze take their axes as an input from opset 13 on
            if opset(self.graph) >= 13:
                return self.node(op, [v, self.ints("axis0", [0])], into=body)
            return self.node(op, [v], {"axes": [0]}, into=body)

        w, b = self._kernels(pii, term, None, body)  # [O, I/g, *k], [O]
        y = self.node("Conv", [axis0("Unsqueeze", xi), w, b], {**_geometry(term.static), "group": term.static.groups},
                      into=body)  # [1, O, ...]
        yi = axis0("Squeeze", y)  # [O, ...]
        yi.shape = ir.Shape(list(self.target.shape)[1:])
        graph = ir.Graph([xi, pii], [yi], nodes=body, name=self.name("body"))
        return self.node("Scan", [x, pi], {"body": ir.AttrGraph("body", graph), "num_scan_inputs": 2})

    def _kernels(self, pi: ir.Value, term: BatchedConv, n: int | None, into=None) -> tuple[ir.Value, ir.Value]:
        """W[n] = sum_k pi_k[n] W_k + W_S as [N*O, I/g, *k] and b[n] as [N*O] (pi [N, K], or [K] in a Scan).
        MatMul + Add, not Gemm: these are no layers (the reports count a Gemm as one)."""
        static, (k, o) = term.static, term.biases.shape
        w_k = self.weight("weights", term.weights.reshape(k, -1))  # [K, O*I/g*prod(k)]
        w = self.node("MatMul", [pi, w_k], into=into)  # [N, O*I/g*prod(k)]
        if term.has_static_weight:  # W_S as [1, O*I/g*prod(k)]
            w = self.node("Add", [w, self.weight("static_weight", static.weight.reshape(1, -1))], into=into)
        per_kernel = static.weight.shape[1:]  # (I/g, *k)
        w = self.node("Reshape", [w, self.ints("kernel_shape", (-1,) + per_kernel)], into=into,
                      shape=None if n is None else (n * o,) + per_kernel)  # [N*O, I/g, *k]
        b = self.node("MatMul", [pi, self.weight("biases", term.biases)], into=into)  # b_k [K, O] -> [N, O]
        b = self.node("Add", [b, self.weight("static_bias", static.bias.reshape(1, o))], into=into)  # + [1, O]
        return w, self.node("Reshape", [b, self.ints("flat", [-1])], into=into, shape=None if n is None else [n * o])


def _geometry(op: AffineConv | ConvTranspose) -> dict:
    return {"kernel_shape": list(op.kernel), "strides": list(op.stride), "dilations": list(op.dilation),
            "pads": [p[0] for p in op.pads] + [p[1] for p in op.pads]}  # ONNX: all begins, then all ends


def refine_shapes(model: ir.Model) -> None:
    """onnx shape inference, written back only where a value's shape is unknown or has an unknown dim.

    onnx_ir's ShapeInferencePass deserializes the whole inferred model to merge it, which costs more than
    the inference on exporter graphs of 10k+ nodes; the inferred value_info is read here by name instead."""
    from onnx_ir.passes.common import _c_api_utils

    proto = _c_api_utils.call_onnx_api(onnx.shape_inference.infer_shapes, model)  # large weights left out
    inferred = {i.name: i.type.tensor_type for i in list(proto.graph.value_info) + list(proto.graph.output)
                if i.type.HasField("tensor_type") and i.type.tensor_type.HasField("shape")}
    for node in model.graph:
        for value in node.outputs:
            shape = value.shape
            if value.name not in inferred or (shape is not None and all(isinstance(d, int) for d in shape)):
                continue
            tensor_type = inferred[value.name]
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in tensor_type.shape.dim]
            if shape is None or len(shape) == len(dims):  # keep what is known where inference knows less
                value.shape = ir.Shape([d if isinstance(d, int) or shape is None else
                                        (shape[i] if isinstance(shape[i], int) else d) for i, d in enumerate(dims)])
            if value.dtype is None and tensor_type.elem_type:
                value.dtype = ir.DataType(tensor_type.elem_type)


def _target_shape(like: ir.Value, source: ir.Value | None, perm=None) -> list[int] | str | None:
    """patterns.plan.reshape_sizes in ONNX Reshape's terms: a source dim is 0 ("copy"), so only in its own
    place; "same" when no Reshape is needed; None when Reshape cannot say it."""
    sizes = reshape_sizes(unpermuted(like.shape, perm), None if source is None else source.shape,
                          lambda d: d if isinstance(d, int) else None, _same_dim)
    if sizes is None or sizes == "same":
        return sizes
    sizes = [0 if s == ("dim", i) else -1 if isinstance(s, tuple) else s for i, s in enumerate(sizes)]
    return sizes if sizes.count(-1) <= 1 else None


def _same_dim(a, b) -> bool:
    """Provably equal dims: equal sizes, or one named symbol."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return getattr(a, "value", None) is not None and a.value == getattr(b, "value", None)


def _resized(value: ir.Value, layout, channels: int) -> ir.Shape | None:
    """`value`'s shape with `channels` on the channel axis of `layout` (the view's: later values are not in it)."""
    if value.shape is None:
        return None
    dims = list(value.shape)
    dims[len(dims) - 1 - layout.rank if layout is not None else 1] = channels
    return ir.Shape(dims)


class Adapter:
    """`patterns.rules.Adapter` for an onnx_ir model (its main graph)."""

    def __init__(self, model: ir.Model, progress: Callable[[int, int], None] | None = None):
        self.model, self.progress = model, progress

    def view(self) -> OnnxView:
        return OnnxView(self.model.graph)

    def cannot_write(self, view: OnnxView, edit: Replace) -> str | None:
        for term in terms(edit.term):
            if isinstance(term, Reshape) and _target_shape(term.like, source_of(edit.term), term.perm) is None:
                return "the region's output shape has dynamic dims its input does not give"
            if isinstance(term, BatchedConv):
                if term.input.shape is None or len(term.input.shape) != term.static.rank + 2:
                    return "input rank unknown"
                if edit.value.shape is None:
                    return "output shape unknown"
        return None

    def write(self, view: OnnxView, rule: str, edits: list) -> None:
        graph, replaced = view.graph, {}
        out = Emitter(view, lambda key: replaced.get(key, key))
        total = sum(isinstance(e, Replace) for e in edits)
        for edit in edits:
            if isinstance(edit, Resize):  # the same op with fewer channels: only its shape changes
                value = replaced.get(edit.value, edit.value)
                value.shape = _resized(value, view.layout(edit.value), edit.channels)
                continue
            old, name = edit.value, edit.value.name
            out.start(old, edit.term)
            new = emit(out, edit.term, out.value_of)
            graph.insert_before(old.producer(), out.nodes)
            # `new` is read wherever `old` was, with its type and shape; a graph output keeps its name
            new.type = old.type if new.type is None else new.type
            new.shape = old.shape if new.shape is None else new.shape
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            if any(o is new for o in graph.outputs):
                old.name, new.name = None, name
            replaced[old] = new
            if self.progress:
                self.progress(len(replaced), total)
        ir.passes.common.RemoveUnusedNodesPass()(self.model)  # the erased nodes, and what only they read
        if rule == "constant_folding":  # folded pads and weights make sizes and channel counts known, which
            with suppress(Exception):  # the other rules need; shapes are a help, not a requirement
                refine_shapes(self.model)
