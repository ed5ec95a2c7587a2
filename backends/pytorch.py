"""PyTorch entry points: `repfuse.deploy` and the `torch.compile(backend="repfuse")` backend.

deploy() captures the model with dynamo (torch._dynamo.export: torch-level ops,
parameters as attributes), fuses it once, and returns a standalone GraphModule
whose fused weights are ordinary parameters.

The torch.compile backend must not bake weights in: dynamo hands parameters in
as graph inputs and does not guard on their identity or contents, so one
compiled graph serves every instance of a module class and survives
load_state_dict.  The fused graph therefore takes the fused weights as extra
inputs, computed by a prologue from the parameters of each call and cached on
the identity and `_version` of the tensors it read.
"""

from __future__ import annotations

import copy
import logging
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from ..passes import fx as fxpass
from ..passes.report import FusionReport
from ..patterns.planner import Plan

log = logging.getLogger("repfuse")

__all__ = ["deploy", "repfuse_backend", "TraceError", "compiled_graphs"]


class TraceError(RuntimeError):
    """The model could not be captured as one graph."""


# ---------------------------------------------------------------- deploy

def deploy(model: nn.Module, example_inputs: Any, *, explain: bool = False) -> fx.GraphModule:
    """The fused, inference-only form of `model` as a torch.fx.GraphModule.

    The model is not modified (a copy is traced in eval mode).  The report is
    at `result.meta["repfuse_report"]`; `explain=True` logs it, with the
    reason for every op that was left alone.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    module = copy.deepcopy(model).eval()
    with torch.no_grad():
        gm = _capture(module, example_inputs)
        report = fxpass.fuse_graph_module(gm)
    gm.meta["repfuse_report"] = report
    if explain:
        log.warning("repfuse.deploy:\n%s", report.table(explain=True))
    return gm


def _capture(module: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    name = type(module).__name__
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)  # dynamic-shape solver chatter is not the user's concern
    try:
        gm, _ = torch._dynamo.export(module, same_signature=True)(*example_inputs)
    except Exception as e:  # dynamo reports unsupported code with many exception types
        raise TraceError(f"cannot trace {name}: {_trace_message(e)}") from None
    finally:
        shapes_log.setLevel(level)
        torch._dynamo.reset()
    return gm


def _trace_message(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    where = ""
    for line in text.splitlines():  # dynamo appends the user frame: File "...", line N, in forward
        if line.strip().startswith("File ") and "site-packages/torch" not in line:
            where = line.strip()
    return f"{first} ({where})" if where else first


# ---------------------------------------------------------------- torch.compile backend

_COMPILED: "weakref.WeakSet[FusedGraph]" = weakref.WeakSet()


def compiled_graphs() -> list["FusedGraph"]:
    """The fused graphs the backend has built and that are still alive (for inspection and tests)."""
    return list(_COMPILED)


def repfuse_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None):
    """torch.compile backend.  options: {"inner": "inductor" | "eager" | callable, "explain": bool}."""
    options = dict(options or {})
    inner = _inner_compiler(options.pop("inner", "inductor"))
    explain = bool(options.pop("explain", False))
    if options:
        raise ValueError(f"repfuse backend: unknown options {sorted(options)} (known: inner, explain)")
    reason = _not_inference(gm, example_inputs)
    if reason:
        log.info("repfuse: graph passed through unchanged: %s", reason)
        return inner(gm, example_inputs)
    fused = FusedGraph(gm, list(example_inputs), inner)
    if explain:
        log.warning("repfuse backend:\n%s", fused.report.table(explain=True))
    if not fused.plan.regions:
        return inner(gm, example_inputs)
    _COMPILED.add(fused)
    return fused


def _inner_compiler(inner) -> Callable:
    if callable(inner):
        return inner
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx
    if inner == "eager":
        return lambda gm, example_inputs: gm.forward
    if inner == "tvm":
        try:
            from . import tvm as tvm_backend
        except ImportError as e:
            raise ValueError(f"repfuse backend: inner='tvm' needs apache-tvm: pip install 'repfuse[tvm]' ({e})") from None
        return tvm_backend.compile_fx
    raise ValueError(f"repfuse backend: unknown inner compiler {inner!r} (use 'inductor', 'eager' or a callable)")


def _not_inference(gm: fx.GraphModule, example_inputs) -> str | None:
    """Why this graph must not be rewritten, or None when it is an inference graph."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
        return "gradients are required (grad enabled and inputs or parameters require grad)"
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.nn.functional.batch_norm and fxpass._arg(node, 5, "training", False):
            return "BatchNorm in training mode"
        if node.target is torch.batch_norm and node.args[5]:
            return "BatchNorm in training mode"
    return None


def _parameter_inputs(gm: fx.GraphModule, example_inputs) -> list[int]:
    """Indices of the placeholders that hold module parameters or buffers."""
    from torch._dynamo.source import is_from_unspecialized_param_buffer_source

    idx = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor):
            continue
        arg = node.meta.get("grapharg")
        source = getattr(arg, "source", None)
        if isinstance(value, nn.Parameter) or (source is not None and is_from_unspecialized_param_buffer_source(source)):
            idx.append(i)
    return idx


def _static_examples(tensors: list[torch.Tensor]) -> list:
    """The fused weights as fake tensors of dynamo's fake mode, with static shapes.

    Real tensors unknown to dynamo would be fakeified by the inner compiler with
    fresh symbolic sizes that have no source, which breaks guard creation.
    """
    context = torch._guards.TracingContext.try_get()
    if context is None or context.fake_mode is None:
        return tensors
    return [context.fake_mode.from_tensor(t, static_shapes=True) for t in tensors]


class FusedGraph:
    """The callable handed back to dynamo: prologue (cached fused weights) + inner-compiled fused graph."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, inner: Callable):
        self.original = gm  # never modified: re-planned when parameters change
        self.inner = inner
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.param_index = _parameter_inputs(gm, example_inputs)
        self.recomputes = 0
        self._fallback: Callable | None = None
        self._use_fallback = False

        params = [example_inputs[i] for i in self.param_index]
        with torch.no_grad():
            self.plan, view = self._plan(params)
            before = fxpass.graph_stats(view)
            rows = fxpass.region_rows(view, self.plan)
            if not self.plan.regions:
                self.report = FusionReport(before, before, [], [(str(k), v) for k, v in self.plan.declined.items()])
                return
            self.graph_module, tensors = self._build(gm, params)
            after = fxpass.graph_stats(fxpass.FxView(self.graph_module, self._constants(self.graph_module, params)))
        self.report = FusionReport(before, after, rows, [(str(k), v) for k, v in self.plan.declined.items()])
        self._signature = self.plan.signature()
        self._remember(params, tensors)
        self.compiled = inner(self.graph_module, list(example_inputs) + _static_examples(tensors))

    # -- planning
    def _constants(self, gm: fx.GraphModule, params: list) -> dict[fx.Node, torch.Tensor]:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        return {placeholders[i]: t for i, t in zip(self.param_index, params)}

    def _plan(self, params: list) -> tuple[Plan, fxpass.FxView]:
        return fxpass.fuse(self.original, self._constants(self.original, params))

    def _build(self, gm: fx.GraphModule, params: list):
        work = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        work_plan, view = fxpass.fuse(work, self._constants(work, params))

        def constant_node(name: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
            first_op = next(n for n in work.graph.nodes if n.op != "placeholder")
            with work.graph.inserting_before(first_op):
                node = work.graph.placeholder(name)
            node.meta["example_value"] = tensor
            return node

        tensors = fxpass.apply_plan(view, work_plan, constant_node, fxpass.example_like)
        work.graph.lint()
        work.recompile()
        return work, list(tensors.values())

    # -- prologue
    def _remember(self, params: list, tensors: list) -> None:
        self._params = list(params)
        self._versions = [p._version for p in params]
        self._tensors = tensors

    def _fresh(self, params: Sequence[torch.Tensor]) -> bool:
        return len(params) == len(self._params) and all(
            p is q and p._version == v for p, q, v in zip(params, self._params, self._versions))

    def _refresh(self, params: list) -> None:
        self.recomputes += 1
        with torch.no_grad():
            new_plan, _ = self._plan(params)
            if new_plan.signature() != self._signature:
                log.warning("repfuse: new weights change what can be fused exactly; running the unfused graph")
                self._use_fallback = True
                self._remember(params, [])
                return
            like = self._tensors
            tensors = []
            for i, region in enumerate(new_plan.regions):
                w, b = fxpass.fused_tensors(region, like[2 * i])
                tensors += [w, b]
        self._use_fallback = False
        self._remember(params, tensors)

    def __call__(self, *args):
        params = [args[i] for i in self.param_index]
        if not self._fresh(params):
            self._refresh(params)
        if self._use_fallback:
            if self._fallback is None:
                self._fallback = self.inner(self.original, list(args))
            return self._fallback(*args)
        return self.compiled(*args, *self._tensors)
