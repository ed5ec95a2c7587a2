"""TVM entry points: the `RepFuse` module pass and the "repfuse" Relax pipeline.

    import repfuse.backends.tvm                   # registers the pipeline
    ex = tvm.compile(mod, target="llvm", relax_pipeline="repfuse")
    mod = repfuse.backends.tvm.RepFuse()(mod)     # the pass alone, composable
    mod = RepFuse(disable=["dead_channels"])(mod) # rules by name (repfuse.patterns.rules)
    seq = repfuse.backends.tvm.pipeline("zero")   # repfuse in front of another pipeline
    mod, rows = repfuse.backends.tvm.fuse_module(mod)  # the fused module and one RuleRow per rule
    fuse = RepFuse(explain=True); mod = fuse(mod)  # logs what fused and why the rest was left alone;
    fuse.last_report, fuse.last_declines           # the rows, and every Decline(rule, node, reason)

A registered pipeline replaces the whole build pipeline, so "repfuse" runs
RepFuse and then exactly what relax_pipeline="default" would run for the
target.  Parameters must be constants (module constants, or bound with
relax.transform.BindParams): unbound parameters are left alone.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

try:
    import tvm
    from tvm import relax
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"repfuse's TVM path needs apache-tvm: pip install 'repfuse[tvm]' ({e})") from None

from ..passes import relax_write
from ..passes.relax import _dims
from ..patterns.report import FusionReport, GraphStats, RuleRow
from ..patterns import rules
from ..patterns.plan import Decline

__all__ = ["RepFuse", "fuse_module", "pipeline", "PIPELINE_NAME"]

PIPELINE_NAME = "repfuse"


def _names(names, what: str) -> tuple[str, ...]:
    """Rule names given as one string or an iterable of strings (TypeError, one line, otherwise)."""
    if isinstance(names, str):
        return (names,)
    try:
        names = None if isinstance(names, tvm.IRModule) else tuple(names)
    except Exception:  # noqa: BLE001 - whatever iterating it raised, it is not a list of names
        names = None
    if names is None or not all(isinstance(n, str) for n in names):
        raise TypeError(f"repfuse: {what}= takes rule names ({', '.join(rules.NAMES)}); "
                        f"to fuse a module, call RepFuse()(mod)")
    return names


def _check_module(mod) -> None:
    if not isinstance(mod, tvm.IRModule):
        raise TypeError(f"repfuse: expected a tvm.IRModule, got {type(mod).__name__} (convert a torch model with "
                        f"tvm.relax.frontend.torch.from_exported_program, an ONNX model with "
                        f"tvm.relax.frontend.onnx.from_onnx)")


class _RepFuse:
    """Run repfuse's rules (repfuse.patterns.rules) on every Relax function: constant folding,
    branch merging into one conv (+ bias add) per affine region, dynamic-conv aggregation and
    dead-channel removal.  `disable` / `enable` switch rules by name (unknown names raise ValueError).
    Parameters must be bound (relax.transform.BindParams); ops reading unbound ones are left alone,
    and the "affine" report row says so.

    After a call, `last_report` holds one RuleRow per rule (summed over the functions) and
    `last_declines` every patterns.plan.Decline (rule, node, reason); with `explain=True` the pass
    also logs the fusion report with the declines grouped by rule and reason (logger "repfuse")."""

    def __init__(self, disable=(), enable=(), explain=False):
        self.disable, self.enable = _names(disable, "disable"), _names(enable, "enable")
        self.rules = rules.enabled(self.disable, self.enable)  # unknown names fail here
        self.explain = bool(explain)
        self.last_report: list[RuleRow] = []
        self.last_declines: list[Decline] = []

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        runs: dict = {}
        fused, self.last_report = fuse_module(mod, self.disable, self.enable, runs=runs)
        self.last_declines = [d for run in runs.values() for d in run.declines.values()]
        if self.explain:
            regions = [r for run in runs.values() for r in run.regions]
            report = FusionReport(_stats(mod), _stats(fused), regions, self.last_declines, rules=self.last_report)
            logging.getLogger("repfuse").warning("repfuse (TVM Relax):\n%s", report.table(explain=True))
        return fused


class RepFuse(tvm.transform.module_pass(opt_level=0, name="RepFuse")(_RepFuse)):
    __doc__ = _RepFuse.__doc__

    def __call__(self, mod):
        _check_module(mod)  # one clear line, not TVM's FFI type error
        return super().__call__(mod)


def fuse_module(mod: tvm.IRModule, disable=(), enable=(), *,
                runs: dict | None = None) -> tuple[tvm.IRModule, list[RuleRow]]:
    """(the fused module, one RuleRow per rule, in patterns.rules order); the same module object when
    nothing applied.  `runs`, when given, receives each function's patterns.rules.Run by name."""
    _check_module(mod)
    enabled = rules.enabled(_names(disable, "disable"), _names(enable, "enable"))
    runs = {} if runs is None else runs
    runs.clear()
    updates = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        new_func, run = relax_write.run_rules(mod, func, enabled)
        runs[gvar.name_hint] = run
        if new_func is not func:
            updates[gvar] = new_func
    rows = [RuleRow(r.name, r.name in enabled) for r in rules.RULES]
    for run in runs.values():
        for row in rows:
            done = run.rules[row.name]
            if done.applied or done.detail:
                row.add(done.applied, done.detail)
    if not updates:
        return mod, rows
    mod = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(mod.functions, mod.attrs)
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod, rows


def _stats(mod: tvm.IRModule) -> GraphStats:
    """Op counts of the module's Relax functions, for the explain report; MACs of the convs and matmuls
    whose shapes are static."""
    stats = GraphStats(Counter())

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            name = e.op.name.split(".", 1)[-1]
            stats.ops[name] += 1
            if name in ("nn.conv1d", "nn.conv2d", "matmul"):
                stats.convs += 1
                out, weight = _dims(e), _dims(e.args[1])
                if out and weight and all(isinstance(d, int) for d in out[1:] + weight):
                    # conv: [N, O, *S] from [O, I/g, *k]; matmul: [..., O] from [I, O]
                    per_out = np.prod(weight[1:]) if name != "matmul" else weight[0]
                    stats.macs += int(np.prod(out[1:]) * per_out)
        elif isinstance(e, tvm.ir.expr.Constant) and hasattr(e.value, "numpy"):
            stats.params += int(np.prod(e.value.shape))

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return stats


def _inner_for(target) -> tvm.transform.Pass:
    """What relax_pipeline="default" runs for this target (see tvm.compile)."""
    if target is not None and "gpu" in target.keys:
        try:
            return relax.get_default_pipeline(target)
        except Exception:
            pass
    return relax.get_pipeline("default")


def pipeline(inner: str | tvm.transform.Pass | None = None, disable=(), enable=()) -> tvm.transform.Pass:
    """RepFuse(disable, enable) followed by `inner` (a pipeline name or pass; default: the target's
    default pipeline)."""
    disable, enable = _names(disable, "disable"), _names(enable, "enable")
    rules.enabled(disable, enable)  # unknown names fail here, not at build time
    if isinstance(inner, str) and inner not in relax.pipeline.PIPELINE_MAP:
        raise ValueError(f"repfuse: unknown Relax pipeline {inner!r}; known: {', '.join(relax.pipeline.PIPELINE_MAP)}")
    if inner is not None and not isinstance(inner, (str, tvm.transform.Pass)):
        raise TypeError(f"repfuse: inner= takes a pipeline name or a tvm.transform.Pass, got {type(inner).__name__}")

    @tvm.transform.module_pass(opt_level=0, name="repfuse_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if inner is None:
            rest = _inner_for(tvm.target.Target.current(allow_none=True))
        elif isinstance(inner, str):
            rest = relax.get_pipeline(inner)
        else:
            rest = inner
        return tvm.transform.Sequential([RepFuse(disable, enable), rest])(mod)

    return _pipeline


if PIPELINE_NAME not in relax.pipeline.PIPELINE_MAP:
    relax.register_pipeline(PIPELINE_NAME)(lambda **kwargs: pipeline())


# ---------------------------------------------------------------- TVM as torch.compile's inner compiler

def compile_fx(gm, example_inputs, target: str = "llvm"):
    """Inner compiler for torch.compile(backend="repfuse", options={"inner": "tvm"}).

    The (already fused) FX graph goes through torch.export and TVM's own
    frontend with every placeholder as a runtime input, so weights stay live
    exactly as on the inductor path; it is built with the "repfuse" pipeline
    and run on TVM's VM.  Shapes must be static.
    """
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    if not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise ValueError("repfuse backend: inner='tvm' needs static shapes (compile with dynamic=False)")
    # values do not matter for tracing; fake tensors from dynamo become real zeros
    concrete = tuple(torch.zeros(t.shape, dtype=t.dtype) for t in example_inputs)
    with torch.no_grad():
        exported = torch.export.export(gm, concrete, strict=False)
    mod = from_exported_program(exported, keep_params_as_input=False)
    executable = tvm.compile(mod, target=target, relax_pipeline=PIPELINE_NAME)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    main = vm["main"]

    def run(*args):
        inputs = [tvm.runtime.tensor(a.detach().contiguous().cpu().numpy()) for a in args]
        outputs = main(*inputs)
        return tuple(torch.from_numpy(o.numpy()) for o in outputs)

    return run


# ---------------------------------------------------------------- ONNX file -> deployable library

def compile_onnx(proto, out, target: str = "llvm") -> None:
    """Build an (already repfuse-optimized) ONNX ModelProto into a shared library at `out`, atomically.

    The Relax module is built with the "repfuse" pipeline, so anything the ONNX
    pass left (e.g. exposed only after TVM's import) is fused too.
    """
    import os
    import tempfile
    from pathlib import Path

    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(proto, keep_params_in_input=False)
    executable = tvm.compile(mod, target=target, relax_pipeline=PIPELINE_NAME)
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".repfuse-") as tmp:
        staged = Path(tmp) / out.name
        executable.export_library(str(staged))
        os.replace(staged, out)


def run_library(path, feeds: dict, input_names: list[str]) -> list:
    """Run a library built by compile_onnx on numpy inputs; returns numpy outputs."""
    lib = tvm.runtime.load_module(str(path))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    result = vm["main"](*[tvm.runtime.tensor(feeds[name]) for name in input_names])
    items = result if hasattr(result, "__len__") and not hasattr(result, "numpy") else [result]
    return [item.numpy() for item in items]
