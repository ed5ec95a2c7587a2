"""The rule pipeline on ONNX (onnx_ir) graphs: every rule of `repfuse.patterns.rules` in its order.

The planners live in `repfuse.patterns` (`planner`, `dynamic`, `channels`); `passes.onnx`
is the view they read; this module writes their results back as ONNX nodes.  Only the
main graph is rewritten; custom domains and quantized (Q/DQ) nodes pass through.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (registers ir.passes.common)

from ..patterns import rules as R
from ..patterns.affine import AffineConv
from ..patterns.channels import ChannelPlan, plan_channels
from ..patterns.dynamic import DynamicRegion, plan_dynamic
from ..patterns.ghost import plan_ghost
from . import onnx as onnxpass
from .onnx import OnnxView, _shape_with, const_array
from .report import RegionRow, RuleRow

__all__ = ["OnnxRun", "run_rules", "fold_constants", "aggregate_dynamic", "remove_dead_channels"]


@dataclass
class OnnxRun:
    """What the pipeline did: fused regions, declines (label -> reason) and one row per rule."""

    regions: list[RegionRow] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)
    rules: dict[str, RuleRow] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return any(r.applied for r in self.rules.values())


def run_rules(model: ir.Model, rules: frozenset[str] = R.enabled(), max_rounds: int = 4,
              progress: Callable[[int, int], None] | None = None) -> OnnxRun:
    """Rewrite `model`'s main graph in place with the enabled rules, to a fixed point."""
    run = OnnxRun(rules={r.name: RuleRow(r.name, r.name in rules) for r in R.RULES})
    graph = model.graph

    def affine() -> bool:
        rows, declined = onnxpass.fuse_model(model, progress=progress)
        run.declined.update(declined)
        if rows:
            run.regions += rows
            run.rules["affine"].add(len(rows), f"{sum(r.ops for r in rows)} ops")
        return bool(rows)

    steps = {
        # Names is rebuilt per step: fuse_model names what it creates from the graph as it finds it
        "constant_folding": lambda: fold_constants(model, Names(graph), run),
        "affine": affine,
        "dynamic_conv": lambda: aggregate_dynamic(OnnxView(graph), Names(graph), run),
        "dead_channels": lambda: remove_dead_channels(OnnxView(graph), Names(graph), run),
        "ghost_concat": lambda: merge_ghost_concats(OnnxView(graph), Names(graph), run),
    }
    R.run_to_fixed_point(steps, rules, lambda: _tidy(model), max_rounds)
    return run


def _tidy(model: ir.Model) -> None:
    ir.passes.common.RemoveUnusedNodesPass()(model)


class Names:
    """Unique value / node / initializer names for what the rules create."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.taken = {v.name for n in ir.traversal.RecursiveGraphIterator(graph) for v in n.outputs if v.name}
        self.taken |= set(graph.initializers) | {v.name for v in graph.inputs if v.name}

    def __call__(self, base: str) -> str:
        return onnxpass._unique(self.graph, base, self.taken)

    def constant(self, base: str, array: np.ndarray) -> ir.Value:
        return onnxpass._initializer(self.graph, self(base), np.ascontiguousarray(array))

    def ints(self, base: str, values) -> ir.Value:
        return self.constant(base, np.asarray(values, dtype=np.int64))


_opset = onnxpass.opset


def _dtype(value: ir.Value):
    return value.dtype.numpy() if value.dtype is not None and value.dtype.is_floating_point() else np.float32


def _replace(graph: ir.Graph, old: ir.Value, new: ir.Value, doomed, names: Names) -> None:
    """Route `old`'s readers to `new` (graph outputs keep their name) and remove `doomed` nodes."""
    old_name = old.name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if any(o is new for o in graph.outputs):
        old.name = None
        new.name = old_name
    graph.remove(set(doomed), safe=True)


# ---------------------------------------------------------------- constant_folding

_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli"}
_GROWTH = 64 * 1024  # a folded op may add this many bytes over its constant inputs (Expand/Tile/ConstantOfShape)


def _foldable(node: ir.Node, constant: Callable[[ir.Value], bool]) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type in onnxpass._QUANTIZED | _NONDETERMINISTIC:
        return False  # Q/DQ regions pass through unchanged, even on weights
    if node.op_type == "Constant" or not any(v is not None for v in node.inputs):
        return False
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
        return False
    if any(u.node.op_type in onnxpass._QUANTIZED for o in node.outputs for u in o.uses()):
        return False  # e.g. a transposed int8 weight: part of the Q/DQ region
    return all(v is None or constant(v) for v in node.inputs)


def fold_constants(model: ir.Model, names: Names, run: OnnxRun) -> bool:
    """Replace every parameter-only computation that data-dependent nodes read by one initializer.

    All foldable nodes run together in one onnx.reference evaluation (one pass over the graph,
    whatever its size); a node the evaluator cannot run stays, with everything that reads it."""
    graph = model.graph
    folded: set[ir.Node] = set()
    leaves: dict[ir.Value, np.ndarray] = {}

    def constant(v: ir.Value) -> bool:
        if v.producer() in folded:
            return True
        if v in leaves:
            return True
        arr = const_array(v)
        if arr is None:
            return False
        leaves[v] = arr
        return True

    order = []
    for node in graph:
        if _foldable(node, constant):
            folded.add(node)
            order.append(node)
    if not order:
        return False
    results = _evaluate(order, leaves, model.opset_imports)

    # keep the nodes that ran and do not blow a constant up; everything they feed then folds too
    kept: set[ir.Node] = set()
    for node in order:
        ins = [v for v in node.inputs if v is not None]
        if not all(v in leaves or v.producer() in kept for v in ins):
            continue
        outs = [results.get(o) for o in node.outputs]
        if any(o is None or not isinstance(o, np.ndarray) or o.dtype.kind not in "fiub" for o in outs):
            continue
        in_bytes = sum(leaves[v].nbytes if v in leaves else results[v].nbytes for v in ins)
        if sum(o.nbytes for o in outs) > in_bytes + _GROWTH:
            continue
        kept.add(node)

    frontier = 0
    for node in order:
        if node not in kept:
            continue
        for out in node.outputs:
            readers = [u.node for u in out.uses()]
            if out.is_graph_output() or all(r in kept for r in readers):
                continue  # an intermediate of a larger folded computation (or an output: left as is)
            array = np.asarray(results[out])
            value = names.constant((out.name or node.op_type) + ".folded", array)
            ir.convenience.replace_all_uses_with(out, value)
            frontier += 1
    if not frontier:
        return False
    _tidy(model)
    try:  # folded weights give the convs reading them known channel counts, which the other rules need
        ir.passes.common.ShapeInferencePass()(model)
    except Exception:  # shapes are a help, not a requirement
        pass
    kinds = Counter(n.op_type for n in kept)
    run.rules["constant_folding"].add(len(kept), "parameter-only ops folded ("
                                      + ", ".join(f"{k} x{c}" for k, c in kinds.most_common(4)) + ")")
    return True


def _evaluate(order: list[ir.Node], leaves: dict[ir.Value, np.ndarray], opsets: dict[str, int]) -> dict:
    """Outputs of `order` (topologically sorted) from the constant `leaves`; values that fail are missing."""
    from onnx.reference import ReferenceEvaluator

    local: dict[ir.Value, str] = {}

    def name(v: ir.Value) -> str:
        if v not in local:
            local[v] = f"v{len(local)}"
        return local[v]

    protos = []
    for node in order:
        proto = ir.serde.serialize_node(node)
        del proto.input[:]
        proto.input.extend("" if v is None else name(v) for v in node.inputs)
        del proto.output[:]
        proto.output.extend("" if v is None else name(v) for v in node.outputs)
        protos.append(proto)
    feeds = {name(v): a for v, a in leaves.items()}
    outs = [v for n in order for v in n.outputs if v is not None]
    opset_ids = [onnx.helper.make_opsetid(d, v) for d, v in opsets.items() if d in ("", "ai.onnx")]

    def model_of(nodes, inputs, outputs):
        g = onnx.helper.make_graph(nodes, "fold", [onnx.helper.make_empty_tensor_value_info(i) for i in inputs],
                                   [onnx.helper.make_empty_tensor_value_info(o) for o in outputs])
        return onnx.helper.make_model(g, opset_imports=opset_ids)

    try:  # the common case: everything at once
        ref = ReferenceEvaluator(model_of(protos, list(feeds), [name(v) for v in outs]))
        values = ref.run([name(v) for v in outs], feeds)
        return dict(zip(outs, values))
    except Exception:
        pass
    results: dict[ir.Value, np.ndarray] = {}  # one node at a time, skipping what fails
    known = dict(feeds)
    for node, proto in zip(order, protos):
        ins = [n for n in proto.input if n]
        if not all(n in known for n in ins):
            continue
        try:
            ref = ReferenceEvaluator(model_of([proto], ins, [o for o in proto.output if o]))
            values = ref.run(None, {n: known[n] for n in ins})
        except Exception:
            continue
        for v, a in zip([o for o in node.outputs if o is not None], values):
            known[name(v)] = a
            results[v] = a
    return results


# ---------------------------------------------------------------- dynamic_conv

def aggregate_dynamic(view: OnnxView, names: Names, run: OnnxRun) -> bool:
    regions, declined = plan_dynamic(view)
    run.declined.update({onnxpass._label(k): f"dynamic_conv: {r}" for k, r in declined.items()})
    replaced: dict[ir.Value, ir.Value] = {}  # a region's root may be the next region's source
    done = 0
    for region in regions:
        source = replaced.get(region.source, region.source)
        reason = _dynamic_precondition(view, region, source)
        if reason:
            run.declined[onnxpass._label(region.root)] = f"dynamic_conv: {reason}"
            continue
        replaced[region.root] = _emit_dynamic(view, region, source, names)
        done += 1
    if done:
        convs = sum(len(r.scales) for r in regions)
        run.rules["dynamic_conv"].add(done, f"{convs} weighted convs -> {done}")
    return bool(done)


def _dynamic_precondition(view: OnnxView, region: DynamicRegion, source: ir.Value) -> str | None:
    if region.static.rank == 0:
        # per-sample weights sum_k pi_k W_k cost K*O*I MACs per sample, as much as the K linears themselves
        return "a dynamic linear is not cheaper aggregated (building per-sample weights costs what the K linears do)"
    if source.shape is None or len(source.shape) != region.static.rank + 2:
        return "input rank unknown"
    if region.root.shape is None:
        return "output shape unknown"
    return None


def _emit_dynamic(view: OnnxView, region: DynamicRegion, x: ir.Value, names: Names) -> ir.Value:
    """One conv with per-sample kernels W[n] = sum_k pi_k[n] W_k + W_S.

    Static batch N: the batch runs as groups, conv([1, N*C, ...], [N*O, I/g, *k], group=N*g).
    Dynamic batch: ONNX's group is an attribute, so a Scan runs one sample at a time."""
    graph, root, static = view.graph, region.root, region.static
    stem = root.producer().name or root.name or "dynamic"
    dtype = _dtype(root)
    (K, O), rank = region.biases.shape, static.rank
    per_kernel = static.weight.shape[1:]  # (I/g, *k)
    nodes: list[ir.Node] = []

    def add(op, inputs, attrs=None, shape=None, into=None) -> ir.Value:
        node = ir.node(op, inputs, attrs or {}, name=names(f"{stem}.repfuse.{op}"))
        (into if into is not None else nodes).append(node)
        out = node.outputs[0]
        out.name = names(f"{stem}.repfuse.{op.lower()}")
        out.type = root.type
        if shape is not None:
            out.shape = ir.Shape(shape)
        return out

    w_k = names.constant(f"{stem}.repfuse.weights", region.weights.reshape(K, -1).astype(dtype))  # [K, O*I/g*prod(k)]
    b_k = names.constant(f"{stem}.repfuse.biases", region.biases.astype(dtype))  # [K, O]
    batch = root.shape[0] if isinstance(root.shape[0], int) else None
    column = names.ints(f"{stem}.repfuse.column", [-1, 1])
    pi = add("Concat", [add("Reshape", [s, column], shape=[batch, 1]) for s in region.scales], {"axis": 1},
             shape=[batch, K])  # [N, K]
    conv_attrs = {"kernel_shape": list(static.kernel), "strides": list(static.stride),
                  "pads": [p[0] for p in static.pads] + [p[1] for p in static.pads],
                  "dilations": list(static.dilation)}

    if batch is not None:
        w = add("MatMul", [pi, w_k])  # [N, O*I/g*prod(k)]
        if region.has_static_weight:
            w = add("Add", [w, names.constant(f"{stem}.repfuse.static_weight",
                                              static.weight.reshape(1, -1).astype(dtype))])
        w = add("Reshape", [w, names.ints(f"{stem}.repfuse.kernel_shape", (-1,) + per_kernel)],
                shape=(batch * O,) + per_kernel)  # [N*O, I/g, *k]
        b_s = names.constant(f"{stem}.repfuse.static_bias", static.bias.reshape(1, O).astype(dtype))  # [1, O]
        b = add("Reshape", [add("Add", [add("MatMul", [pi, b_k]), b_s]), names.ints(f"{stem}.repfuse.flat", [-1])],
                shape=[batch * O])  # [N*O]
        merged = add("Reshape", [x, names.ints(f"{stem}.repfuse.merge", [1, -1] + [0] * rank)])  # [1, N*C, ...]
        y = add("Conv", [merged, w, b], {**conv_attrs, "group": batch * static.groups},
                shape=[1, batch * O] + list(root.shape)[2:])  # [1, N*O, ...]
        y.producer().metadata_props["repfuse.samples"] = str(batch)
        out = add("Reshape", [y, names.ints(f"{stem}.repfuse.split", [batch, O] + [0] * rank)])  # [N, O, ...]
    else:
        out = _scan_dynamic(region, x, pi, w_k, b_k, conv_attrs, names, nodes, stem, dtype, root)
    out.shape, out.type = root.shape, root.type
    for node in nodes:
        graph.insert_before(root.producer(), node)
    _replace(graph, root, out, [v.producer() for v in region.nodes], names)
    return out


def _scan_dynamic(region, x, pi, w_k, b_k, conv_attrs, names, nodes, stem, dtype, root) -> ir.Value:
    """Scan over the batch; the body builds one sample's kernel and runs Conv with the static group."""
    static = region.static
    graph = root.producer().graph
    new_axes = _opset(graph) >= 13  # Unsqueeze/Squeeze take axes as an input from opset 13 on
    xi = ir.Value(name=names(f"{stem}.repfuse.sample"), type=x.type,
                  shape=ir.Shape(list(x.shape)[1:]) if x.shape is not None else None)
    pii = ir.Value(name=names(f"{stem}.repfuse.sample_pi"), type=root.type, shape=ir.Shape([region.biases.shape[0]]))
    body: list[ir.Node] = []

    def add(op, inputs, attrs=None) -> ir.Value:
        node = ir.node(op, inputs, attrs or {}, name=names(f"{stem}.repfuse.body.{op}"))
        body.append(node)
        node.outputs[0].name = names(f"{stem}.repfuse.body.{op.lower()}")
        return node.outputs[0]

    def axis0(op, v):
        if new_axes:
            return add(op, [v, names.ints(f"{stem}.repfuse.axis0", [0])])
        return add(op, [v], {"axes": [0]})

    w = add("MatMul", [pii, w_k])  # [O*I/g*prod(k)]
    if region.has_static_weight:
        w = add("Add", [w, names.constant(f"{stem}.repfuse.static_weight", static.weight.reshape(-1).astype(dtype))])
    w = add("Reshape", [w, names.ints(f"{stem}.repfuse.kernel_shape", static.weight.shape)])  # [O, I/g, *k]
    b = add("Add", [add("MatMul", [pii, b_k]),
                    names.constant(f"{stem}.repfuse.static_bias", static.bias.astype(dtype))])  # [O]
    y = add("Conv", [axis0("Unsqueeze", xi), w, b], {**conv_attrs, "group": static.groups})  # [1, O, ...]
    yi = axis0("Squeeze", y)  # [O, ...]
    yi.type = root.type
    body_graph = ir.Graph([xi, pii], [yi], nodes=body, name=names(f"{stem}.repfuse.body"))
    scan = ir.node("Scan", [x, pi], {"body": ir.AttrGraph("body", body_graph), "num_scan_inputs": 2},
                   name=names(f"{stem}.repfuse.Scan"))
    scan.outputs[0].name = names(f"{stem}.repfuse.scan")
    nodes.append(scan)
    return scan.outputs[0]


# ---------------------------------------------------------------- dead_channels

def remove_dead_channels(view: OnnxView, names: Names, run: OnnxRun) -> bool:
    channel_plan: ChannelPlan = plan_channels(view)
    kept = channel_plan.kept_summary()
    if not channel_plan:
        if kept:
            run.rules["dead_channels"].add(0, kept)
        return False
    graph = view.graph
    inputs = {v: view.describe(v).input for v in channel_plan.ops}  # before any node changes
    replaced: dict[ir.Value, ir.Value] = {}
    for value, op in channel_plan.ops.items():
        x = replaced.get(inputs[value], inputs[value])
        replaced[value] = _emit_affine(graph, value, x, op, names)
        _replace(graph, value, replaced[value], [value.producer()] + view.attached.get(value, []), names)
    for value, keep in channel_plan.keep.items():  # activations, sums, concats: same op, fewer channels
        v = replaced.get(value, value)
        v.shape = _shape_with(v, 1, int(keep.sum()))
    text = f"{channel_plan.removed} channels removed"
    run.rules["dead_channels"].add(channel_plan.removed, text + (f"; {kept}" if kept else ""))
    return True


# ---------------------------------------------------------------- ghost_concat

def merge_ghost_concats(view: OnnxView, names: Names, run: OnnxRun) -> bool:
    rewrites, declined = plan_ghost(view)
    run.declined.update({onnxpass._label(k): r for k, r in declined.items()})
    graph = view.graph
    replaced: dict[ir.Value, ir.Value] = {}  # a consumer rewritten here may be the next Ghost's source
    for g in rewrites:
        out = _emit_affine(graph, g.concat, replaced.get(g.source, g.source), g.op, names)  # [N, 2C, ...], interleaved
        if g.relu:
            relu = ir.node("Relu", [out], name=names("ghost.repfuse.Relu"))
            relu.outputs[0].name, relu.outputs[0].type, relu.outputs[0].shape = names("ghost.relu"), out.type, out.shape
            graph.insert_before(g.concat.producer(), relu)
            out = relu.outputs[0]
        for consumer, op in g.consumers.items():
            replaced[consumer] = _emit_affine(graph, consumer, out, op, names)
            _replace(graph, consumer, replaced[consumer], [consumer.producer()], names)
    if rewrites:
        run.rules["ghost_concat"].add(len(rewrites), f"{len(rewrites)} concats -> depthwise convs")
    return bool(rewrites)


def _emit_affine(graph: ir.Graph, old: ir.Value, x: ir.Value, op: AffineConv, names: Names) -> ir.Value:
    """`op` on x as a Conv / Gemm, or as Mul + Add when it is per-channel (BatchNorm and friends)."""
    stem = old.producer().name or old.name or "channels"
    nodes, out = onnxpass.write_op(graph, x, op, old, names, stem, elementwise=True)
    for node in nodes:
        graph.insert_before(old.producer(), node)
    return out
