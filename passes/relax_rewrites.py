"""The rule pipeline on Relax functions: every rule of `repfuse.patterns.rules` in its order.

Mirrors `repfuse.passes.fx_rewrites.run_rules`.  The planners live in `repfuse.patterns`
(`planner`, `dynamic`, `channels`) and read the graph through `RelaxView`; this module writes
their results back as Relax bindings with one expression mutator (`_Writer`) and lets
`remove_all_unused` drop what the rewritten bindings no longer read.

The `affine` rule writes a fused region as conv2d + bias add (`relax.fuse_function`); the
later planners see such a pair as the one op it is (`_FusedView`), as the FX planners see
a conv with a bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tvm
from tvm import relax

from ..patterns import affine as A
from ..patterns import rules as R
from ..patterns.affine import Declined
from ..patterns.channels import plan_channels
from ..patterns.dynamic import DynamicRegion, plan_dynamic
from ..patterns.ghost import plan_ghost
from ..patterns.planner import Affine
from . import relax as rx
from .report import RuleRow

__all__ = ["RelaxRun", "run_rules"]


@dataclass
class RelaxRun:
    """What the pipeline did to one function: per-rule rows, the affine plans, and declines."""

    rules: dict[str, RuleRow] = field(default_factory=dict)
    plans: list = field(default_factory=list)  # one planner.Plan per affine run that changed the function
    declined: list[tuple[str, str]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(r.applied for r in self.rules.values())


def run_rules(mod: tvm.IRModule, func: relax.Function, rules: frozenset[str] = R.enabled(),
              max_rounds: int = 4) -> tuple[relax.Function, RelaxRun]:
    """The function rewritten by the enabled rules, to a fixed point (at most `max_rounds` rounds);
    the very same function object when no rule applied."""
    run = RelaxRun(rules={r.name: RuleRow(r.name, r.name in rules) for r in R.RULES})
    state = {"func": func}

    def step(rewrite: Callable, name: str) -> Callable[[], bool]:
        def go() -> bool:
            try:
                new = rewrite(mod, state["func"], run)
            except Declined as e:  # a plan the writer cannot express: this rule leaves the function as is
                run.declined.append(("(function)", f"{name}: {e}"))
                run.rules[name].add(0, f"declined: {e}")
                return False
            if new is None:
                return False
            state["func"] = new
            return True
        return go

    rewrites = {"constant_folding": fold_constants, "affine": fuse_affine, "dynamic_conv": aggregate_dynamic,
                "dead_channels": remove_dead_channels, "ghost_concat": merge_ghost_concats}
    steps = {name: step(rewrite, name) for name, rewrite in rewrites.items()}
    R.run_to_fixed_point(steps, rules, max_rounds=max_rounds)
    run.declined = list(dict(run.declined).items())
    return state["func"], run


# ---------------------------------------------------------------- writing

@relax.expr_functor.mutator
class _Writer(relax.PyExprMutator):
    """Re-emit a function: `emit[var](writer)` builds var's new value (it may emit helper bindings
    through `writer.builder_`), a var in `constants` is replaced by its constant at every use, a binding
    in `dropped` goes (its only reader is re-emitted without it)."""

    def __init__(self, mod, emit: dict | None = None, constants: dict | None = None, dropped=()):
        super().__init__(mod)
        self.emit = emit or {}
        self.constants = constants or {}
        self.dropped = set(dropped)
        self.failed: str | None = None  # a Declined from a builder (raised here it would cross TVM's FFI)

    def visit_dataflow_var_(self, op):
        const = self.constants.get(op)
        return const if const is not None else super().visit_dataflow_var_(op)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var = binding.var
        if var in self.constants or var in self.dropped:
            return
        build = self.emit.get(var)
        if build is None:
            super().visit_var_binding_(binding)  # re-derives the struct info when its inputs shrank
            return
        try:
            expr = build(self)
        except Declined as e:
            self.failed = self.failed or str(e)
            super().visit_var_binding_(binding)
            return
        new = self.builder_.emit(expr) if isinstance(var, relax.DataflowVar) else self.builder_.emit_output(expr)
        self.set_var_remap(var, new)

    def let(self, expr: relax.Expr) -> relax.Var:
        return self.builder_.emit(expr)


def _rewrite(mod, func, emit=None, constants=None, dropped=()) -> relax.Function:
    writer = _Writer(mod, emit, constants, dropped)
    new = writer.visit_expr(func)
    if writer.failed:
        raise Declined(writer.failed)
    return relax.analysis.remove_all_unused(new)  # the replaced bindings' inputs, BN tuples, ...


def _name(var) -> str:
    return str(getattr(var, "name", None) or getattr(var, "name_hint", var))


def _dtype(var) -> str:
    return str(rx._type(var).dtype)


def _static_shape(var) -> list[int] | None:
    shape, _ = rx.RelaxView._shape(var)
    return None if shape is None or None in shape else shape


def _dims(var) -> list | None:
    """A tensor var's shape: ints where static, the symbolic PrimExprs elsewhere; None when unknown."""
    ty = rx._type(var)
    values = getattr(getattr(ty, "shape", None), "values", None) if isinstance(ty, relax.TensorType) else None
    if values is None:
        return None
    return [d if rx._static(d) is None else rx._static(d) for d in values]


# ---------------------------------------------------------------- constant_folding

def fold_constants(mod, func: relax.Function, run: RelaxRun) -> relax.Function | None:
    """Replace every parameter-only computation that data-dependent bindings read by one constant."""
    view = rx.RelaxView(func)
    constants: dict[relax.Var, relax.Expr] = {}
    for var in view.values():
        if not isinstance(var, relax.DataflowVar) or not isinstance(view.bound[var], relax.Call):
            continue  # a Constant bound to a var is folded already; an output var keeps its binding
        if _layout_of_constant(view, var):
            continue  # already a constant to every planner (and to TVM's FoldConstant): leave the module as is
        value = view.const(var)
        if value is None:
            continue
        readers = view.readers(var)
        if readers is not None and all(view.const(r) is not None for r in readers):
            continue  # only read by other constants: the outermost one is folded
        shape = _static_shape(var)
        if shape is None or list(value.shape) != shape:
            run.declined.append((_name(var), "constant_folding: numpy result disagrees with its type"))
            continue
        constants[var] = relax.const(np.ascontiguousarray(value.astype(_dtype(var))), _dtype(var))
    if not constants:
        return None
    new = _rewrite(mod, func, constants=constants)
    run.rules["constant_folding"].add(len(constants), "parameter-only ops folded")
    return new


# reshaping ops that the frontends put on parameters (a bias viewed as [1, C, 1, 1], a transposed weight)
_LAYOUT = ("relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.squeeze", "relax.broadcast_to",
           "relax.astype")


def _layout_of_constant(view: rx.RelaxView, expr) -> bool:
    """A layout op over a Constant (or over such ops): folding it computes nothing."""
    if rx._constant(expr) is not None:
        return True
    call = view.bound.get(expr) if isinstance(expr, relax.Var) else None
    return rx._op_name(call) in _LAYOUT and _layout_of_constant(view, call.args[0])


# ---------------------------------------------------------------- affine

def fuse_affine(mod, func: relax.Function, run: RelaxRun) -> relax.Function | None:
    new, plan = rx.fuse_function(mod, func)
    run.declined += [(_name(k), r) for k, r in plan.declined.items()]
    unbound = sum("BindParams" in r for r in plan.declined.values())
    if unbound:
        run.rules["affine"].add(0, f"{unbound} ops read unbound parameters, left alone "
                                   f"(bind them with relax.transform.BindParams)")
    if new is func:
        return None
    run.plans.append(plan)
    run.rules["affine"].add(len(plan.regions), f"{sum(len(r.nodes) for r in plan.regions)} ops")
    return new


class _FusedView:
    """RelaxView with each conv/matmul + constant bias add (what the affine rule writes) described as
    one Affine op over the conv's input; the conv's own var is hidden (it only feeds the add)."""

    def __init__(self, view: rx.RelaxView):
        self.view = view
        self.merged: dict[relax.Var, Affine] = {}
        self.hidden: dict[relax.Var, relax.Var] = {}  # conv var -> its bias add
        for var in view.values():
            if rx._op_name(view.bound[var]) != "relax.add":
                continue
            try:
                d = view.describe(var)
                if not isinstance(d, Affine) or d.op.per_channel() is None:
                    continue
                inner = d.input
                if rx._op_name(view.bound.get(inner)) not in ("relax.nn.conv2d", "relax.nn.conv1d", "relax.matmul") \
                        or not view.single_consumer(inner):
                    continue
                di = view.describe(inner)
            except Declined:
                continue
            if isinstance(di, Affine) and A.check_compose(d.op, di.op) is None:
                self.merged[var] = Affine(di.input, A.compose(d.op, di.op))
                self.hidden[inner] = var

    def values(self):
        return [v for v in self.view.values() if v not in self.hidden]

    def describe(self, var):
        return self.merged.get(var) or self.view.describe(var)

    def single_consumer(self, var) -> bool:
        return self.view.single_consumer(var)

    def channels_and_rank(self, var):
        return self.view.channels_and_rank(var)

    def hidden_by(self, emitted) -> set:
        """The hidden convs whose bias add is re-emitted: their bindings go with it."""
        return {conv for conv, add in self.hidden.items() if add in emitted}

    def readers(self, var):
        readers = self.view.readers(var)
        return None if readers is None else [self.hidden.get(r, r) for r in readers]


def _affine_expr(w: _Writer, op: A.AffineConv, x: relax.Expr, dtype: str) -> relax.Expr:
    """An AffineConv as the affine rule writes it (`relax.affine_expr`)."""
    return rx.affine_expr(w.let, op, x, dtype)


# ---------------------------------------------------------------- dynamic_conv

def aggregate_dynamic(mod, func: relax.Function, run: RelaxRun) -> relax.Function | None:
    view = _FusedView(rx.RelaxView(func))
    regions, declined = plan_dynamic(view)
    run.declined += [(_name(k), f"dynamic_conv: {r}") for k, r in declined.items()]
    emit = {}
    for region in regions:
        reason = _dynamic_precondition(region)
        if reason:
            run.declined.append((_name(region.root), f"dynamic_conv: {reason}"))
            run.rules["dynamic_conv"].add(0, f"declined: {reason}")
            continue
        emit[region.root] = lambda w, region=region: _dynamic_expr(w, region)
    if not emit:
        return None
    done = [r for r in regions if r.root in emit]
    convs = sum(len(r.scales) for r in done)
    new = _rewrite(mod, func, emit=emit, dropped=view.hidden_by({n for r in done for n in r.nodes}))
    run.rules["dynamic_conv"].add(len(done), f"{convs} weighted convs -> {len(done)}")
    return new


def _dynamic_precondition(region: DynamicRegion) -> str | None:
    if region.static.rank not in (1, 2):
        return "only 1-D and 2-D dynamic convolutions are emitted for Relax"
    x, out, scales = _dims(region.source), _dims(region.root), [_dims(s) for s in region.scales]
    if x is None or out is None or None in scales:
        return "attention or input shape unknown"
    if not all(isinstance(d, int) for d in x[:2] + out[:2] + [s[0] for s in scales]):
        return "symbolic batch size (the per-sample kernels are laid out as groups of a static batch)"
    if x[0] != out[0] or any(s[0] != x[0] for s in scales):
        return "attention and input batch sizes differ"
    return None


def _dynamic_expr(w: _Writer, region: DynamicRegion) -> relax.Expr:
    """conv(x viewed as [1, N*C, ...], per-sample kernels stacked to [N*O, I/g, *k], groups N*g); the
    spatial sizes may be symbolic."""
    dtype = _dtype(region.root)
    x_shape, out_shape = _dims(region.source), _dims(region.root)
    n, c = x_shape[:2]
    static = region.static
    K, O = region.biases.shape
    L = static.weight.size  # O * I/g * prod(k)
    table = np.concatenate([region.weights.reshape(K, L), region.biases], axis=1)  # [K, L + O]
    pis = [w.let(relax.op.reshape(w.visit_expr(s), [n, 1])) for s in region.scales]  # K x [N, 1]
    pi = w.let(relax.op.concat(pis, axis=1))  # [N, K]
    # einsum, not matmul: the kernel mix is weight arithmetic, not one of the network's convs or linears
    # (the reference deploy form writes it the same way; conv/linear counts treat R.matmul as a linear)
    wb = w.let(relax.op.einsum([pi, relax.const(table.astype(dtype))], "nk,kl->nl"))  # [N, L + O]
    if region.has_static_weight or np.any(static.bias):
        fixed = np.concatenate([static.weight.reshape(1, L), static.bias.reshape(1, O)], axis=1)  # [1, L + O]
        wb = w.let(relax.op.add(wb, relax.const(fixed.astype(dtype))))
    kernel = w.let(relax.op.strided_slice(wb, axes=[1], begin=[0], end=[L]))  # [N, L]
    kernel = w.let(relax.op.reshape(kernel, [n * O, *static.weight.shape[1:]]))  # [N*O, I/g, *k]
    bias = w.let(relax.op.strided_slice(wb, axes=[1], begin=[L], end=[L + O]))  # [N, O]
    bias = w.let(relax.op.reshape(bias, [1, n * O] + [1] * static.rank))  # [1, N*O, 1, ...]
    x = w.let(relax.op.reshape(w.visit_expr(region.source), [1, n * c, *x_shape[2:]]))  # [1, N*C, ...]
    pads = [p[0] for p in static.pads] + [p[1] for p in static.pads]
    conv = relax.op.nn.conv2d if static.rank == 2 else relax.op.nn.conv1d
    y = w.let(conv(x, kernel, strides=list(static.stride), padding=pads, dilation=list(static.dilation),
                   groups=n * static.groups))  # [1, N*O, ...]
    y = w.let(relax.op.add(y, bias))
    return relax.op.reshape(y, out_shape)  # [N, O, ...]


# ---------------------------------------------------------------- dead_channels

def remove_dead_channels(mod, func: relax.Function, run: RelaxRun) -> relax.Function | None:
    view = _FusedView(rx.RelaxView(func))
    plan = plan_channels(view)
    kept = plan.kept_summary()
    if not plan:
        if kept:
            run.rules["dead_channels"].add(0, kept)
        return None
    emit = {}
    for var, op in plan.ops.items():
        source = view.describe(var).input  # read before anything changes
        emit[var] = lambda w, op=op, source=source, var=var: _affine_expr(w, op, w.visit_expr(source), _dtype(var))
    text = f"{plan.removed} channels removed"
    new = _rewrite(mod, func, emit=emit, dropped=view.hidden_by(emit))
    run.rules["dead_channels"].add(plan.removed, text + (f"; {kept}" if kept else ""))
    return new


# ---------------------------------------------------------------- ghost_concat

def merge_ghost_concats(mod, func: relax.Function, run: RelaxRun) -> relax.Function | None:
    view = _FusedView(rx.RelaxView(func))
    rewrites, declined = plan_ghost(view)
    run.declined += [(_name(k), r) for k, r in declined.items()]
    if not rewrites:
        return None
    emit = {}
    for g in rewrites:
        def ghost(w, g=g):  # [N, 2C, ...], channels interleaved
            out = _affine_expr(w, g.op, w.visit_expr(g.source), _dtype(g.concat))
            return relax.op.nn.relu(w.let(out)) if g.relu else out

        emit[g.concat] = ghost
        for consumer, op in g.consumers.items():
            emit[consumer] = lambda w, op=op, g=g, c=consumer: _affine_expr(w, op, w.visit_expr(g.concat), _dtype(c))
    new = _rewrite(mod, func, emit=emit, dropped=view.hidden_by(emit))
    run.rules["ghost_concat"].add(len(rewrites), f"{len(rewrites)} concats -> depthwise convs")
    return new
