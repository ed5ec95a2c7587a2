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
