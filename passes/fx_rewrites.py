"""The rule pipeline on FX graphs: every rule of `repfuse.patterns.rules` in its order.

The planners live in `repfuse.patterns` (`planner`, `dynamic`, `channels`); this module
writes their results back as FX nodes.  New constants come from `constant_node(name,
tensor, before)`: get_attr for `repfuse.deploy`, placeholder for the torch.compile
backend, which recomputes them when the weights change.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx

from ..patterns import rules as R
from ..patterns.channels import ChannelPlan, plan_channels
from ..patterns.dynamic import DynamicRegion, plan_dynamic
from ..patterns.ghost import plan_ghost
from ..patterns.planner import plan
from . import fx as fxpass
from .report import RuleRow

ConstantNode = Callable[[str, torch.Tensor, fx.Node], fx.Node]


@dataclass
class FxRun:
    """What the pipeline did: new constants (in creation order), a structural signature (equal
    signatures mean equal graphs), report rows and declines."""

    created: dict[str, torch.Tensor] = field(default_factory=dict)
    signature: list = field(default_factory=list)
    regions: list = field(default_factory=list)
    declined: list[tuple[str, str]] = field(default_factory=list)
    rules: dict[str, RuleRow] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return any(r.applied for r in self.rules.values())


def run_rules(gm: fx.GraphModule, constants: dict[fx.Node, torch.Tensor] | None,
              constant_node: ConstantNode, rules: frozenset[str] = R.enabled(), max_rounds: int = 4) -> FxRun:
    """Rewrite `gm` in place with the enabled rules, to a fixed point."""
    constants = dict(constants or {})
    run = FxRun(rules={r.name: RuleRow(r.name, r.name in rules) for r in R.RULES})

    def new_constant(tensor: torch.Tensor, before: fx.Node) -> fx.Node:
        name = f"repfuse_c{len(run.created)}"
        run.created[name] = tensor
        node = constant_node(name, tensor, before)
        if node.op == "placeholder":
            constants[node] = tensor
        return node

    def view() -> fxpass.FxView:
        return fxpass.FxView(gm, constants)

    def affine() -> bool:
        v = view()
        fx_plan = plan(v)
        run.declined += [(str(k), r) for k, r in fx_plan.declined.items()]
        if not fx_plan.regions:
            return False
        run.regions += fxpass.region_rows(v, fx_plan)
        run.signature.append(("affine", fx_plan.signature(key=str)))
        fxpass.apply_plan(v, fx_plan, new_constant)
        run.rules["affine"].add(len(fx_plan.regions), f"{sum(len(r.nodes) for r in fx_plan.regions)} ops")
        return True

    steps = {
        "constant_folding": lambda: fold_constants(view(), new_constant, run),
        "affine": affine,
        "dynamic_conv": lambda: aggregate_dynamic(view(), new_constant, run),
        "dead_channels": lambda: remove_dead_channels(view(), new_constant, run),
        "ghost_concat": lambda: merge_ghost_concats(view(), new_constant, run),
    }
    R.run_to_fixed_point(steps, rules, lambda: _tidy(gm), max_rounds)
    run.declined = list(dict(run.declined).items())
    return run


def _tidy(gm: fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or (
        n.op in ("call_function", "call_method") and not fxpass._is_pure(n)))
    gm.graph.lint()
    gm.recompile()


# ---------------------------------------------------------------- constant_folding

def fold_constants(view: fxpass.FxView, new_constant, run: FxRun) -> bool:
    """Replace every parameter-only computation that data-dependent nodes read by one constant."""
    graph, folded = view.graph, 0
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        value = view.const(node)
        if not isinstance(value, torch.Tensor) or all(view.const(u) is not None for u in node.users):
            continue
        const = new_constant(value.clone(), node)
        node.replace_all_uses_with(const)
        const.meta.update({k: v for k, v in node.meta.items() if k in fxpass.SHAPE_META})
        folded += 1
    if folded:
        run.signature.append(("constant_folding", folded))
        run.rules["constant_folding"].add(folded, "parameter-only ops folded")
    return bool(folded)


# ---------------------------------------------------------------- dynamic_conv

def aggregate_dynamic(view: fxpass.FxView, new_constant, run: FxRun) -> bool:
    regions, declined = plan_dynamic(view)
    run.declined += [(str(k), f"dynamic_conv: {r}") for k, r in declined.items()]
    replaced: dict[fx.Node, fx.Node] = {}  # a region's root may be the next region's source
    for region in regions:
        replaced[region.root] = _emit_dynamic(view, region, new_constant, replaced.get(region.source, region.source))
    if regions:
        run.signature.append(("dynamic_conv", [(str(r.source), tuple(map(str, r.nodes)), r.weights.shape)
                                               for r in regions]))
        convs = sum(len(r.scales) for r in regions)
        run.rules["dynamic_conv"].add(len(regions), f"{convs} weighted convs -> {len(regions)}")
    return bool(regions)


def _emit_dynamic(view: fxpass.FxView, region: DynamicRegion, new_constant, x: fx.Node) -> fx.Node:
    """conv(x viewed as [1, N*C, ...], per-sample kernels stacked to [N*O, I/g, *k], groups N*g)."""
    graph, root = view.graph, region.root
    like = fxpass.example_like(root)
    static, (K, O) = region.static, region.biases.shape
    tensor = lambda a: fxpass.to_tensor(a, like)  # noqa: E731
    with graph.inserting_before(root):
        weights = new_constant(tensor(region.weights.reshape(K, -1)), root)  # [K, O*I/g*prod(k)]
        biases = new_constant(tensor(region.biases), root)  # [K, O]
        b_static = new_constant(tensor(static.bias.reshape(1, O)), root)  # [1, O]
        pi = graph.call_function(torch.cat, ([graph.call_method("reshape", (s, -1, 1)) for s in region.scales], 1))
        if region.has_static_weight:
            w_static = new_constant(tensor(static.weight.reshape(1, -1)), root)
            w = graph.call_function(torch.addmm, (w_static, pi, weights))
        else:
            w = graph.call_function(torch.mm, (pi, weights))  # [N, O*I/g*prod(k)]
        w = graph.call_method("reshape", (w, -1) + static.weight.shape[1:])  # [N*O, I/g, *k]
        b = graph.call_method("reshape", (graph.call_function(torch.addmm, (b_static, pi, biases)), -1))  # [N*O]
        batch = graph.call_method("size", (x, 0))
        groups = graph.call_function(operator.mul, (batch, static.groups))
        merged = graph.call_method("unsqueeze", (graph.call_method("flatten", (x, 0, 1)), 0))  # [1, N*C, ...]
        y = fxpass._conv_call(graph, merged, static, w, b, groups)  # [1, N*O, ...]
        new = graph.call_method("squeeze", (graph.call_method("unflatten", (y, 1, (-1, O))), 0))  # [N, O, ...]
    out = fxpass.node_shape(root)
    if out is not None:  # shapes for the report's MAC count: per sample, though the batch runs as groups
        n = fxpass._hint(out[0]) or 1
        y.meta["tensor_meta"] = _Shape(torch.Size([1, n * O] + [fxpass._hint(d) or 1 for d in out[2:]]))
        w.meta["tensor_meta"] = _Shape(torch.Size((n * O,) + static.weight.shape[1:]))
        y.meta["repfuse_samples"] = n
    fxpass._replace(graph, view, root, new, region.nodes)
    return new


# ---------------------------------------------------------------- ghost_concat

def merge_ghost_concats(view: fxpass.FxView, new_constant, run: FxRun) -> bool:
    rewrites, declined = plan_ghost(view)
    run.declined += [(str(k), r) for k, r in declined.items()]
    graph = view.graph
    replaced: dict[fx.Node, fx.Node] = {}  # a consumer rewritten here may be the next Ghost's source
    for g in rewrites:
        like = fxpass.example_like(g.concat)
        with graph.inserting_before(g.concat):
            constant = lambda a: new_constant(fxpass.to_tensor(a, like), g.concat)  # noqa: E731
            new = fxpass.emit_affine(graph, replaced.get(g.source, g.source), g.op, constant)
            if g.relu:
                new = graph.call_function(torch.relu, (new,))
        for consumer, op in g.consumers.items():
            with graph.inserting_before(consumer):
                constant = lambda a: new_constant(fxpass.to_tensor(a, like), consumer)  # noqa: E731
                replaced[consumer] = fxpass.emit_affine(graph, new, op, constant)
                fxpass._replace(graph, view, consumer, replaced[consumer], (consumer,))
        new.meta.update({k: v for k, v in g.concat.meta.items() if k in fxpass.SHAPE_META})
        for n in reversed(g.nodes):
            fxpass._erase(graph, n)
    if rewrites:
        run.signature.append(("ghost_concat", [str(g.concat) for g in rewrites]))
        run.rules["ghost_concat"].add(len(rewrites), f"{len(rewrites)} concats -> depthwise convs")
    return bool(rewrites)


@dataclass(frozen=True)
class _Shape:
    """Just the shape of a value (what graph_stats reads from tensor_meta)."""

    shape: torch.Size
    dtype: torch.dtype = torch.float32


# ---------------------------------------------------------------- dead_channels

def remove_dead_channels(view: fxpass.FxView, new_constant, run: FxRun) -> bool:
    channel_plan: ChannelPlan = plan_channels(view)
    kept = channel_plan.kept_summary()
    if not channel_plan:
        if kept:
            run.rules["dead_channels"].add(0, kept)
        return False
    graph = view.graph
    before = fxpass.graph_stats(view).macs
    inputs = {node: view.describe(node).input for node in channel_plan.ops}  # before any node changes
    replaced: dict[fx.Node, fx.Node] = {}
    for node, op in channel_plan.ops.items():
        like = fxpass.example_like(node)
        x = replaced.get(inputs[node], inputs[node])
        with graph.inserting_before(node):
            per = op.per_channel()
            if per is not None and op.rank > 0:  # BN and friends stay elementwise: x * scale + shift
                shape = (-1,) + (1,) * op.rank  # [C, 1, ...]
                scale = new_constant(fxpass.to_tensor(per[0].reshape(shape), like), node)
                shift = new_constant(fxpass.to_tensor(per[1].reshape(shape), like), node)
                new = graph.call_function(torch.add, (graph.call_function(torch.mul, (x, scale)), shift))
            else:
                new = fxpass.emit_affine(graph, x, op, lambda a: new_constant(fxpass.to_tensor(a, like), node))
        fxpass._replace(graph, view, node, new, (node,))
        replaced[node] = new
    for value, keep in channel_plan.keep.items():
        _shrink_meta(replaced.get(value, value), int(keep.sum()))
    after = fxpass.graph_stats(fxpass.FxView(view.gm, view.constants)).macs
    run.signature.append(("dead_channels", sorted((str(k), tuple(m)) for k, m in channel_plan.keep.items())))
    text = f"{channel_plan.removed} channels removed, MACs/sample {before:,} -> {after:,}"
    run.rules["dead_channels"].add(channel_plan.removed, text + (f"; {kept}" if kept else ""))
    return True


def _shrink_meta(node: fx.Node, channels: int) -> None:
    """Record the smaller channel count in the node's shape metadata (later rules read it)."""
    for key in ("val", "example_value"):
        old = node.meta.get(key)
        if isinstance(old, torch.Tensor):
            shape = list(old.shape)
            shape[1] = channels
            mode = getattr(old, "fake_mode", None)
            with mode if mode is not None else torch.device(old.device):
                node.meta[key] = torch.empty(shape, dtype=old.dtype, device=old.device)
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "_replace"):
        shape = list(tm.shape)
        shape[1] = channels
        node.meta["tensor_meta"] = tm._replace(shape=torch.Size(shape))

