"""deploy's fast capture: torch.fx.symbolic_trace, with sizes read from runs at two input sizes.

torch.export proves which sizes are dynamic with symbolic shapes, and that sympy work is most of
its time (3-4x a static export on MobileOne-S0).  symbolic_trace records the model's code without
running it on sizes at all, so its graph is as general as the model's code; what the rules need
are the sizes of every value.  They come from two concrete runs:

- the example inputs (the traced graph must reproduce the model's output bit for bit there, or
  the trace is not the model: a data-dependent branch, state changed in forward, ...), and
- a probe: every dim of the inputs that can change (size >= 2, and the model runs with it changed)
  grown by a different odd amount, so that no two input dims share a value and floor/ceil
  rounding (stride 2: 64 -> 32 either way) shows.

A dim equal in both runs is static; one that differs is a `ProbedSize`, which the FX adapter
treats like torch.export's symbolic sizes: never baked into the graph, equal only to a dim with
the same pair of values.  The fused graph is then run at both sizes against the model (any size
that slipped into it would show), and the capture fixes every input dim that was not probed.
Anything that does not hold returns None: deploy then captures with torch.export.
"""

from __future__ import annotations

import logging
from collections import namedtuple

import sympy
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

log = logging.getLogger("repfuse")

__all__ = ["ProbedSize", "trace", "probe_size"]

_Meta = namedtuple("_Meta", "shape dtype")  # what passes.fx reads from node.meta["tensor_meta"]


class ProbedSize:
    """A dim that changed with the input: `node.expr` names it by its (example, probe) values, as
    torch's SymInt names a dynamic size; `node.hint` is its example value."""

    def __init__(self, example: int, probe: int):
        self.node = self  # passes.fx reads d.node.expr and d.node.hint, as on a SymInt
        self.expr = sympy.Symbol(f"p{example}_{probe}", positive=True, integer=True)
        self.hint = example

    def __repr__(self) -> str:
        return str(self.expr)


def trace(module: nn.Module, inputs: tuple, fuse, tolerance: float = 1e-4):
    """(fused GraphModule, input dims: int where fixed, a name where dynamic, fuse's report) or None
    when the fast capture does not apply.  `fuse(gm)` rewrites the graph in place."""
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        return None
    try:
        tracer = _Tracer()
        gm = fx.GraphModule(module, tracer.trace(module), type(module).__name__)
    except Exception as e:  # data-dependent control flow, unsupported Python: torch.export may still capture it
        log.debug("repfuse.deploy: symbolic_trace failed (%s); capturing with torch.export", e)
        return None
    example = _run(gm, inputs)
    if example is None or not _identical(example[1], module(*inputs)):
        log.debug("repfuse.deploy: the symbolic trace does not reproduce the model; capturing with torch.export")
        return None
    dims, probe_inputs, probed = _probe(gm, inputs)
    if probed is None:
        probed = example
    if not _annotate(gm, example[0], probed[0]):
        return None
    _fold_rank_reads(gm)
    report = fuse(gm)
    checks = [(inputs, example[1])] + ([(probe_inputs, probed[1])] if dims else [])  # no probe: one size to check
    for args, want in checks:
        if not _close(gm(*args), want, tolerance):
            log.warning("repfuse.deploy: the fused symbolic trace differs from the model at input sizes %s; "
                        "capturing with torch.export", [tuple(t.shape) for t in args])
            return None
    names: dict = {}
    input_dims = [[f"s{names.setdefault((i, d), len(names))}" if (i, d) in dims else n
                   for d, n in enumerate(t.shape)] for i, t in enumerate(inputs)]
    return gm, input_dims, report


def probe_size(size: int, dim: int, k: int) -> int:
    """The probe's size for an example dim (the k-th dim probed, dim `dim` of its input): a batch (dim 0)
    grows by a small odd step; any other dim by at least 65 and half its size, so that a size after up
    to 64x downsampling changes too; steps are odd (rounding shows) and differ between dims."""
    step = 1 + 2 * k if dim == 0 else max(size // 2 + 1, 65) + 2 * k
    return size + (step if step % 2 else step + 1)


def _probe(gm: fx.GraphModule, inputs: tuple):
    """(the input dims the graph runs with changed, as {(input, dim): size}; the probe inputs; the probe
    run's sizes and output): all candidate dims at once, then all but the channel dims (dim 1), then
    those that run alone.  ({}, inputs, None) when none can change."""
    candidates = [(i, d) for i, t in enumerate(inputs) for d, n in enumerate(t.shape) if n >= 2]
    sizes = {c: probe_size(inputs[c[0]].shape[c[1]], c[1], k) for k, c in enumerate(candidates)}

    def attempts():
        yield sizes
        yield {c: n for c, n in sizes.items() if c[1] != 1}
        # one at a time: a failed run usually stops at the first layer, so this is cheap
        yield {c: n for c, n in sizes.items() if _run(gm, _grown(inputs, {c: n})) is not None}

    for attempt in attempts():
        grown = _grown(inputs, attempt)
        probed = _run(gm, grown) if attempt else None
        if probed is not None:
            return attempt, grown, probed
    return {}, inputs, None


def _grown(inputs: tuple, sizes: dict) -> tuple:
    out = []
    for i, t in enumerate(inputs):
        shape = [sizes.get((i, d), n) for d, n in enumerate(t.shape)]
        if shape == list(t.shape):
            out.append(t)
        elif t.is_floating_point():
            out.append(torch.randn(shape, dtype=t.dtype, generator=torch.Generator().manual_seed(i)))
        else:  # ids, masks: zeros are valid everywhere
            out.append(torch.zeros(shape, dtype=t.dtype))
    return tuple(out)


class _Tracer(fx.Tracer):
    """fx.Tracer with the parameter lookup indexed: the stock one scans every parameter of the model for
    each attribute read (quadratic: 3 s of MobileOne-S0's capture, whose norm layers read their weights)."""

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        if not hasattr(self, "_paths"):
            self._paths: dict[int, str] = {}
            for name, p in self.root.named_parameters():
                self._paths.setdefault(id(p), name)
            if self.proxy_buffer_attributes:
                for name, b in self.root.named_buffers():
                    self._paths.setdefault(id(b), name)
        name = self._paths.get(id(attr_val))
        if name is None or not (isinstance(attr_val, nn.Parameter) or self.proxy_buffer_attributes):
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps every tensor value's shape and dtype."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[str, _Meta] = {}

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if isinstance(value, torch.Tensor):
            self.shapes[node.name] = _Meta(tuple(value.shape), value.dtype)
        return value


def _run(gm: fx.GraphModule, inputs: tuple):
    """(each tensor value's shape and dtype, the output) of one run; None when the graph fails on `inputs`."""
    recorder = _Recorder(gm)
    try:
        out = recorder.run(*inputs)
    except Exception:
        return None
    return recorder.shapes, out


def _annotate(gm: fx.GraphModule, example: dict, probe: dict) -> bool:
    """Node meta for the rules: example sizes, with the dims that changed as ProbedSizes."""
    named: dict[tuple[int, int], ProbedSize] = {}
    for node in gm.graph.nodes:
        a, b = example.get(node.name), probe.get(node.name)
        if a is None or b is None:
            continue
        if len(a.shape) != len(b.shape):
            return False  # the rank follows the size: nothing the rules could read
        shape = tuple(x if x == y else named.setdefault((x, y), ProbedSize(x, y)) for x, y in zip(a.shape, b.shape))
        node.meta["tensor_meta"] = _Meta(shape, a.dtype)
    return True


def _fold_rank_reads(gm: fx.GraphModule) -> None:
    """`x.ndim` and `x.dim()` as the constant rank (the same in both runs; torch.export specializes it too).
    timm asserts ranks inside its norm layers: left as reads, they keep every conv output a second
    reader, which stops it from merging with anything."""
    for node in list(gm.graph.nodes):
        rank_read = (node.op == "call_function" and node.target is getattr and node.args[1:] == ("ndim",)) or \
            (node.op == "call_method" and node.target == "dim" and len(node.args) == 1)
        meta = node.args[0].meta.get("tensor_meta") if rank_read and isinstance(node.args[0], fx.Node) else None
        if meta is not None:
            node.replace_all_uses_with(len(meta.shape))
            gm.graph.erase_node(node)
    gm.recompile()


def _identical(a, b) -> bool:
    """Bit for bit, NaN where NaN (a deep random network can overflow)."""
    return _close(a, b, 0.0)


def _close(a, b, tolerance: float) -> bool:
    """Equal up to `tolerance` relative to the largest finite output magnitude (fusing reorders float sums;
    half types get 100x: they round at ~1e-3); NaN agrees with NaN; 0 means bit for bit."""
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            if x != y:
                return False
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            tol = tolerance if y.dtype in (torch.float32, torch.float64) else 100 * tolerance
            finite = y[torch.isfinite(y)]
            scale = float(finite.abs().max()) if finite.numel() else 0.0
            if not torch.allclose(x.double(), y.double(), rtol=0, atol=tol * max(scale, 1e-6), equal_nan=True):
                return False
        elif not torch.equal(x, y):
            return False
    return True
