"""TVM Relax writer and entry (`run_rules`): the plans of `repfuse.patterns.rules` written back as bindings by
`_Writer`, a mutator that is also the `patterns.plan` Emitter.  What Relax cannot express (conv rank, per-sample
kernels over a symbolic batch) is a `cannot_write` reason, given before any write.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..patterns.rules import Run, enabled, run as run_to_fixed_point
from ..patterns.plan import Apply, BatchedConv, Constant, Replace, Reshape, emit, lower, terms, unpermuted
from .relax import RelaxView, _dims, _dtype, _same_dim

__all__ = ["run_rules"]


def run_rules(mod: tvm.IRModule, func: relax.Function, rules: frozenset[str] = enabled(),
              max_rounds: int = 4) -> tuple[relax.Function, Run]:
    """The function rewritten by the enabled rules (the very same object when none applied), and the Run."""
    adapter = _Adapter(mod, relax.analysis.remove_all_unused(func))  # dead reads would count as readers
    result = run_to_fixed_point(adapter, rules, max_rounds)
    unbound = sum(d.rule == "affine" and "BindParams" in d.reason for d in result.declines.values())
    if unbound:  # RuleRow.add keeps a detail that changed nothing ("0 ops"): this one says why
        row, text = result.rules["affine"], f"{unbound} ops read unbound parameters, left alone (bind them " \
                                            f"with relax.transform.BindParams)"
        row.detail = f"{row.detail}; {text}" if row.applied else text
    return (adapter.func if adapter.written else func), result


class _Adapter:
    """One function's side of patterns.rules.run: a fresh RelaxView per rule, one walk per write."""

    def __init__(self, mod: tvm.IRModule, func: relax.Function):
        self.mod, self.func, self.written = mod, func, False

    def view(self) -> RelaxView:
        return RelaxView(self.func)

    def cannot_write(self, view: RelaxView, edit: Replace) -> str | None:
        for term in terms(edit.term):
            if isinstance(term, Apply) and lower(term.op)[0][0] == "conv" and term.op.rank not in (1, 2):
                return "only 1-D and 2-D convolutions are emitted for Relax"
            if isinstance(term, BatchedConv):
                return _batched_reason(term, edit.value)
            if isinstance(term, Reshape) and _dims(term.like) is None:
                return "the reshaped value's shape is unknown"
        return None

    def write(self, view: RelaxView, rule: str, edits: list) -> None:
        self.func = relax.analysis.remove_all_unused(_Writer(self.mod, view, edits).visit_expr(self.func))
        self.written = True


def _batched_reason(term: BatchedConv, root) -> str | None:
    if term.static.rank not in (1, 2):
        return "only 1-D and 2-D dynamic convolutions are emitted for Relax"
    x, out, scales = _dims(term.input), _dims(root), [_dims(s) for s in term.scales]
    if x is None or out is None or None in scales:
        return "attention or input shape unknown"
    if not all(isinstance(d, int) for d in x[:2] + out[:2] + [s[0] for s in scales]):
        return "symbolic batch size (the per-sample kernels are laid out as groups of a static batch)"
    if x[0] != out[0] or any(s[0] != x[0] for s in scales):
        return "attention and input batch sizes differ"
    return None


@relax.expr_functor.mutator
class _Writer(relax.PyExprMutator):
    """One walk writing one rule's edits: a replaced var is bound to what `plan.emit` builds, a var folded to a
    constant becomes it at every use, erased bindings go; Emitter methods bind what they read, not what they return."""

    def __init__(self, mod, view: RelaxView, edits: list):
        super().__init__(mod)
        self.view = view
        self.edits = {e.value: e for e in edits if isinstance(e, Replace)}
        # erased bindings, with what the view attached to them, less what a binding that stays still reads
        gone = {a for e in self.edits.values() for n in e.erase for a in [n, *view.attached.get(n, ())]}
        gone -= self.edits.keys()
        while stay := {n for n in gone if any(u not in gone and u not in self.edits for u in view.users.get(n, ()))}:
            gone -= stay
        self.dropped = gone
        self.constants: dict[relax.Var, relax.Expr] = {}
        self.target: relax.Var | None = None  # the var whose edit is being emitted

    def visit_dataflow_var_(self, op):
        return self.constants[op] if op in self.constants else super().visit_dataflow_var_(op)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var, edit = binding.var, self.edits.get(binding.var)
        if var in self.dropped:
            return
        if edit is None:
            return super().visit_var_binding_(binding)  # re-derives the type when an input lost channels
        self.target = var
        value = emit(self, edit.term, self.visit_expr)  # visit_expr follows earlier replacements
        if isinstance(edit.term, Constant):
            self.constants[var] = value
        else:
            bind = self.builder_.emit if isinstance(var, relax.DataflowVar) else self.builder_.emit_output
            self.set_var_remap(var, bind(value, self.view.label(var)))

    # -- the Emitter
    def _let(self, x: relax.Expr) -> relax.Expr:
        return self.builder_.emit(x) if isinstance(x, relax.Call) else x

    def _const(self, a: np.ndarray) -> relax.Expr:
        dtype = _dtype(self.target)
        return relax.const(np.ascontiguousarray(np.asarray(a).astype(dtype)), dtype)

    def _vector(self, v: np.ndarray, rank: int) -> relax.Expr:
        return self._const(v.reshape((-1,) + (1,) * rank))  # [C, 1 x rank]: broadcasts over [N, C, *spatial]

    def _conv(self, x: relax.Expr, weight: relax.Expr, op, groups: int) -> relax.Call:
        """conv2d / conv1d with op's geometry (cannot_write checked the rank)."""
        make = relax.op.nn.conv2d if op.rank == 2 else relax.op.nn.conv1d
        pads = [b for b, _ in op.pads] + [e for _, e in op.pads]  # every dim's begin, then every end
        return make(x, weight, strides=list(op.stride), padding=pads, dilation=list(op.dilation), groups=groups)

    def constant(self, of) -> relax.Expr:
        return self._const(self.view.const(of))

    def conv(self, x, op) -> relax.Expr:
        y = self._conv(self._let(x), self._const(op.weight), op, op.groups)  # weight [O, I/g, *k]
        return relax.op.add(self._let(y), self._vector(op.bias, op.rank)) if np.any(op.bias) else y

    def conv_transpose(self, x, op) -> relax.Expr:
        make = (relax.op.nn.conv1d_transpose, relax.op.nn.conv2d_transpose, relax.op.nn.conv3d_transpose)[op.rank - 1]
        pads = [b for b, _ in op.pads] + [e for _, e in op.pads]  # every dim's begin, then every end
        y = make(self._let(x), self._const(op.weight), strides=list(op.stride), padding=pads,  # weight [I, O/g, *k]
                 output_padding=list(op.output_padding), dilation=list(op.dilation), groups=op.groups)
        return relax.op.add(self._let(y), self._vector(op.bias, op.rank)) if np.any(op.bias) else y

    def linear(self, x, weight, bias) -> relax.Expr:
        y = relax.op.matmul(self._let(x), self._const(weight.T))  # [I, O]: x @ W.T over the last axis
        return relax.op.add(self._let(y), self._const(bias)) if np.any(bias) else y  # [O]

    def scale_shift(self, x, scale, shift, rank) -> relax.Expr:
        if scale is not None:
            x = relax.op.multiply(self._let(x), self._vector(scale, rank))
        if shift is not None:
            x = relax.op.add(self._let(x), self._vector(shift, rank))
        return x

    def relu(self, x) -> relax.Expr:
        return relax.op.nn.relu(self._let(x))

    def reshape(self, x, like, perm=None) -> relax.Expr:
        """x (the fused op on the source, the source's leading dims) regrouped to like's shape (read through perm)."""
        x, want = self.builder_.normalize(x), unpermuted(_dims(like), perm)  # normalize: x's type without binding it
        have = _dims(x)
        return x if len(have) == len(want) and all(map(_same_dim, have, want)) else relax.op.reshape(self._let(x), want)

    def permute(self, x, perm) -> relax.Expr:
        return relax.op.permute_dims(self._let(x), list(perm))

    def batched_conv(self, x, term: BatchedConv) -> relax.Expr:
        """conv(x as [1, N*C, ...], per-sample kernels [N*O, I/g, *k], groups N*g): static N, any spatial sizes."""
        (n, c, *spatial), out = _dims(term.input), _dims(self.target)
        static, (k, o) = term.static, term.biases.shape
        size = static.weight.size  # O * I/g * prod(kernel)
        table = np.concatenate([term.weights.reshape(k, size), term.biases], axis=1)  # [K, L + O]
        pis = [self._let(relax.op.reshape(self.visit_expr(s), [n, 1])) for s in term.scales]  # K x [N, 1]
        pi = self._let(relax.op.concat(pis, axis=1))  # [N, K]
        # einsum, not matmul: weight arithmetic, not a network layer (the reports count R.matmul as a linear)
        wb = self._let(relax.op.einsum([pi, self._const(table)], "nk,kl->nl"))  # [N, L + O]
        if term.has_static_weight or np.any(static.bias):
            fixed = np.concatenate([static.weight.reshape(1, size), static.bias.reshape(1, o)], axis=1)  # [1, L + O]
            wb = self._let(relax.op.add(wb, self._const(fixed)))
        kernel = self._let(relax.op.strided_slice(wb, axes=[1], begin=[0], end=[size]))  # [N, L]
        kernel = self._let(relax.op.reshape(kernel, [n * o, *static.weight.shape[1:]]))  # [N*O, I/g, *k]
        bias = self._let(relax.op.strided_slice(wb, axes=[1], begin=[size], end=[size + o]))  # [N, O]
        bias = self._let(relax.op.reshape(bias, [n * o] + [1] * static.rank))  # [N*O, 1 x rank]
        x = self._let(relax.op.reshape(self._let(x), [1, n * c, *spatial]))  # [1, N*C, *spatial]
        y = self._let(self._conv(x, kernel, static, n * static.groups))  # [1, N*O, *spatial']
        return relax.op.reshape(self._let(relax.op.add(y, bias)), out)  # [N, O, *spatial']
