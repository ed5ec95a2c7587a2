"""The `conv_transpose` rule on all three IRs: a transposed conv (1-D/2-D/3-D, strided, padded, with
output_padding, dilation and groups) followed by an inference BatchNorm and a LayerScale-like per-channel
`x * gamma` becomes one transposed conv with scaled weights and bias.

Each IR is checked against an independent reference on random inputs with non-trivial BatchNorm statistics:
FX against torch eager (at the example size and a second one), ONNX against onnxruntime on the unfused model,
Relax against torch eager.  The structure is asserted (no BatchNorm or Mul left, one transposed conv), and the
must-not-fire cases keep their graph and still compute the same numbers.
"""

import io
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blocks as B  # noqa: E402

import repfuse  # noqa: E402

warnings.filterwarnings("ignore")

CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class Geometry(NamedTuple):
    rank: int
    cin: int
    cout: int
    kernel: tuple
    stride: tuple
    padding: tuple  # symmetric, per dim (torch's form)
    output_padding: tuple
    dilation: tuple
    groups: int
    size: int = 5  # input size along every spatial dim


GEOMETRIES = {
    "1d": Geometry(1, 4, 6, (3,), (1,), (0,), (0,), (1,), 1),
    "1d-s2-p1-op1-g2": Geometry(1, 4, 6, (3,), (2,), (1,), (1,), (1,), 2),
    "2d-p1": Geometry(2, 4, 6, (3, 3), (1, 1), (1, 1), (0, 0), (1, 1), 1),
    "2d-s2-p1-op1-d2-g2": Geometry(2, 4, 6, (3, 3), (2, 2), (1, 1), (1, 1), (2, 2), 2),
    "2d-depthwise-s3-op2": Geometry(2, 6, 6, (3, 3), (3, 3), (2, 2), (2, 2), (1, 1), 6),
    "2d-anisotropic-g4": Geometry(2, 4, 8, (2, 3), (2, 1), (0, 1), (1, 0), (1, 2), 4),
    "3d-s2-p1-op1-g2": Geometry(3, 4, 6, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), (1, 1, 1), 2, 4),
    "3d-d2": Geometry(3, 2, 4, (2, 2, 2), (1, 1, 1), (0, 0, 0), (0, 0, 0), (2, 2, 2), 1, 3),
}


def assert_close(out, ref):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def example(g: Geometry, batch=2, size=None, seed=1):
    shape = (batch, g.cin) + (size or g.size,) * g.rank
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class ConvTBlock(nn.Module):
    """relu(bn(convT(x)) * gamma): BatchNorm, then a LayerScale-like per-channel scale."""

    def __init__(self, g: Geometry, bias=True):
        super().__init__()
        self.t = CONV_T[g.rank](g.cin, g.cout, g.kernel, g.stride, g.padding, g.output_padding, g.groups, bias,
                                g.dilation)
        self.bn = BN[g.rank](g.cout)
        self.gamma = nn.Parameter(torch.rand((g.cout,) + (1,) * g.rank) + 0.5)  # [C, 1 x rank]

    def forward(self, x):
        return F.relu(self.bn(self.t(x)) * self.gamma)


def block(g: Geometry, seed=0, bias=True) -> nn.Module:
    torch.manual_seed(seed)
    return B.randomize(ConvTBlock(g, bias), seed)


def rule_row(rows, name="conv_transpose"):
    return next(r for r in rows if r.name == name)


# ---------------------------------------------------------------- must-not-fire cases, as torch modules

G_SQUARE = Geometry(2, 4, 6, (3, 3), (1, 1), (0, 0), (0, 0), (1, 1), 2, 4)  # output [N, 6, 6, 6]: C == H == W


class WrongAxis(nn.Module):
    """A [6] constant on [N, 6, 6, 6] scales W, not the channels."""

    keeps = "mul"

    def __init__(self):
        super().__init__()
        self.t = nn.ConvTranspose2d(4, 6, 3, groups=2)
        self.s = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        return self.t(x) * self.s


class ChannelAndRow(WrongAxis):
    """A [1, 6, 6, 1] constant varies along H as well as C."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.rand(1, 6, 6, 1) + 0.5)


class StatsFromInput(nn.Module):
    """BatchNorm whose running mean is a model input, not a constant."""

    keeps = "batch_norm"

    def __init__(self):
        super().__init__()
        self.t, self.bn = nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)

    def forward(self, x, mean):
        return F.batch_norm(self.t(x), mean, self.bn.running_var, self.bn.weight, self.bn.bias, False, 0.1, 1e-5)


class ReadElsewhere(nn.Module):
    """The transposed conv's unscaled output is a second output."""

    keeps = "batch_norm"

    def __init__(self):
        super().__init__()
        self.t, self.bn = nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.t(x)
        return self.bn(y), y


class TrainingBN(StatsFromInput):
    """BatchNorm in training mode: batch statistics."""

    def forward(self, x):
        return F.batch_norm(self.t(x), None, None, self.bn.weight, self.bn.bias, True, 0.1, 1e-5)


NEGATIVE = [WrongAxis, ChannelAndRow, StatsFromInput, ReadElsewhere, TrainingBN]
NEG_IDS = [c.__name__ for c in NEGATIVE]


def negative(cls):
    torch.manual_seed(0)
    model = B.randomize(cls())
    inputs = (example(G_SQUARE),) + ((torch.randn(6) * 0.5,) if cls is StatsFromInput else ())
    with torch.no_grad():
        ref = model(*inputs)
    return model, inputs, [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]


# ---------------------------------------------------------------- FX

@pytest.mark.parametrize("g", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_fx_folds(g):
    model = block(g)
    gm = repfuse.deploy(model, (example(g),))
    ops = B.op_counts(gm)
    assert ops[f"conv_transpose{g.rank}d"] == 1 and ops["mul"] == 0 and ops["relu"] == 1
    assert not [k for k in ops if "batch_norm" in k], ops
    assert rule_row(gm.meta["repfuse_report"].rules).applied == 1
    with torch.no_grad():
        for x in (example(g), example(g, batch=3, size=g.size + 2, seed=2)):
            assert_close(gm(x), model(x))


def test_fx_without_bias_and_through_torch_compile():
    g = GEOMETRIES["2d-s2-p1-op1-d2-g2"]
    model, x = block(g, bias=False), example(g)
    graphs = []
    compiled = torch.compile(model, backend="repfuse", options={"inner": lambda gm, _: graphs.append(gm) or gm.forward})
    with torch.no_grad():
        assert_close(compiled(x), model(x))
    ops = B.op_counts(graphs[0])
    assert ops["conv_transpose2d"] == 1 and not [k for k in ops if "batch_norm" in k or k == "mul"], ops


def test_fx_decomposed_aten_convolution():
    """torch.export's decomposed form: aten.convolution(transposed=True), BatchNorm as
    _native_batch_norm_legit_no_training and getitem."""
    from repfuse.backends.pytorch import fuse_graph_module

    g = GEOMETRIES["3d-s2-p1-op1-g2"]
    model, x = block(g), example(g)
    gm = torch.export.export(model, (x,)).run_decompositions().module()
    assert B.op_counts(gm)["convolution"] == 1
    with torch.no_grad():
        report = fuse_graph_module(gm)
        assert_close(gm(x), model(x))
    assert rule_row(report.rules).applied == 1 and B.op_counts(gm)["conv_transpose3d"] == 1
    assert not [k for k in B.op_counts(gm) if "batch_norm" in k or k == "mul"]


@pytest.mark.parametrize("cls", NEGATIVE, ids=NEG_IDS)
def test_fx_must_not_fire(cls):
    model, inputs, refs = negative(cls)
    gm = repfuse.deploy(model, inputs)
    ops = B.op_counts(gm)
    assert ops["conv_transpose2d"] == 1 and ops[cls.keeps] == 1, ops
    assert rule_row(gm.meta["repfuse_report"].rules).applied == 0
    with torch.no_grad():
        out = gm(*inputs)
    for o, r in zip(out if isinstance(out, tuple) else (out,), refs):
        assert_close(o.numpy(), r)
    if cls is ReadElsewhere:
        assert any(d.rule == "conv_transpose" and "read elsewhere" in d.reason
                   for d in gm.meta["repfuse_report"].declined)


# ---------------------------------------------------------------- ONNX

ort = pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from repfuse.backends import onnx as pipeline  # noqa: E402


def onnx_block(rank, cin, cout, kernel, stride, pads, output_padding, dilation, groups, size, tail=("bn", "mul"),
               seed=0, training=False, output_shape=None):
    """x -> ConvTranspose -> [BatchNormalization] -> [Mul by gamma [C, 1 x rank]] -> Relu; `pads` as (begin, end)
    per dim."""
    rng = np.random.default_rng(seed)
    consts = {"w": rng.standard_normal((cin, cout // groups) + tuple(kernel)), "b": rng.standard_normal(cout),
              "scale": rng.random(cout) + 0.5, "bias": rng.standard_normal(cout) * 0.5,
              "mean": rng.standard_normal(cout) * 0.5, "var": rng.random(cout) * 1.5 + 0.25,
              "gamma": rng.random((cout,) + (1,) * rank) + 0.5}
    attrs = dict(kernel_shape=list(kernel), strides=list(stride), dilations=list(dilation), group=groups,
                 pads=[p[0] for p in pads] + [p[1] for p in pads], output_padding=list(output_padding))
    if output_shape is not None:
        attrs["output_shape"] = list(output_shape)
    nodes, last = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["t"], **attrs)], "t"
    if "bn" in tail:
        outs = ["n", "running_mean", "running_var"] if training else ["n"]
        nodes.append(helper.make_node("BatchNormalization", [last, "scale", "bias", "mean", "var"], outs,
                                      epsilon=1e-3, **({"training_mode": 1} if training else {})))
        last = "n"
    if "mul" in tail:
        nodes.append(helper.make_node("Mul", [last, "gamma"], ["m"]))
        last = "m"
    nodes.append(helper.make_node("Relu", [last], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, cin] + [size] * rank)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in consts.items()]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def run_ort(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def onnx_optimize(model):
    fused, report = pipeline.optimize(model, simplify_first=False)
    return pipeline.to_proto(fused), report


def onnx_same_numbers(model, fused, shape, seed=1):
    feeds = {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}
    for got, ref in zip(run_ort(fused, feeds), run_ort(model, feeds)):
        assert_close(got, ref)


def onnx_case(g: Geometry, **kw):
    return onnx_block(g.rank, g.cin, g.cout, g.kernel, g.stride, [(p, p) for p in g.padding], g.output_padding,
                      g.dilation, g.groups, g.size, **kw)


@pytest.mark.parametrize("g", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_onnx_folds(g):
    model = onnx_case(g)
    fused, report = onnx_optimize(model)
    assert [n.op_type for n in fused.graph.node] == ["ConvTranspose", "Relu"]
    assert rule_row(report.rules).applied == 1
    onnx_same_numbers(model, fused, (2, g.cin) + (g.size,) * g.rank)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_onnx_geometry_sweep(data):
    """Any geometry ONNX allows, uneven pads included: one ConvTranspose, the same numbers."""
    rank = data.draw(st.integers(1, 3), "rank")
    groups = data.draw(st.integers(1, 3), "groups")
    cin, cout = (groups * data.draw(st.integers(1, 2)) for _ in range(2))
    dims = [data.draw(st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2)), f"k,s,d {i}")
            for i in range(rank)]
    kernel, stride, dilation = ([d[j] for d in dims] for j in range(3))
    pads = [data.draw(st.tuples(st.integers(0, (k - 1) * d), st.integers(0, (k - 1) * d)), f"pads {i}")
            for i, (k, _, d) in enumerate(dims)]
    # onnxruntime wants output_padding < stride (torch: < max(stride, dilation))
    out_pad = [data.draw(st.integers(0, s - 1), f"output_padding {i}") for i, (_, s, _) in enumerate(dims)]
    size = data.draw(st.integers(2, 4), "size")
    assume(all(s * (size - 1) + op + (k - 1) * d + 1 - sum(p) >= 1
               for (k, s, d), p, op in zip(dims, pads, out_pad)))
    tail = data.draw(st.sampled_from([("bn",), ("mul",), ("bn", "mul")]), "tail")
    model = onnx_block(rank, cin, cout, kernel, stride, pads, out_pad, dilation, groups, size, tail)
    fused, _ = onnx_optimize(model)
    assert [n.op_type for n in fused.graph.node] == ["ConvTranspose", "Relu"]
    onnx_same_numbers(model, fused, (2, cin) + (size,) * rank)


def onnx_negative(name):
    """The must-not-fire cases in ONNX's own terms: x [2, 4, 4, 4] -> ConvTranspose (6 channels, 6x6) -> ..."""
    g = G_SQUARE
    if name == "TrainingBN":
        return onnx_case(g, tail=("bn",), training=True)
    if name == "OutputShape":  # padding computed from the input size at run time
        return onnx_case(g, tail=("bn",), output_shape=[6, 6])
    model = onnx_case(g, tail=("bn",) if name in ("StatsFromInput", "ReadElsewhere") else ("mul",))
    graph = model.graph
    if name in ("WrongAxis", "ChannelAndRow"):
        gamma = next(t for t in graph.initializer if t.name == "gamma")
        shape = (6,) if name == "WrongAxis" else (1, 6, 6, 1)
        gamma.CopyFrom(numpy_helper.from_array(np.random.default_rng(3).random(shape).astype(np.float32) + 0.5,
                                               "gamma"))
    elif name == "StatsFromInput":
        mean = next(t for t in graph.initializer if t.name == "mean")
        graph.initializer.remove(mean)
        graph.input.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, [6]))
    elif name == "ReadElsewhere":
        graph.output.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 6, 6, 6]))
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("name", NEG_IDS + ["OutputShape"])
def test_onnx_must_not_fire(name):
    model = onnx_negative(name)
    fused, report = onnx_optimize(model)
    assert Counter(n.op_type for n in fused.graph.node) == Counter(n.op_type for n in model.graph.node)
    assert rule_row(report.rules).applied == 0
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 4, 4, 4)).astype(np.float32)}
    if name == "StatsFromInput":
        feeds["mean"] = np.random.default_rng(2).standard_normal(6).astype(np.float32)
    for got, ref in zip(run_ort(fused, feeds), run_ort(model, feeds)):
        assert_close(got, ref)
    if name == "ReadElsewhere":
        assert any(d.rule == "conv_transpose" and "read elsewhere" in d.reason for d in report.declined)


def test_onnx_torch_export():
    """A torch export (TorchScript exporter) of the block folds to one ConvTranspose and matches torch."""
    g = GEOMETRIES["2d-s2-p1-op1-d2-g2"]
    model, x = block(g), example(g)
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
    fused, _ = onnx_optimize(onnx.load_from_string(buffer.getvalue()))
    assert [n.op_type for n in fused.graph.node] == ["ConvTranspose", "Relu"]
    with torch.no_grad():
        assert_close(run_ort(fused, {"x": x.numpy()})[0], model(x).numpy())


# ---------------------------------------------------------------- TVM Relax

def relax_ops(mod) -> Counter:
    from tvm import relax

    ops = Counter()
    relax.analysis.post_order_visit(mod["main"], lambda e: isinstance(e, relax.Call) and hasattr(e.op, "name")
                                    and ops.update([e.op.name.rsplit(".", 1)[-1]]))
    return ops


def relax_module(model, inputs):
    """TVM's torch frontend where it has the op (1-D, 2-D); a 3-D block written with the BlockBuilder as the
    frontend writes the others (transposed conv, bias add, batch_norm item 0, multiply, relu)."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    if not isinstance(model, ConvTBlock) or model.t.weight.dim() < 5:
        with torch.no_grad():
            return from_exported_program(torch.export.export(model, inputs), keep_params_as_input=False)
    t, bn = model.t, model.bn
    c = lambda a: relax.const(a.detach().numpy().astype("float32"))  # noqa: E731
    bb, x = relax.BlockBuilder(), relax.Var("x", relax.TensorType(tuple(inputs[0].shape), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv3d_transpose(x, c(t.weight), t.stride, [*t.padding, *t.padding],
                                                     t.output_padding, t.dilation, t.groups))
            y = bb.emit(relax.op.add(y, c(t.bias.reshape(1, -1, 1, 1, 1))))
            y = bb.emit(relax.TupleGetItem(bb.emit(relax.op.nn.batch_norm(
                y, c(bn.weight), c(bn.bias), c(bn.running_mean), c(bn.running_var), axis=1, epsilon=bn.eps,
                training=False)), 0))
            y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.multiply(y, c(model.gamma)))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def relax_run(mod, inputs):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(t.numpy()) for t in inputs))
    out = [out] if hasattr(out, "numpy") else list(out)
    return [o.numpy() for o in out]


@pytest.mark.parametrize("g", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_relax_folds(g):
    pytest.importorskip("tvm")
    from repfuse.backends.tvm import RepFuse

    model, x = block(g), example(g)
    fuse = RepFuse()
    fused = fuse(relax_module(model, (x,)))
    ops = relax_ops(fused)
    assert ops[f"conv{g.rank}d_transpose"] == 1 and not ops["batch_norm"] and not ops["multiply"], ops
    assert rule_row(fuse.last_report).applied == 1
    with torch.no_grad():
        assert_close(relax_run(fused, (x,))[0], model(x).numpy())


@pytest.mark.parametrize("cls", NEGATIVE, ids=NEG_IDS)
def test_relax_must_not_fire(cls):
    pytest.importorskip("tvm")
    from repfuse.backends.tvm import RepFuse

    model, inputs, refs = negative(cls)
    mod = relax_module(model, inputs)
    fuse = RepFuse()
    fused = fuse(mod)
    assert relax_ops(fused) == relax_ops(mod)  # TrainingBN: the frontend writes instance_norm, which stays too
    assert rule_row(fuse.last_report).applied == 0
    for got, ref in zip(relax_run(fused, inputs), refs):
        assert_close(got, ref)


def test_relax_training_batch_norm_stays():
    """R.nn.batch_norm(training=True) after a transposed conv (written directly: the torch frontend writes
    training-mode BatchNorm as instance_norm)."""
    pytest.importorskip("tvm")
    from tvm import relax

    from repfuse.backends.tvm import RepFuse

    rng = np.random.default_rng(0)
    c = lambda *shape: relax.const((rng.random(shape) + 0.5).astype("float32"))  # noqa: E731
    bb, x = relax.BlockBuilder(), relax.Var("x", relax.TensorType((2, 4, 4, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            t = bb.emit(relax.op.nn.conv2d_transpose(x, c(4, 3, 3, 3), groups=2))
            n = bb.emit(relax.op.nn.batch_norm(t, c(6), c(6), c(6), c(6), axis=1, training=True))
            out = bb.emit_output(bb.emit(relax.TupleGetItem(n, 0)))
        bb.emit_func_output(out)
    mod = bb.get()
    fuse = RepFuse()
    fused = fuse(mod)
    assert relax_ops(fused)["batch_norm"] == 1 and rule_row(fuse.last_report).applied == 0
    assert any("training" in d.reason for d in fuse.last_declines)
    xs = (torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)),)
    assert_close(relax_run(fused, xs)[0], relax_run(mod, xs)[0])


# ---------------------------------------------------------------- the algebra alone

@pytest.mark.parametrize("g", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_then_per_channel_matches_torch(g):
    """affine.then_per_channel against torch: convT then y * s + c, in float64."""
    from repfuse.patterns import affine

    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((g.cin, g.cout // g.groups) + g.kernel), rng.standard_normal(g.cout)
    s, c = rng.random(g.cout) + 0.5, rng.standard_normal(g.cout)
    t = affine.conv_transpose(w, b, g.stride, g.padding, g.output_padding, g.dilation, g.groups)
    folded = affine.then_per_channel(t, affine.per_channel(s, c, g.rank))
    fn = getattr(F, f"conv_transpose{g.rank}d")
    x = torch.from_numpy(rng.standard_normal((2, g.cin) + (g.size,) * g.rank))

    def run(op):
        return fn(x, torch.from_numpy(op.weight), torch.from_numpy(op.bias), op.stride, [p for p, _ in op.pads],
                  op.output_padding, op.groups, op.dilation).numpy()

    per = (1, -1) + (1,) * g.rank
    np.testing.assert_allclose(run(folded), run(t) * s.reshape(per) + c.reshape(per), rtol=1e-12, atol=1e-12)


def test_rule_on_a_view_without_ir():
    """The rule on a graph given as descriptions: the chain folds, `affine` leaves it alone, a second reader of
    the transposed conv's output keeps the chain and says why."""
    from test_rules_fake_view import FakeView

    from repfuse.patterns import affine, rules
    from repfuse.patterns.planner import Affine, Layout, Pointwise, Transposed

    g, rng = GEOMETRIES["2d-s2-p1-op1-d2-g2"], np.random.default_rng(0)
    t = affine.conv_transpose(rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(6), g.stride, g.padding,
                              g.output_padding, g.dilation, g.groups)
    bn = affine.batchnorm(rng.standard_normal(6), rng.random(6) + 0.5, rng.random(6), rng.random(6), 1e-5, 2)
    nodes = {"t": Transposed("x", t), "n": Affine("t", bn), "m": Affine("n", affine.per_channel(rng.random(6), 0, 2)),
             "y": Pointwise("m", None)}
    layouts = {"x": Layout(4, 2), "t": Layout(6, 2), "n": Layout(6, 2), "m": Layout(6, 2)}
    plan = dict((r.name, r.plan) for r in rules.RULES)
    assert not plan["affine"](FakeView(nodes, layouts, outputs=["y"])).edits  # two per-channel ops: two steps
    [edit] = plan["conv_transpose"](FakeView(nodes, layouts, outputs=["y"])).edits
    assert (edit.value, edit.erase, edit.term.input) == ("m", ("t", "n", "m"), "x")
    shared = plan["conv_transpose"](FakeView(nodes, layouts, outputs=["y", "t"]))
    assert not shared.edits and "read elsewhere" in shared.declines["n"]
