"""PyTorch FX writer: the plan vocabulary (patterns.plan) as FX nodes, and the FX entry points.

New constants come from `constant_node(name, tensor, before)`: get_attr for `repfuse.deploy`,
placeholder for the torch.compile backend, which recomputes them when the weights change.
"""

from __future__ import annotations

import re

import operator
from collections import namedtuple
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from ..patterns import plan as P
from ..patterns.rules import Run, enabled, run
from ..patterns.affine import AffineConv, ConvTranspose
from .fx import SHAPE_META, FxView, example_size, is_pure, module_path, node_shape, same_shape, static_size

__all__ = ["run_rules", "FxAdapter"]

ConstantNode = Callable[[str, torch.Tensor, fx.Node], fx.Node]
_CONV_FN = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}
_CONV_TRANSPOSE_FN = {1: torch.conv_transpose1d, 2: torch.conv_transpose2d, 3: torch.conv_transpose3d}


def example_like(node) -> torch.Tensor | None:
    """A tensor (often fake) with the dtype and device a node's new constants should have."""
    for key in ("val", "example_value"):
        v = node.meta.get(key) if isinstance(node, fx.Node) else None
        if isinstance(v, torch.Tensor):
            return v
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return None if tm is None else torch.empty(0, dtype=tm.dtype)


def module_scope(node: fx.Node) -> str:
    """The module path a node was traced in, as an identifier ("stages.1.0" -> "stages_1_0"); the node's own
    name when the graph kept no module stack."""
    name = re.sub(r"[^0-9A-Za-z]+", "_", module_path(node) or node.name).strip("_") or node.name
    return name if name[0].isalpha() else f"layer_{name}"


def to_tensor(array: np.ndarray, like: torch.Tensor | None) -> torch.Tensor:
    """A float64 numpy array as a torch tensor in the model's dtype and device."""
    dtype = like.dtype if like is not None and like.dtype.is_floating_point else torch.float32
    device = like.device if like is not None else "cpu"
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # a cached read of a weight, passed through unchanged
        array = array.copy()
    return torch.from_numpy(array).to(device=device, dtype=dtype)


class FxEmitter:
    """Builds one edit's nodes before `at`, with constants in the dtype of `like`."""

    def __init__(self, adapter: "FxAdapter", view: FxView, at: fx.Node, like: torch.Tensor | None, source=None):
        self.adapter, self.view, self.graph, self.at, self.like = adapter, view, view.graph, at, like
        self.source = source  # the value the edit's term reads

    def _const(self, array: np.ndarray, role: str) -> fx.Node:
        return self.adapter.new_constant(to_tensor(array, self.like), self.at, role)

    def _call(self, fn, *args) -> fx.Node:
        with self.graph.inserting_before(self.at):
            return self.graph.call_function(fn, args)

    def constant(self, of: fx.Node) -> fx.Node:
        node = self.adapter.new_constant(self.view.const(of).clone(), self.at, "folded")
        node.meta.update({k: v for k, v in of.meta.items() if k in SHAPE_META})
        return node

    def conv(self, x: fx.Node, op: AffineConv, weight=None, bias=None, groups=None) -> fx.Node:
        """One conv (after an F.pad for asymmetric padding) with op's geometry."""
        sym = tuple(min(p) for p in op.pads)
        extra = [(b - s, e - s) for (b, e), s in zip(op.pads, sym)]
        if any(e != (0, 0) for e in extra):
            x = self._call(F.pad, x, [p for pair in reversed(extra) for p in pair])  # torch order: last dim first
        weight = self._const(op.weight, "weight") if weight is None else weight
        bias = self._const(op.bias, "bias") if bias is None else bias
        return self._call(_CONV_FN[op.rank], x, weight, bias, op.stride, sym, op.dilation,
                          op.groups if groups is None else groups)

    def conv_transpose(self, x: fx.Node, op: ConvTranspose) -> fx.Node:
        """One transposed conv (cannot_write checked that it pads both ends of a dim alike)."""
        padding = tuple(b for b, _ in op.pads)
        return self._call(_CONV_TRANSPOSE_FN[op.rank], x, self._const(op.weight, "weight"),
                          self._const(op.bias, "bias"),  # [I, O/g, *k]
                          op.stride, padding, op.output_padding, op.groups, op.dilation)

    def linear(self, x: fx.Node, weight: np.ndarray, bias: np.ndarray) -> fx.Node:
        return self._call(F.linear, x, self._const(weight, "weight"), self._const(bias, "bias"))  # W [O, I]

    def scale_shift(self, x: fx.Node, scale, shift, rank: int) -> fx.Node:
        meta = {k: v for k, v in x.meta.items() if k in SHAPE_META}
        for fn, vector, role in ((torch.mul, scale, "scale"), (torch.add, shift, "shift")):
            if vector is not None:
                x = self._call(fn, x, self._const(vector.reshape((-1,) + (1,) * rank), role))  # [C, 1 x rank]
                x.meta.update(meta)  # same shape and dtype: later rounds read them
        return x

    def relu(self, x: fx.Node) -> fx.Node:
        return self._call(torch.relu, x)

    def reshape(self, x: fx.Node, like: fx.Node, perm=None) -> fx.Node:
        """x (the fused op on the source: the source's leading dims) reshaped to like's shape (read through perm)."""
        sizes = _target_shape(P.unpermuted(node_shape(like), perm), node_shape(self.source))
        if sizes == "same":
            return x
        sizes = [self._call(torch.ops.aten.sym_size.int, x, d[1]) if isinstance(d, tuple) else d for d in sizes]
        return self._call(torch.reshape, x, sizes)

    def permute(self, x: fx.Node, perm) -> fx.Node:
        return self._call(torch.permute, x, list(perm))

    def batched_conv(self, x: fx.Node, term: P.BatchedConv) -> fx.Node:
        """conv(x viewed as [1, N*C, ...], per-sample kernels stacked to [N*O, I/g, *k], groups N*g)."""
        static, (K, O) = term.static, term.biases.shape
        pi = self._call(torch.cat, [self._call(torch.reshape, s, (-1, 1)) for s in term.scales], 1)  # [N, K]
        mixed = self._const(term.weights.reshape(K, -1), "expert_weights")  # [K, O*I/g*prod(k)]
        if term.has_static_weight:
            w = self._call(torch.addmm, self._const(static.weight.reshape(1, -1), "weight"), pi, mixed)
        else:
            w = self._call(torch.mm, pi, mixed)  # [N, O*I/g*prod(k)]
        w = self._call(torch.reshape, w, (-1,) + static.weight.shape[1:])  # [N*O, I/g, *k]
        b = self._call(torch.addmm, self._const(static.bias.reshape(1, O), "bias"), pi,
                           self._const(term.biases, "expert_biases"))  # [N, O]
        b = self._call(torch.reshape, b, (-1,))  # [N*O]
        groups = self._call(operator.mul, self._call(torch.Tensor.size, x, 0), static.groups)
        merged = self._call(torch.unsqueeze, self._call(torch.flatten, x, 0, 1), 0)  # [1, N*C, ...]
        y = self.conv(merged, static, w, b, groups)  # [1, N*O, ...]
        out = node_shape(self.at)
        if out is not None:  # shapes for the report's MAC count: per sample, though the batch runs as groups
            n = example_size(out[0]) or 1
            y.meta["tensor_meta"] = _Shape(torch.Size([1, n * O] + [example_size(d) or 1 for d in out[2:]]))
            w.meta["tensor_meta"] = _Shape(torch.Size((n * O,) + static.weight.shape[1:]))
            y.meta["repfuse_samples"] = n
        return self._call(torch.squeeze, self._call(torch.unflatten, y, 1, (-1, O)), 0)  # [N, O, ...]


_Shape = namedtuple("_Shape", "shape dtype", defaults=(torch.float32,))  # what graph_stats reads from tensor_meta


class FxAdapter:
    """patterns.rules.Adapter for an FX GraphModule, rewritten in place."""

    def __init__(self, gm: fx.GraphModule, constants: dict | None, constant_node: ConstantNode):
        self.gm, self.constants, self.constant_node = gm, dict(constants or {}), constant_node
        self.created: dict[str, torch.Tensor] = {}  # new constants, in creation order

    def new_constant(self, tensor: torch.Tensor, before: fx.Node, role: str) -> fx.Node:
        """A constant named after the module the rewritten value belongs to: `stages_1_0_weight`."""
        base = f"{module_scope(before)}_{role}"
        name, i = base, 0
        while name in self.created or hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        node = self.constant_node(name, tensor, before)
        self.created[node.name if node.op == "placeholder" else name] = tensor  # the graph may rename a placeholder
        if node.op == "placeholder":
            self.constants[node] = tensor
        return node

    def view(self) -> FxView:
        return FxView(self.gm, self.constants)

    def cannot_write(self, view: FxView, edit: P.Replace) -> str | None:
        for term in P.terms(edit.term):
            if isinstance(term, P.Reshape) and _target_shape(P.unpermuted(node_shape(term.like), term.perm),
                                                             node_shape(P.source_of(term))) is None:
                return "the region's output shape has dynamic dims its input does not give"
            op = term.op if isinstance(term, P.Apply) else term.static if isinstance(term, P.BatchedConv) else None
            if op is not None and P.lower(op)[0][0] == "conv" and op.rank not in _CONV_FN:
                return f"{op.rank}-D convolution"
            if isinstance(op, ConvTranspose) and any(b != e for b, e in op.pads):
                return "a transposed conv padded unevenly"
        return None

    def write(self, view: FxView, rule: str, edits: list) -> None:
        replaced: dict[fx.Node, fx.Node] = {}
        for edit in edits:
            if isinstance(edit, P.Resize):
                _resize(replaced.get(edit.value, edit.value), view, edit.value, edit.channels)
                continue
            old = edit.value
            like, source = example_like(old), P.source_of(edit.term)
            out = FxEmitter(self, view, old, like if like is not None else example_like(source), source)
            new = P.emit(out, edit.term, lambda key: replaced.get(key, key))
            new.meta.update({k: v for k, v in old.meta.items() if k in SHAPE_META + ("stack_trace", "nn_module_stack")})
            old.replace_all_uses_with(new)
            replaced[old] = new
            for n in reversed(edit.erase):
                for fill in view.pad_fills.get(n, ()):
                    _erase(view.graph, fill)
                _erase(view.graph, n)
        self.gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or (
            n.op in ("call_function", "call_method") and not is_pure(n)))
        self.gm.graph.lint()
        self.gm.recompile()


def _target_shape(target, source):
    """patterns.plan.reshape_sizes with FX's sizes (ints, or symbolic sizes compared as expressions)."""
    return P.reshape_sizes(target, source, static_size, lambda a, b: same_shape((a,), (b,)))


def _erase(graph: fx.Graph, node: fx.Node) -> None:
    """Erase a dead node, then any pure inputs it leaves dead (constant subgraphs)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.users or n.op in ("placeholder", "output") or getattr(n, "_erased", False):
            continue
        if n is not node and (n.op == "call_module" or not is_pure(n)):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(inputs)


def _resize(node: fx.Node, view: FxView, old: fx.Node, channels: int) -> None:
    """Record the smaller channel count in the node's shape metadata (later rules read it)."""
    layout = view.layout(old)
    for key in ("val", "example_value", "tensor_meta"):
        meta = node.meta.get(key)
        if meta is None or not hasattr(meta, "shape") or layout is None:
            continue
        shape = list(meta.shape)
        shape[len(shape) - 1 - layout.rank] = channels
        if isinstance(meta, torch.Tensor):
            mode = getattr(meta, "fake_mode", None)
            with mode if mode is not None else torch.device(meta.device):
                node.meta[key] = torch.empty(shape, dtype=meta.dtype, device=meta.device)
        elif hasattr(meta, "_replace"):
            node.meta[key] = meta._replace(shape=type(meta.shape)(shape))  # torch.Size, or a tuple with probed sizes


# ---------------------------------------------------------------- entry points

def run_rules(gm: fx.GraphModule, constants: dict | None, constant_node: ConstantNode,
              rules: frozenset[str] = enabled(), max_rounds: int = 4) -> tuple[Run, dict[str, torch.Tensor]]:
    """Rewrite `gm` in place with the enabled rules, to a fixed point; returns the run and the constants
    it created (by node name)."""
    adapter = FxAdapter(gm, constants, constant_node)
    return run(adapter, rules, max_rounds), adapter.created
