"""TVM entry points: the `RepFuse` module pass and the "repfuse" Relax pipeline.

    import repfuse.backends.tvm                   # registers the pipeline
    ex = tvm.compile(mod, target="llvm", relax_pipeline="repfuse")
    mod = repfuse.backends.tvm.RepFuse()(mod)     # the pass alone, composable
    seq = repfuse.backends.tvm.pipeline("zero")   # repfuse in front of another pipeline

A registered pipeline replaces the whole build pipeline, so "repfuse" runs
RepFuse and then exactly what relax_pipeline="default" would run for the
target.  Parameters must be constants (module constants, or bound with
relax.transform.BindParams): unbound parameters are left alone.
"""

from __future__ import annotations

try:
    import tvm
    from tvm import relax
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"repfuse's TVM path needs apache-tvm: pip install 'repfuse[tvm]' ({e})") from None

from ..passes import relax as relaxpass

__all__ = ["RepFuse", "pipeline", "PIPELINE_NAME"]

PIPELINE_NAME = "repfuse"


@tvm.transform.module_pass(opt_level=0, name="RepFuse")
class RepFuse:
    """Fuse every exactly-fusable affine region of every Relax function into one conv (+ bias add)."""

    def __init__(self):
        self.last_plans: dict[str, object] = {}

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            new_func, plan = relaxpass.fuse_function(mod, func)
            self.last_plans[gvar.name_hint] = plan
            if new_func is not func:
                updates[gvar] = new_func
        if not updates:
            return mod
        mod = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(mod.functions, mod.attrs)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod


def _inner_for(target) -> tvm.transform.Pass:
    """What relax_pipeline="default" runs for this target (see tvm.compile)."""
    if target is not None and "gpu" in target.keys:
        try:
            return relax.get_default_pipeline(target)
        except Exception:
            pass
    return relax.get_pipeline("default")


def pipeline(inner: str | tvm.transform.Pass | None = None) -> tvm.transform.Pass:
    """RepFuse followed by `inner` (a pipeline name or pass; default: the target's default pipeline)."""

    @tvm.transform.module_pass(opt_level=0, name="repfuse_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if inner is None:
            rest = _inner_for(tvm.target.Target.current(allow_none=True))
        elif isinstance(inner, str):
            rest = relax.get_pipeline(inner)
        else:
            rest = inner
        return tvm.transform.Sequential([RepFuse(), rest])(mod)

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
