"""PyTorch entry points: `repfuse.deploy` and the `torch.compile(backend="repfuse")` backend.

deploy() captures the model with torch.export (aten ops, every input dim dynamic where
the model allows, size guards kept), fuses it once, and returns a standalone GraphModule
whose fused weights are ordinary parameters and whose first op checks the input sizes.

The torch.compile backend must not bake weights in: dynamo hands parameters in
as graph inputs and does not guard on their identity or contents, so one
compiled graph serves every instance of a module class and survives
load_state_dict.  The fused graph therefore takes the fused weights as extra
inputs, computed by a prologue from the parameters of each call and cached on
the identity and `_version` of the tensors it read.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import warnings
import weakref
from operator import attrgetter, is_, itemgetter
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from ..passes import fx as fxpass
from ..patterns.report import FusionReport
from ..patterns.rules import enabled
from ..passes.fx_write import run_rules
from .trace import trace

log = logging.getLogger("repfuse")

__all__ = ["deploy", "repfuse_backend", "TraceError", "ShapeGuardError", "compiled_graphs"]


class TraceError(RuntimeError):
    """The model could not be captured as one graph."""


# ---------------------------------------------------------------- deploy

def deploy(model: nn.Module, example_inputs: Any, *, explain: bool = False, disable: Sequence[str] = (),
           enable: Sequence[str] = (), dynamic_shapes: Any = None) -> fx.GraphModule:
    """The fused, inference-only form of `model` as a torch.fx.GraphModule.

    The model is not modified (a copy is captured in eval mode with `torch.export.export`).
    Every dim of every tensor input is dynamic unless the model fixes it (`Dim.AUTO`; pass
    `dynamic_shapes` to choose yourself): the result is valid for every input size the
    capture allows, and a call outside those sizes fails with `ShapeGuardError` naming the
    assumption (an example dim of size 1 is fixed at 1).  The report is at
    `result.meta["repfuse_report"]`; `explain=True` logs it, with the reason for every op
    that was left alone.  `disable` / `enable` switch rules by name
    (`repfuse.patterns.rules.RULES`; e.g. disable=["dead_channels"]).
    """
    rules = enabled(disable, enable)
    if not isinstance(model, nn.Module):
        raise TypeError(f"repfuse.deploy takes a torch.nn.Module, not {type(model).__name__} "
                        "(wrap a function in a Module's forward)")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"repfuse.deploy: example_inputs must be a tensor or a tuple of inputs, "
                        f"not {type(example_inputs).__name__}")
    example_inputs = tuple(example_inputs)
    _check_arguments(model, example_inputs)
    if model.training:
        warnings.warn(f"repfuse.deploy: {type(model).__name__} is in training mode; deploying its eval() form "
                      "(BatchNorm uses its running statistics, dropout is off)", stacklevel=2)
    module = copy.deepcopy(model).eval()
    with torch.no_grad():
        fast = None if dynamic_shapes is not None else trace(module, example_inputs, functools.partial(
            fuse_graph_module, rules=rules))
        if fast is not None:
            gm, dims, report = fast
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            _install_guard(gm, ShapeGuard([str(n.target) for n in placeholders], dims, {}, []))
        else:
            gm = _capture(module, example_inputs, dynamic_shapes)
            report = fuse_graph_module(gm, rules=rules)
    gm.meta["repfuse_report"] = report
    gm.eval()
    if explain:
        log.warning("repfuse.deploy:\n%s", report.table(explain=True))
    return gm


def _check_arguments(model: nn.Module, example_inputs: tuple) -> None:
    """Example inputs that forward() cannot take are the caller's mistake: say so before tracing."""
    import inspect

    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or C++ forward: let the capture find out
        return
    try:
        signature.bind(*example_inputs)
    except TypeError as e:
        raise TypeError(f"repfuse.deploy: the example inputs do not match {type(model).__name__}.forward"
                        f"{signature}: {e} (give one example per positional argument, as a tuple)") from None


def fuse_graph_module(gm: fx.GraphModule, example_inputs=None, rules: frozenset[str] | None = None) -> FusionReport:
    """Rewrite `gm` in place with the enabled rules (default: patterns.rules defaults); returns the report.

    Works on graphs from torch.fx.symbolic_trace, dynamo and torch.export.  Shapes come from node
    meta; when they are missing, `example_inputs` are run through ShapeProp first.  Parameters that
    require grad count as constants only under torch.no_grad().
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if example_inputs is not None and any(fxpass.node_shape(n) is None for n in placeholders):
        from torch.fx.passes.shape_prop import ShapeProp

        ShapeProp(gm).propagate(*example_inputs)
    before = fxpass.graph_stats(fxpass.FxView(gm))

    constant_node = _attribute_constants(gm, parameters=True, meta_key="val")
    run, _ = run_rules(gm, None, constant_node, enabled() if rules is None else rules)
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name, _ in list(gm.named_parameters(recurse=False)) + list(gm.named_buffers(recurse=False)):
        if name not in used:
            delattr(gm, name)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return FusionReport.of(before, fxpass.graph_stats(fxpass.FxView(gm)), run)


def _attribute_constants(gm: fx.GraphModule, parameters: bool, meta_key: str):
    """run_rules' `constant_node`: each new constant an attribute of `gm` (a frozen parameter, or a buffer),
    read by a get_attr node; its tensor under node.meta[meta_key] (export graphs use "val", dynamo's
    "example_value")."""

    def constant_node(name: str, tensor: torch.Tensor, before_node: fx.Node) -> fx.Node:
        name = _free_name(gm, name)
        if parameters:
            gm.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        else:
            gm.register_buffer(name, tensor)
        with gm.graph.inserting_before(before_node):
            node = gm.graph.get_attr(name)
        node.meta[meta_key] = tensor
        return node

    return constant_node


def _free_name(gm: nn.Module, name: str) -> str:
    candidate, i = name, 0
    while hasattr(gm, candidate):
        i += 1
        candidate = f"{name}_{i}"
    return candidate


def _capture(module: nn.Module, example_inputs: tuple, dynamic_shapes=None) -> fx.GraphModule:
    """torch.export with every tensor dim dynamic where the model allows, as a plain picklable
    GraphModule whose first op checks the input sizes against what the capture assumed."""
    name = type(module).__name__
    automatic = dynamic_shapes is None
    if automatic:
        auto = torch.export.Dim.AUTO
        dynamic_shapes = tuple(
            {d: auto for d in range(t.dim())} if isinstance(t, torch.Tensor) else None for t in example_inputs)
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)  # dynamic-shape solver chatter is not the user's concern
    # clones: a failed capture leaves torch's dynamic-dim marks on the tensors it was given
    fresh = lambda: tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in example_inputs)  # noqa: E731
    try:
        try:
            program = torch.export.export(module, fresh(), dynamic_shapes=dynamic_shapes)
        except Exception as e:
            if not automatic:
                raise
            # torch's shape solver gives up on some models it could specialize (a fixed-size pooling
            # head): capture at the example's sizes, which the ShapeGuard then enforces
            log.warning("repfuse.deploy: %s could not be captured with dynamic sizes (%s); captured at the "
                        "example's sizes", name, _trace_message(e))
            program = torch.export.export(module, fresh())
    except Exception as e:  # export reports unsupported code with many exception types
        raise TraceError(f"cannot trace {name}: {_trace_message(e)}") from None
    finally:
        shapes_log.setLevel(level)
    unlifted = program.module()
    placeholders = [n for n in unlifted.graph.nodes if n.op == "placeholder"]
    _install_guard(unlifted, ShapeGuard.of(program, placeholders))
    unlifted.graph._tracer_cls = None  # export's tracer cannot be rebuilt when the module is unpickled
    gm = fx.GraphModule(unlifted, unlifted.graph, class_name=name)  # no export hooks: picklable
    gm.meta.update(unlifted.meta)
    return gm


def _install_guard(gm: fx.GraphModule, guard: "ShapeGuard") -> None:
    """`guard` as the graph's first call, replacing export's own check (not picklable; the guard checks the same)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    gm._guards_fn = guard
    with graph.inserting_after(placeholders[-1] if placeholders else next(iter(graph.nodes))):
        graph.call_module("_guards_fn", tuple(placeholders))
    gm.recompile()


def _finite(bound) -> int | None:
    """A range bound as an int; None for an infinite one (sympy's oo / torch's int_oo)."""
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


class ShapeGuardError(AssertionError):
    """A deployed model was called with an input size its capture did not allow."""


class ShapeGuard(nn.Module):
    """Checks a deployed model's inputs against what the capture assumed about their sizes:
    static dims, dims that must be equal, symbolic ranges and export's own guards (a `forward`
    that branches on a size).  Data only, so the deployed module pickles."""

    _is_impure = True  # never removed as dead code

    def __init__(self, names: list[str], dims: list[list], ranges: dict[str, tuple], guards: list[str]):
        super().__init__()
        self.names, self.dims, self.ranges = names, dims, ranges
        # export's guards read inputs as L['name']; here they are args[i].  A nested input path has nothing
        # to map to: export checked it at capture.
        scope = {f"L['{name}']": f"args[{i}]" for i, name in enumerate(names)}
        self.checks = []  # (python expression over args, the guard as export wrote it)
        for guard in guards:
            code = guard
            for k, v in scope.items():
                code = code.replace(k, v)
            if "L[" not in code:
                self.checks.append((code, guard))

    @classmethod
    def of(cls, program, placeholders: list[fx.Node]) -> "ShapeGuard":
        names, dims = [], []
        for node in placeholders:
            val = node.meta.get("val")
            names.append(str(node.target))
            dims.append([d if isinstance(d, int) else str(d.node.expr) for d in val.shape]
                        if isinstance(val, torch.Tensor) else None)
        ranges = {}
        for sym, vr in program.range_constraints.items():
            ranges[str(sym)] = (_finite(vr.lower), _finite(vr.upper))
        return cls(names, dims, ranges, list(getattr(program, "_guards_code", [])))

    def forward(self, *args):
        import sympy

        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if torch.jit.is_tracing() or any(not isinstance(d, int) for t in tensors for d in t.shape):
            return  # traced again (ONNX export, torch.export, torch.compile): the tracer keeps its own guards

        env: dict[str, int] = {}
        where: dict[str, str] = {}  # symbol -> the input dim that gave its value
        for name, spec, arg in zip(self.names, self.dims, args):
            if spec is None or not isinstance(arg, torch.Tensor):
                continue
            shape = tuple(arg.shape)
            if len(shape) != len(spec):
                raise ShapeGuardError(f"input {name!r} has {len(shape)} dims, the deployed model takes {len(spec)}")
            for i, (want, got) in enumerate(zip(spec, shape)):
                if isinstance(want, int):
                    if got != want:
                        raise ShapeGuardError(f"input {name!r} dim {i} is {got}; the deployed model was captured "
                                              f"with it fixed at {want}")
                elif want in self.ranges or want.isidentifier():
                    if env.setdefault(want, got) != got:
                        raise ShapeGuardError(f"input {name!r} dim {i} is {got} but must equal {where[want]}, "
                                              f"which is {env[want]} (the capture tied them)")
                    where.setdefault(want, f"input {name!r} dim {i}")
        for sym, (low, high) in self.ranges.items():
            v = env.get(sym)
            # export assumes a dynamic size is >= 2 without depending on it; torch checks only larger minimums too
            if v is not None and ((low is not None and low > 2 and v < low) or (high is not None and v > high)):
                raise ShapeGuardError(f"{where[sym]} is {v}; the deployed model was captured for sizes in "
                                      f"[{low}, {'inf' if high is None else high}] there")
        for name, spec, arg in zip(self.names, self.dims, args):  # derived dims such as 2*s0
            for i, want in enumerate(spec or ()):
                if isinstance(want, str) and want not in env:
                    expected = sympy.sympify(want).subs({sympy.Symbol(k): v for k, v in env.items()})
                    if expected.is_number and int(expected) != arg.shape[i]:
                        raise ShapeGuardError(f"input {name!r} dim {i} is {arg.shape[i]}, expected {want} = "
                                              f"{int(expected)}")
        for code, guard in self.checks:
            if not eval(_compiled(code), {"math": math, "torch": torch}, {"args": args}):
                raise ShapeGuardError(f"the model was captured under the condition {guard.replace('L[', '[')}, "
                                      "which these inputs break (its forward branches on an input size)")


@functools.lru_cache(maxsize=None)
def _compiled(expression: str):
    """A guard compiled once per process (code objects do not pickle, so the guard keeps the text)."""
    return compile(expression, "<repfuse shape guard>", "eval")


def _trace_message(e: BaseException) -> str:
    """The first line of the tracer's error and the user's line that caused it."""
    import os
    import traceback

    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    torch_dir = os.path.dirname(torch.__file__)
    ours = tuple(os.path.dirname(os.path.abspath(f)) for f in (__file__, fxpass.__file__))
    where = ""
    for frame in traceback.extract_tb(e.__traceback__):
        if not frame.filename.startswith((torch_dir,) + ours) and "site-packages" not in frame.filename:
            where = f'File "{frame.filename}", line {frame.lineno}, in {frame.name}'
    for line in text.splitlines():  # dynamo appends the user frame: File "...", line N, in forward
        if not where and line.strip().startswith("File ") and "site-packages/torch" not in line:
            where = line.strip()
    return f"{first} ({where})" if where else first


# ---------------------------------------------------------------- torch.compile backend

_COMPILED: "weakref.WeakSet[FusedGraph]" = weakref.WeakSet()


def compiled_graphs() -> list["FusedGraph"]:
    """The fused graphs the backend has built and that are still alive (for inspection and tests)."""
    return list(_COMPILED)


BACKEND_OPTIONS = ("inner", "explain", "disable", "enable", "freezing")


def repfuse_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
                    mode: str | None = None, **_unused):
    """torch.compile backend.  options: {"inner": "inductor" | "eager" | "tvm" | callable, "explain": bool,
    "disable": [rule names], "enable": [rule names], "freezing": bool} (rules: repfuse.patterns.rules.RULES).
    `mode` (torch.compile's "default", "reduce-overhead", "max-autotune", ...) goes to inductor;
    torch.compile takes mode or options, not both.  "freezing" (default: inductor's `freezing` config)
    bakes the fused weights and every parameter into the graph as constants, for inductor to fold: like
    inductor's own freezing, later changes to the parameters are not seen."""
    options = dict(options or {})
    try:
        freezing = bool(options.pop("freezing", _inductor_freezing()))
        inner = _inner_compiler(options.pop("inner", "inductor"), mode, freezing)
        explain = bool(options.pop("explain", False))
        rules = enabled(options.pop("disable", ()), options.pop("enable", ()))
        if options:
            raise ValueError(f"repfuse backend: unknown options {sorted(options)} "
                             f"(known: {', '.join(BACKEND_OPTIONS)})")
    except ValueError as e:  # the user's options: their message, without dynamo's frames around it
        message = str(e) if str(e).startswith("repfuse backend") else f"repfuse backend: {e}"
        raise _option_error(message, inspect.currentframe()) from None
    reason = _not_inference(gm, example_inputs)
    if reason:
        log.info("repfuse: graph passed through unchanged: %s", reason)
        return inner(gm, example_inputs)
    fused = (FrozenGraph if freezing else FusedGraph)(gm, list(example_inputs), inner, rules)
    if explain:
        log.warning("repfuse backend:\n%s", fused.report.table(explain=True))
    if not fused.changed:
        return inner(gm, example_inputs)
    _COMPILED.add(fused)
    return fused


def _option_error(message: str, frame) -> Exception:
    """A ValueError for bad backend options that dynamo re-raises with its own frames cut off (it does so for
    its ShortenTraceback exceptions): the user sees the message, not 30 lines of torch internals."""
    try:
        from torch._dynamo.exc import ShortenTraceback
    except ImportError:
        return ValueError(message)

    return _BackendOptionError(ShortenTraceback)(message, first_useful_frame=frame)


@functools.lru_cache(maxsize=None)
def _BackendOptionError(base: type) -> type:  # noqa: N802 - a class, built once
    return type("BackendOptionError", (base, ValueError), {"__module__": "repfuse", "__doc__": "Bad backend options."})


def _inductor_freezing() -> bool:
    try:
        from torch._inductor import config
    except ImportError:
        return False
    return bool(config.freezing)


def _inner_compiler(inner, mode: str | None = None, freezing: bool = False) -> Callable:
    if callable(inner):
        return inner
    if inner == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        try:
            patches = {} if mode in (None, "default") else list_mode_options(mode)
        except RuntimeError as e:
            raise ValueError(f"repfuse backend: {e}") from None
        if freezing:
            patches["freezing"] = True
        if not patches:
            return compile_fx
        return lambda gm, example_inputs: compile_fx(gm, example_inputs, config_patches=patches)
    if inner == "eager":
        return lambda gm, example_inputs: gm.forward
    if inner == "tvm":
        try:
            from . import tvm as tvm_backend
        except ImportError as e:
            raise ValueError(f"repfuse backend: inner='tvm' needs apache-tvm: pip install 'repfuse[tvm]' "
                             f"({e})") from None
        return tvm_backend.compile_fx
    raise ValueError(f"repfuse backend: unknown inner compiler {inner!r} (use 'inductor', 'eager' or a callable)")


def _not_inference(gm: fx.GraphModule, example_inputs) -> str | None:
    """Why this graph must not be rewritten, or None when it is an inference graph."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
        return "gradients are required (grad enabled and inputs or parameters require grad)"
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        call = fxpass.normalize(node, gm)
        if call is not None and call.op == "batch_norm" and call["training"]:
            return "BatchNorm in training mode"
    return None


def _parameter_inputs(gm: fx.GraphModule, example_inputs) -> list[int]:
    """Indices of the placeholders that hold module state: parameters, buffers and plain tensor attributes
    (DBB's `id_tensor`, added to a weight in forward).  The prologue watches them all alike."""
    from torch._dynamo.source import is_from_unspecialized_nn_module_source, is_from_unspecialized_param_buffer_source

    idx = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor):
            continue
        arg = node.meta.get("grapharg")
        source = getattr(arg, "source", None)
        # a module float dynamo passes as a fresh tensor each call (dynamic=True) is not state to watch
        of_module = source is not None and getattr(arg, "is_tensor", True) and (
            is_from_unspecialized_param_buffer_source(source) or is_from_unspecialized_nn_module_source(source))
        if isinstance(value, nn.Parameter) or of_module:
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
    """The callable handed back to dynamo: prologue (cached fused weights) + inner-compiled fused graph.

    The rules (`passes.fx_write.run_rules`) rewrite a copy of dynamo's graph; every
    constant they create (fused weights, folded slices, aggregated kernels) becomes a new
    placeholder that the prologue fills.  The inner graph takes only the outer arguments
    the fused graph still reads (`_kept`), then those constants.  The prologue watches only
    the parameters some rewritten node read (`_watched`): every other parameter is read
    live by the fused graph.  When a watched parameter is replaced or edited in place, the
    rules run again on a fresh copy; if the new weights change the rewrite (its signature),
    the unfused graph runs instead.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: list, inner: Callable, rules: frozenset[str]):
        self.original = gm  # never modified: rewritten again when parameters change
        self.inner = inner
        self.rules = rules
        self.param_index = _parameter_inputs(gm, example_inputs)
        self.recomputes = 0
        self._fallback: Callable | None = None
        self._use_fallback = False

        params = [example_inputs[i] for i in self.param_index]
        with torch.no_grad():
            work, (run, created) = self._rewrite(params)
            before = fxpass.graph_stats(fxpass.FxView(gm, self._constants(gm, params)))
            self.run = run
            if not run.modified:
                self.report = FusionReport.of(before, before, run)
                return
            after = fxpass.graph_stats(fxpass.FxView(work, self._constants(work, params, created)))
            watched = self._rewritten_params(gm, work)
            kept = self._drop_unused_inputs(work, example_inputs)
            # constants a later round folded again are read by nothing: neither passed nor recomputed
            self._created = [n.name for n in work.graph.nodes if n.op == "placeholder" and n.name in created]
        self.graph_module = work
        self.report = FusionReport.of(before, after, run)
        self._signature = run.signature
        self._watched = _getter(watched)
        self._kept = _getter(kept)
        tensors = [created[name] for name in self._created]
        self._remember(self._watched(example_inputs), tensors)
        self.compiled = inner(work, [example_inputs[i] for i in kept] + _static_examples(tensors))

    @property
    def changed(self) -> bool:
        return self.run.modified

    # -- rewriting
    def _constants(self, gm: fx.GraphModule, params: list, created: dict | None = None) -> dict:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        constants = {placeholders[i]: t for i, t in zip(self.param_index, params)}
        if created:
            constants.update({n: created[n.name] for n in placeholders if n.name in created})
        return constants

    def _rewrite(self, params: list):
        """Run the rules on a copy of the original graph; new constants become trailing placeholders."""
        work = fx.GraphModule(self.original, copy.deepcopy(self.original.graph))
        graph = work.graph
        last = ([n for n in graph.nodes if n.op == "placeholder"] or [None])[-1]  # placeholders are never erased

        def constant_node(name: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
            nonlocal last
            where = graph.inserting_after(last) if last is not None else graph.inserting_before(next(iter(graph.nodes)))
            with where:
                last = graph.placeholder(name)
            last.meta["example_value"] = tensor
            return last

        return work, run_rules(work, self._constants(work, params), constant_node, self.rules)

    def _rewritten_params(self, original: fx.GraphModule, work: fx.GraphModule) -> list[int]:
        """Argument positions of the parameters that a node the rules removed used to read."""
        alive = {n.name for n in work.graph.nodes}
        placeholders = [n for n in original.graph.nodes if n.op == "placeholder"]
        return [i for i in self.param_index if any(u.name not in alive for u in placeholders[i].users)]

    @staticmethod
    def _drop_unused_inputs(work: fx.GraphModule, example_inputs: list) -> list[int]:
        """Erase the outer-argument placeholders nothing reads any more; the positions kept."""
        placeholders = [n for n in work.graph.nodes if n.op == "placeholder"]
        kept = []
        for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
            if node.users or not isinstance(value, torch.Tensor):
                kept.append(i)  # symbolic sizes stay: the inner compiler may bind them
            else:
                work.graph.erase_node(node)
        for node in placeholders[len(example_inputs):]:  # the rules' own constants
            if not node.users:
                work.graph.erase_node(node)
        work.graph.lint()
        work.recompile()
        return kept

    # -- prologue
    def _remember(self, watched: tuple, tensors: list) -> None:
        self._params = watched
        self._versions = [p._version for p in watched]
        self._tensors = tensors

    def _refresh(self, args: tuple) -> None:
        self.recomputes += 1
        with torch.no_grad():
            _, (run, created) = self._rewrite([args[i] for i in self.param_index])
        if run.signature != self._signature:
            log.warning("repfuse: new weights change what can be rewritten exactly; running the unfused graph")
            self._use_fallback = True
            self._remember(self._watched(args), [])
            return
        self._use_fallback = False
        self._remember(self._watched(args), [created[name] for name in self._created])

    def __call__(self, *args):
        watched = self._watched(args)
        # identity first (a replaced tensor), then in-place edits; both C-level loops
        if not all(map(is_, watched, self._params)) or list(map(_version, watched)) != self._versions:
            self._refresh(args)
        if self._use_fallback:
            if self._fallback is None:
                self._fallback = self.inner(self.original, list(args))
            return self._fallback(*args)
        return self.compiled(*self._kept(args), *self._tensors)


class FrozenGraph:
    """The backend's result under freezing: every parameter the graph reads and every fused weight is an
    attribute of the graph module (inductor freezes attributes, not graph inputs), baked at compile time."""

    recomputes = 0  # nothing is watched: a frozen graph never recomputes its weights

    def __init__(self, gm: fx.GraphModule, example_inputs: list, inner: Callable, rules: frozenset[str]):
        state = _parameter_inputs(gm, example_inputs)
        original = [n for n in gm.graph.nodes if n.op == "placeholder"]
        before = fxpass.graph_stats(fxpass.FxView(gm, {original[i]: example_inputs[i] for i in state}))
        work = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        placeholders = [n for n in work.graph.nodes if n.op == "placeholder"]
        first = next((n for n in work.graph.nodes if n.op != "placeholder"), None)
        constant_node = _attribute_constants(work, parameters=False, meta_key="example_value")
        for i in state:
            attr = constant_node(f"state_{placeholders[i].name}", example_inputs[i].detach(), first)
            attr.meta.update(placeholders[i].meta)
            placeholders[i].replace_all_uses_with(attr)

        with torch.no_grad():
            self.run, _ = run_rules(work, None, constant_node, rules)
        self._kept = _getter(FusedGraph._drop_unused_inputs(work, example_inputs))
        self.graph_module = work
        self.report = FusionReport.of(before, fxpass.graph_stats(fxpass.FxView(work)), self.run)
        self.compiled = inner(work, list(self._kept(example_inputs)))

    @property
    def changed(self) -> bool:
        return self.run.modified

    def __call__(self, *args):
        return self.compiled(*self._kept(args))


_version = attrgetter("_version")


def _getter(positions: list[int]) -> Callable[[Sequence], tuple]:
    """A fast `lambda args: tuple(args[i] for i in positions)`."""
    if len(positions) > 1:
        return itemgetter(*positions)
    if positions:
        i = positions[0]
        return lambda args: (args[i],)
    return lambda args: ()
