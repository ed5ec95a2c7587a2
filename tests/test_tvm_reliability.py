"""Never wrong, never a crash, on the TVM Relax path (issue 10): graphs users bring.

Every module is built for llvm before and after RepFuse (and through the "repfuse" pipeline where
shapes are symbolic) and run on the VM on seeded random inputs: the fused module must match the
unfused one, at two input sizes when a size is symbolic, and its structure must show the rewrite
that should happen (or that the one that must not, did not).
"""

import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blocks as B  # noqa: E402
import rewrite_blocks as RB  # noqa: E402

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402

from repfuse.backends.tvm import RepFuse, fuse_module, pipeline  # noqa: E402

warnings.filterwarnings("ignore")

Dim = torch.export.Dim
RTOL = 1e-5  # float32 results, relative to the output's largest magnitude


def to_relax(model, x, dims=None, keep_params_as_input=False):
    """`dims`: the symbolic axes of x, e.g. "n" (batch), "hw" (spatial) or "nhw"."""
    spec = None
    if dims:
        d = {0: Dim("n", min=1, max=16)} if "n" in dims else {}
        if "hw" in dims:
            d.update({2: Dim("h", min=6, max=64), 3: Dim("w", min=6, max=64)})
        spec = (d,)
    with torch.no_grad():
        exported = torch.export.export(model, (x,), dynamic_shapes=spec)
    return from_exported_program(exported, keep_params_as_input=keep_params_as_input)


def outputs(mod, xs, relax_pipeline="default") -> list[np.ndarray]:
    """Build once, run on every input."""
    main = relax.VirtualMachine(tvm.compile(mod, target="llvm", relax_pipeline=relax_pipeline), tvm.cpu())["main"]
    results = [main(tvm.runtime.tensor(x.numpy())) for x in xs]
    return [(r if hasattr(r, "numpy") else r[0]).numpy() for r in results]


def ops(mod) -> Counter:
    """Relax ops of main by short name (conv2d, batch_norm, matmul, multiply, ...)."""
    found = Counter()

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            found[e.op.name.split(".")[-1]] += 1

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def assert_same(before, after):
    for b, a in zip(before, after, strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= RTOL * max(np.abs(b).max(), 1.0)


def inputs(shape, sizes=(), seed=0):
    """x at `shape`, then at each other shape in `sizes`."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in [shape, *sizes]]


def fuse(mod, **kwargs):
    pass_ = RepFuse(**kwargs)
    return pass_(mod), {r.name: r for r in pass_.last_report}


# ---------------------------------------------------------------- 1. per-sample gate on the function's input

def _gate(x):
    return torch.sigmoid(x.mean((1, 2, 3), keepdim=True))  # [N, 1, 1, 1]


class Gate(nn.Module):
    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.convbn = B.conv_bn(4, 6, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        g = _gate(x)
        if self.variant == "plain":
            return x * g
        if self.variant == "then-convbn":
            return self.convbn(x * g)
        if self.variant == "two-gates":
            return x * g + torch.tanh(x.sum((1, 2, 3), keepdim=True)) * x
        if self.variant == "dynamic-on-input":  # two weighted convs of x and x itself: one conv
            return self.conv(x) * g + self.conv2(x) * (1 - g) + x
        return x * g + self.conv(x) * (1 - g)  # "gate-and-conv": one weighted conv, one gated input


@pytest.mark.parametrize("variant", ["plain", "then-convbn", "two-gates", "gate-and-conv", "dynamic-on-input"])
def test_gate_on_the_functions_own_input(variant):
    model = B.randomize(Gate(variant), seed=1)
    xs = inputs((2, 4, 6, 6))
    mod = to_relax(model, xs[0])
    fused, _ = fuse(mod)
    assert_same(outputs(mod, xs), outputs(fused, xs))
    after = ops(fused)
    assert after["sigmoid"] == 1  # the gate is data, not an affine op: it stays
    if variant == "then-convbn":
        assert after["batch_norm"] == 0 and after["conv2d"] == 1 and after["multiply"] == 1
    elif variant == "dynamic-on-input":  # one conv with the per-sample kernels (mixed by einsum)
        assert ops(mod)["conv2d"] == 2 and after["conv2d"] == 1 and after["einsum"] == 1
    else:
        tvm.ir.assert_structural_equal(fused, mod)


# ---------------------------------------------------------------- 2. products of tensors with symbolic H/W

class Product(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = B.conv_bn(3, 4, 3, stride=2)
        self.b = B.conv_bn(3, 4, 3, stride=2)

    def forward(self, x):
        return self.a(x) * self.b(x)  # output H/W: (h - 3) // 2 + 1, not the input's vars


def test_product_of_two_tensors_with_symbolic_hw():
    model = B.randomize(Product(), seed=2)
    xs = inputs((2, 3, 9, 9), [(2, 3, 12, 7)])
    mod = to_relax(model, xs[0], "hw")
    fused, _ = fuse(mod)
    before = outputs(mod, xs)
    assert_same(before, outputs(fused, xs))
    assert_same(before, outputs(mod, xs, "repfuse"))
    after = ops(fused)
    assert after["batch_norm"] == 0 and after["conv2d"] == 2 and after["multiply"] == 1


# ---------------------------------------------------------------- 3. symbolic shapes in general

SYMBOLIC = {  # name: (model, input shape, other size, ops the fused module must have)
    "conv-bn": (lambda: B.randomize(B.ConvBN(), 3), (2, 4, 9, 9), {"conv2d": 1, "batch_norm": 0}),
    "repvgg": (lambda: B.randomize(B.RepVGGBlock(8, 8), 3), (2, 8, 9, 9), {"conv2d": 1, "batch_norm": 0}),
    "repvgg-stride2": (lambda: B.randomize(B.RepVGGBlock(8, 8, stride=2), 3), (2, 8, 9, 9),
                       {"conv2d": 1, "batch_norm": 0}),
    "dead-channels": (lambda: RB.DeadChannels(0.5), (2, 3, 8, 8), {"conv2d": 2, "batch_norm": 0}),
}


def _other(shape, dims):
    n, c, h, w = shape
    return (n + 1 if "n" in dims else n, c, h + 3 if "hw" in dims else h, w - 1 if "hw" in dims else w)


@pytest.mark.parametrize("dims", ["n", "nhw"])
@pytest.mark.parametrize("name", list(SYMBOLIC))
def test_symbolic_shapes(name, dims):
    factory, shape, want = SYMBOLIC[name]
    model = factory()
    xs = inputs(shape, [_other(shape, dims)])
    mod = to_relax(model, xs[0], dims)
    fused, report = fuse(mod)
    before = outputs(mod, xs)
    assert_same(before, outputs(fused, xs))
    if dims == "nhw":
        assert_same(before, outputs(mod, xs, "repfuse"))
    assert {k: ops(fused)[k] for k in want} == want and ops(mod)["batch_norm"] > 0
    if name == "dead-channels":  # the pruned channels go at every size
        assert report["dead_channels"].applied == 2
        assert [tuple(int(d) for d in c.args[1].ty.shape.values) for c in _convs(fused)] == \
            [(6, 3, 3, 3), (6, 6, 1, 1)]


def test_per_channel_chains_on_symbolic_input_add_no_conv():
    """Written with the BlockBuilder, x: [n, 4, h, w]: x * c + x is one multiply, bn(bn(bn(x))) one multiply
    and one add; neither becomes a depthwise conv the graph did not have.  Both are function outputs.
    (Three BatchNorms: two cost two elementwise passes, as many as the multiply and add, and stay.)"""
    rng = np.random.default_rng(7)
    const = lambda *s, lo=-1.0: relax.const(rng.uniform(lo, 1.5, s).astype("float32"))  # noqa: E731
    n, h, w = (tvm.tirx.Var(name, "int64") for name in "nhw")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([n, 4, h, w], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit_output(relax.op.add(bb.emit(relax.op.multiply(x, const(1, 4, 1, 1))), x))
            y = x
            for _ in range(3):
                t = bb.emit(relax.op.nn.batch_norm(y, const(4, lo=0.5), const(4), const(4), const(4, lo=0.25),
                                                   axis=1, training=False))
                y = bb.emit(relax.TupleGetItem(t, 0))
            b = bb.emit_output(y)
        bb.emit_func_output(relax.Tuple([a, b]))
    mod = bb.get()
    fused, _ = fuse(mod)
    assert ops(fused) == Counter({"multiply": 2, "add": 1})
    xs = inputs((2, 4, 5, 6), [(3, 4, 7, 4)])
    for m in (mod, fused):
        main = relax.VirtualMachine(tvm.compile(m, target="llvm"), tvm.cpu())["main"]
        got = [[o.numpy() for o in main(tvm.runtime.tensor(x.numpy()))] for x in xs]
        if m is mod:
            want = got
    for g, r in zip(got, want):
        assert_same(r, g)


def _convs(mod):
    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call) and
                                    isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.nn.conv2d" else None)
    return found


@pytest.mark.parametrize("dims", ["n", "hw"])
def test_dynamic_conv_with_symbolic_sizes(dims):
    """Symbolic batch: declined with a reason (the per-sample kernels are groups of a static batch);
    symbolic H/W with a static batch: aggregated, exact at two sizes."""
    model = RB.DynamicConv(4, 6, K=2)
    xs = inputs((2, 4, 8, 8), [_other((2, 4, 8, 8), dims)])
    mod = to_relax(model, xs[0], dims)
    fused, report = fuse(mod)
    before = outputs(mod, xs)
    assert_same(before, outputs(fused, xs))
    assert_same(before, outputs(mod, xs, "repfuse"))
    if dims == "n":
        assert ops(fused)["conv2d"] == 2 and report["dynamic_conv"].applied == 0
        assert "symbolic batch" in report["dynamic_conv"].detail
    else:
        assert ops(fused)["conv2d"] == 1 and report["dynamic_conv"].applied == 1


# ---------------------------------------------------------------- 4. rank-0 regions with groups > 1

class Rank0(nn.Module):
    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.bn6 = nn.BatchNorm1d(6)
        self.register_buffer("c", torch.linspace(-1.5, 2.0, 6))

    def forward(self, x):
        if self.variant == "bn1d":
            return self.bn6(x)
        if self.variant == "scale-residual":
            return x * self.c + x
        if self.variant == "bn-bn":
            return self.bn6(self.bn6(x) * 2.0)
        if self.variant.startswith("linear-bn-residual"):
            y = self.fc(x)
            z = self.bn(y) + y
            return z * 0.5 - 1.0 if self.variant.endswith("scaled") else z
        return self.bn(self.fc(x))  # "linear-bn"


# the ops each variant must have after RepFuse: no grouped matmul, per-channel steps as multiply / add
RANK0 = {
    "bn1d": {"batch_norm": 1, "matmul": 0},  # alone: cheaper as it is
    "scale-residual": {"multiply": 1, "add": 0, "matmul": 0},  # x * (c + 1)
    "bn-bn": {"batch_norm": 0, "multiply": 1, "add": 1, "matmul": 0},
    # y is read twice: the region is bn(y) + y, per channel; as multiply + add it would cost the same: kept
    "linear-bn-residual": {"batch_norm": 1, "matmul": 1, "multiply": 0},
    # four per-channel ops become multiply + add; then y has one reader and the linear absorbs them
    "linear-bn-residual-scaled": {"batch_norm": 0, "matmul": 1, "multiply": 0, "add": 1, "subtract": 0},
    "linear-bn": {"batch_norm": 0, "matmul": 1, "multiply": 0},
}


@pytest.mark.parametrize("dims", ["", "n"], ids=["static", "symbolic-batch"])
@pytest.mark.parametrize("variant", list(RANK0))
def test_rank0_regions(variant, dims):
    model = B.randomize(Rank0(variant), seed=4)
    xs = inputs((3, 6), [(5, 6)] if dims else [])
    mod = to_relax(model, xs[0], dims)
    fused, _ = fuse(mod)
    assert_same(outputs(mod, xs), outputs(fused, xs))
    assert {k: ops(fused)[k] for k in RANK0[variant]} == RANK0[variant]


# ---------------------------------------------------------------- 5. dynamic linear

class DynamicLinear(nn.Module):
    """sum_k pi_k(x) * Linear_k(x), then BatchNorm1d, on [N, C]."""

    def __init__(self, cin=6, cout=5, K=3):
        super().__init__()
        self.fc = nn.Linear(cin, K)
        self.linears = nn.ModuleList(nn.Linear(cin, cout) for _ in range(K))
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        pi = torch.softmax(self.fc(x), dim=1)
        return self.bn(sum(pi[:, k:k + 1] * lin(x) for k, lin in enumerate(self.linears)))


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_linear_is_declined_with_a_reason(batch):
    model = B.randomize(DynamicLinear(), seed=5)
    xs = inputs((batch, 6))
    mod = to_relax(model, xs[0])
    pass_ = RepFuse()
    fused = pass_(mod)
    assert_same(outputs(mod, xs), outputs(fused, xs))
    assert ops(fused)["matmul"] == ops(mod)["matmul"] == 4  # the attention's and the K linears stay
    assert not any(r.applied for r in pass_.last_report if r.name == "dynamic_conv")
    assert any(d.rule == "dynamic_conv" and "linears" in d.reason for d in pass_.last_declines)


# ---------------------------------------------------------------- 6. declines never escape a rule

def _ghost_with(cheap: str) -> tvm.IRModule:
    """concat(y, cheap(y)) -> 1x1 conv, y = relu(x): the shape of a Ghost module whose cheap branch is
    a reflect pad + depthwise conv or an avg pool that does not count padding (neither is affine)."""
    rng = np.random.default_rng(6)
    const = lambda *s: relax.const(rng.standard_normal(s).astype("float32"))  # noqa: E731
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([2, 4, 7, 7], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(x))
            if cheap == "reflect-pad":
                p = bb.emit(relax.op.nn.pad(y, [0, 0, 0, 0, 1, 1, 1, 1], "reflect"))
                z = bb.emit(relax.op.nn.conv2d(p, const(4, 1, 3, 3), groups=4))
            else:
                z = bb.emit(relax.op.nn.avg_pool2d(y, 3, 1, 1, count_include_pad=False))
            c = bb.emit(relax.op.concat([y, z], axis=1))
            out = bb.emit_output(relax.op.nn.conv2d(c, const(6, 8, 1, 1)))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("cheap", ["reflect-pad", "avg-pool-excluding-padding"])
def test_ghost_concat_with_declined_nodes(cheap):
    mod = _ghost_with(cheap)
    fused, report = fuse(mod, enable=["ghost_concat"])
    xs = inputs((2, 4, 7, 7))
    assert_same(outputs(mod, xs), outputs(fused, xs))
    assert report["ghost_concat"].applied == 0 and ops(fused)["concat"] == 1
    tvm.ir.assert_structural_equal(fused, mod)


def test_ghost_concat_from_torch_with_an_avg_pool_excluding_padding():
    class PoolGhost(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
            self.out = nn.Conv2d(8, 6, 1)

        def forward(self, x):
            y = F.relu(x)
            return self.out(torch.cat([y, self.pool(y)], 1))

    model = PoolGhost().eval()
    xs = inputs((2, 4, 7, 7))
    mod = to_relax(model, xs[0])
    fused, report = fuse(mod, enable=["ghost_concat"])
    assert_same(outputs(mod, xs), outputs(fused, xs))
    assert report["ghost_concat"].applied == 0 and ops(fused)["concat"] == 1


def test_a_writer_decline_leaves_the_function_as_it_was(monkeypatch):
    """What the writer cannot express is declined before anything is written (patterns.rules.run asks
    the adapter's cannot_write): the weighted convs stay and the decline names rule and reason."""
    from repfuse.passes import relax_write

    monkeypatch.setattr(relax_write, "_batched_reason", lambda term, root: "not expressible here")
    model = RB.DynamicConv(4, 6, K=2)
    xs = inputs((2, 4, 8, 8))
    mod = to_relax(model, xs[0])
    pass_ = RepFuse()
    fused = pass_(mod)
    report = {r.name: r for r in pass_.last_report}
    assert_same(outputs(mod, xs), outputs(fused, xs))
    assert ops(fused)["conv2d"] == 2 and "not expressible here" in report["dynamic_conv"].detail
    assert any(d.rule == "dynamic_conv" and d.reason == "not expressible here" for d in pass_.last_declines)


# ---------------------------------------------------------------- 7. user mistakes: one clear line

def _one_line(excinfo):
    text = str(excinfo.value)
    assert text and "\n" not in text and "Traceback" not in text
    return text


def test_mistakes_on_the_entry_points_give_one_line():
    mod = to_relax(B.randomize(B.ConvBN()), torch.randn(1, 4, 6, 6))
    for wrong in (torch.nn.Conv2d(1, 1, 1), "model.onnx", None, mod["main"]):
        with pytest.raises(TypeError) as e:
            RepFuse()(wrong)
        assert "tvm.IRModule" in _one_line(e)
        with pytest.raises(TypeError) as e:
            fuse_module(wrong)
        assert "tvm.IRModule" in _one_line(e)
    with pytest.raises(TypeError) as e:
        RepFuse(mod)  # meant RepFuse()(mod)
    assert "RepFuse()(mod)" in _one_line(e)
    with pytest.raises(ValueError) as e:
        RepFuse(disable=["dead_channel"])
    assert "unknown rule 'dead_channel'" in _one_line(e)
    with pytest.raises(ValueError) as e:
        RepFuse(enable=["ghost"], disable=["affine"])
    _one_line(e)
    with pytest.raises(ValueError) as e:
        pipeline("defualt")
    assert "unknown Relax pipeline" in _one_line(e)
    with pytest.raises(TypeError) as e:
        pipeline(3)
    _one_line(e)
    # one rule name as a plain string is that rule, not its letters
    assert "dead_channels" not in RepFuse(disable="dead_channels").rules


def test_unbound_parameters_are_left_alone_and_reported():
    model = B.randomize(B.RepVGGBlock(8, 8))
    x = torch.randn(1, 8, 9, 9)
    mod = to_relax(model, x, keep_params_as_input=True)
    fused, report = fuse(mod)
    tvm.ir.assert_structural_equal(fused, mod)
    assert "BindParams" in report["affine"].detail
