"""Issue 10 on the ONNX path: what users bring, not what we wrote.

Every test compares numbers against the unfused model in onnxruntime on seeded random
inputs (BatchNorm statistics far from 0/1) and asserts the structure: the rewrite that
must not happen did not, the one that should did.
"""

import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import repfuse
from repfuse.backends import onnx as pipeline
from repfuse.backends.cli import main

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

RTOL = 1e-4  # float32, relative to the output's scale


def session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def outputs(model, feeds):
    return session(model).run(None, feeds)


def assert_same(model, ref_model, feeds):
    got, ref = outputs(model, feeds), outputs(ref_model, feeds)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        assert np.abs(g - r).max(initial=0.0) <= RTOL * max(np.abs(r).max(initial=0.0), 1.0)


def op_types(model):
    return [n.op_type for n in model.graph.node]


def bn_params(rng, c, prefix=""):
    """BatchNorm scale, bias, mean, var far from the identity."""
    arrays = [rng.random(c) + 0.5, rng.standard_normal(c), rng.standard_normal(c) * 2, rng.random(c) * 3 + 0.2]
    return [numpy_helper.from_array(a.astype(np.float32), prefix + n) for a, n in zip(arrays, "sbmv")]


def make(nodes, inputs, outputs_, inits, opset=17, ir_version=9):
    graph = helper.make_graph(nodes, "g", inputs, outputs_, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(model)
    return model


def tensor(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def conv_bn(c=4, weight_is_input=False, bn_param_is_input=False, shape=(2, 4, 8, 8)):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w")
    inits = [w] + bn_params(rng, c)
    inputs = [tensor("x", list(shape))]
    if weight_is_input:
        inputs.append(tensor("w", [c, c, 3, 3]))
    if bn_param_is_input:
        inputs.append(tensor("m", [c]))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    return make(nodes, inputs, [tensor("y", list(shape))], inits)


def x_feed(shape=(2, 4, 8, 8), seed=1):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


# ---------------------------------------------------------------- 1. initializers that are graph inputs

@pytest.mark.parametrize("simplify", [True, False], ids=["onnxsim", "no-onnxsim"])
@pytest.mark.parametrize("which", ["weight", "bn_mean"])
def test_initializer_that_is_an_input_is_never_folded(which, simplify):
    model = conv_bn(weight_is_input=which == "weight", bn_param_is_input=which == "bn_mean")
    out = repfuse.optimize_onnx(model, simplify=simplify)
    name = "w" if which == "weight" else "m"
    assert name in [i.name for i in out.graph.input] and name in [t.name for t in out.graph.initializer]
    assert op_types(out) == ["Conv", "BatchNormalization"]  # nothing folded
    rng = np.random.default_rng(2)
    override = {"w": rng.standard_normal((4, 4, 3, 3)), "m": rng.standard_normal(4)}[name].astype(np.float32)
    assert_same(out, model, x_feed())  # the default
    assert_same(out, model, {**x_feed(), name: override})  # an override is honoured
    # the override matters: a folded default would show
    assert not np.allclose(outputs(out, {**x_feed(), name: override})[0], outputs(out, x_feed())[0], atol=1e-2)


def test_initializer_input_decline_is_reported(tmp_path, capsys):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(conv_bn(weight_is_input=True), str(src))
    assert main(["optimize", str(src), "-o", str(out), "--check", "--explain"]) == 0
    assert "graph input (overridable default)" in capsys.readouterr().out
    fused = onnx.load(str(out))  # through the CLI's onnxsim child too
    assert op_types(fused) == ["Conv", "BatchNormalization"]
    override = np.random.default_rng(2).standard_normal((4, 4, 3, 3)).astype(np.float32)
    assert_same(fused, onnx.load(str(src)), {**x_feed(), "w": override})


def test_initializer_input_in_elementwise_and_constant_folding():
    """x * c + x with c overridable; a parameter-only Mul whose operand is overridable."""
    rng = np.random.default_rng(3)
    c = numpy_helper.from_array(rng.standard_normal((1, 4, 1, 1)).astype(np.float32), "c")
    a = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "a")
    k = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "k")
    nodes = [helper.make_node("Mul", ["x", "c"], ["xc"]),
             helper.make_node("Add", ["xc", "x"], ["s"]),
             helper.make_node("Mul", ["a", "k"], ["wk"]),  # parameter-only, but `a` may be overridden
             helper.make_node("Conv", ["s", "wk"], ["y"])]
    model = make(nodes, [tensor("x", [2, 4, 8, 8]), tensor("c", [1, 4, 1, 1]), tensor("a", [4, 4, 1, 1])],
                 [tensor("y", [2, 4, 8, 8])], [c, a, k])
    for simplify in (True, False):
        out = repfuse.optimize_onnx(model, simplify=simplify)
        assert op_types(out) == ["Mul", "Add", "Mul", "Conv"]
        assert {"c", "a"} <= {t.name for t in out.graph.initializer}
        assert_same(out, model, x_feed())
        assert_same(out, model, {**x_feed(), "c": np.full((1, 4, 1, 1), -3.0, np.float32),
                                 "a": np.ones((4, 4, 1, 1), np.float32)})


def test_initializer_input_in_pad_value_is_not_read():
    """Pad whose constant value is an overridable default: never taken as a fixed border."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
             numpy_helper.from_array(np.array(0.0, np.float32), "value"),
             numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Pad", ["x", "pads", "value"], ["p"]),
             helper.make_node("Conv", ["p", "w"], ["y"])]
    model = make(nodes, [tensor("x", [2, 4, 8, 8]), tensor("value", [])], [tensor("y", [2, 4, 8, 8])], inits)
    out = repfuse.optimize_onnx(model, simplify=False)
    assert op_types(out) == ["Pad", "Conv"]
    assert_same(out, model, {**x_feed(), "value": np.array(2.5, np.float32)})


# ---------------------------------------------------------------- 2. rank-0 regions with groups > 1

class FlattenBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm1d(8 * 4 * 4)
        self.c = torch.nn.Parameter(torch.randn(8 * 4 * 4))
        self.d = torch.nn.Parameter(torch.randn(8 * 4 * 4))

    def forward(self, x):
        return self.bn(torch.flatten(torch.relu(self.conv(x)), 1)) * self.c + self.d


class ScaleResidual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 8)
        self.c = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        y = torch.relu(self.fc(x))
        return y * self.c + y


class LinearBNResidual(torch.nn.Module):
    def __init__(self, two=True):
        super().__init__()
        self.fc = torch.nn.Linear(6, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.bn2 = torch.nn.BatchNorm1d(8) if two else torch.nn.Identity()

    def forward(self, x):
        y = self.fc(x)
        return self.bn2(self.bn(y)) + y


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 3 + 0.2)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def export(model, x, path, dynamic_batch=False):
    kwargs = dict(dynamo=False, input_names=["x"], output_names=["y"])
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"x": {0: "N"}, "y": {0: "N"}}
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), **kwargs)
    return onnx.load(str(path))


@pytest.mark.parametrize("factory,shape,expect", [
    (FlattenBN, (3, 3, 6, 6), ["Conv", "Relu", "Flatten", "Mul", "Add"]),  # bn(x)*c + d on [N, C]
    (ScaleResidual, (3, 6), ["Gemm", "Relu", "Mul"]),  # y*c + y -> y * (c + 1)
    (LinearBNResidual, (3, 6), ["Gemm"]),  # bn2(bn(y)) + y after a Gemm: Mul, Add, then into the Gemm
    (lambda: LinearBNResidual(two=False), (3, 6), ["Gemm", "BatchNormalization", "Add"]),  # 2 ops -> 2 steps: kept
], ids=["flatten_bn", "x_c_plus_x", "bn2_bn_y_plus_y", "bn_y_plus_y"])
def test_rank0_per_channel_regions_are_mul_add(factory, shape, expect, tmp_path):
    torch.manual_seed(0)
    model = _randomize(factory())
    x = torch.randn(shape)
    src = export(model, x, tmp_path / "in.onnx")
    for simplify in (True, False):
        out = repfuse.optimize_onnx(src, simplify=simplify)
        found = op_types(out)
        for n in out.graph.node:  # a Gemm never carries a grouped weight: its weight is [O, I] of the input's I
            if n.op_type == "Gemm":
                w = next(t for t in out.graph.initializer if t.name == n.input[1])
                assert len(w.dims) == 2
        assert found == expect, found
        assert_same(out, src, {"x": x.numpy()})
        with torch.no_grad():
            ref = model(x).numpy()
        assert np.abs(outputs(out, {"x": x.numpy()})[0] - ref).max() <= RTOL * np.abs(ref).max()


def test_rank0_gemm_bn_bn_folds_into_the_gemm():
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "wb")] + bn_params(rng, 8)
    nodes = [helper.make_node("Gemm", ["x", "w", "wb"], ["g"], transB=1),
             helper.make_node("BatchNormalization", ["g", "s", "b", "m", "v"], ["bn"]),
             helper.make_node("BatchNormalization", ["bn", "s", "b", "m", "v"], ["y"])]
    model = make(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 8])], inits)
    out = repfuse.optimize_onnx(model, simplify=False)
    assert op_types(out) == ["Gemm"]
    assert_same(out, model, {"x": rng.standard_normal((3, 8)).astype(np.float32)})


def test_rank0_per_channel_concat_never_becomes_a_gemm():
    """concat(bn1(x), bn2(x)) on [N, 4]: fused it would be a new (block-diagonal) Gemm where the model has
    no linear at all: left as written, the cheapest form for the backend."""
    rng = np.random.default_rng(5)
    inits = bn_params(rng, 4) + bn_params(rng, 4, prefix="q")
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["p"]),
             helper.make_node("BatchNormalization", ["x", "qs", "qb", "qm", "qv"], ["q"]),
             helper.make_node("Concat", ["p", "q"], ["y"], axis=1)]
    model = make(nodes, [tensor("x", ["N", 4])], [tensor("y", ["N", 8])], inits)
    model_ir, report = pipeline.optimize(model, simplify_first=False)
    out = pipeline.to_proto(model_ir)
    assert op_types(out) == ["BatchNormalization", "BatchNormalization", "Concat"]
    assert any("would be a new conv or linear" in d.reason for d in report.declined)
    for n in (1, 3):
        assert_same(out, model, {"x": rng.standard_normal((n, 4)).astype(np.float32)})


# ---------------------------------------------------------------- 3. dynamic Linear

class DynamicLinear(torch.nn.Module):
    def __init__(self, k=3, c=6, o=5):
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(c, o) for _ in range(k))
        self.gate = torch.nn.Linear(c, k)
        self.bn = torch.nn.BatchNorm1d(o)

    def forward(self, x):
        pi = torch.softmax(self.gate(x), dim=1)
        y = sum(pi[:, i:i + 1] * e(x) for i, e in enumerate(self.experts))
        return self.bn(y)


@pytest.mark.parametrize("batch,dynamic", [(1, False), (3, False), (3, True)])
def test_dynamic_linear_is_declined_and_exact(batch, dynamic, tmp_path):
    torch.manual_seed(1)
    model = _randomize(DynamicLinear())
    x = torch.randn(batch, 6)
    src = export(model, x, tmp_path / "in.onnx", dynamic_batch=dynamic)
    model_ir, report = pipeline.optimize(src, simplify_first=False)
    out = pipeline.to_proto(model_ir)
    assert any(d.rule == "dynamic_conv" and "dynamic linear" in d.reason for d in report.declined), report.declined
    found = op_types(out)
    assert found.count("Gemm") + found.count("MatMul") >= 4  # the K experts and the gate stay
    assert "Conv" not in found and "Scan" not in found
    for n in (batch, 1, 4) if dynamic else (batch,):
        assert_same(out, src, {"x": np.random.default_rng(n).standard_normal((n, 6)).astype(np.float32)})


# ---------------------------------------------------------------- 4. BatchNormalization with training outputs

@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("use", ["graph_outputs", "read", "unused"])
def test_batchnorm_with_training_outputs_is_left_alone(opset, use, tmp_path):
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w")] + bn_params(rng, 4)
    bn_outs = ["bn", "mean_out", "var_out", "saved_mean", "saved_var"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], bn_outs, momentum=0.9),
             helper.make_node("Relu", ["bn"], ["y"])]
    outs = [tensor("y", [2, 4, 8, 8])]
    if use == "graph_outputs":
        outs += [tensor("mean_out", [4]), tensor("saved_var", [4])]
    elif use == "read":
        nodes.append(helper.make_node("Add", ["mean_out", "var_out"], ["stats"]))
        outs.append(tensor("stats", [4]))
    model = make(nodes, [tensor("x", [2, 4, 8, 8])], outs, inits, opset=opset, ir_version=7)
    for simplify in (True, False):
        out = repfuse.optimize_onnx(model, simplify=simplify)
        assert op_types(out).count("BatchNormalization") == 1  # training-mode BN: batch statistics, kept
        assert_same(out, model, {"x": (rng.standard_normal((2, 4, 8, 8)) * 3 + 1).astype(np.float32)})


# ---------------------------------------------------------------- 5. graph outputs that reference rewritten nodes

def _bn_relu_graph(outputs_, extra_nodes=(), shape=(2, 4, 8, 8)):
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w")] + bn_params(rng, 4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["y"]), *extra_nodes]
    graph = helper.make_graph(nodes, "g", [tensor("x", list(shape))], outputs_, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model


@pytest.mark.parametrize("case", ["intermediate", "twice", "graph_input", "initializer", "conv_output"])
def test_graph_outputs_survive_rewrites(case):
    t = lambda name, shape=(2, 4, 8, 8): tensor(name, list(shape))  # noqa: E731
    outs = {"intermediate": [t("y"), t("bn")],
            "twice": [t("y"), t("y")],
            "graph_input": [t("y"), t("x")],
            "initializer": [t("y"), t("w", (4, 4, 3, 3))],
            "conv_output": [t("c"), t("y")]}[case]
    model = _bn_relu_graph(outs)
    for simplify in (True, False):
        out = repfuse.optimize_onnx(model, simplify=simplify)
        assert [o.name for o in out.graph.output] == [o.name for o in outs]
        assert_same(out, model, x_feed())
        found = op_types(out)
        if case in ("twice", "graph_input", "initializer"):
            assert found == ["Conv", "Relu"], found  # Conv + BN still fold
        if case == "conv_output":  # the conv's output is read by the user: BN stays or folds into a second conv
            assert found.count("BatchNormalization") + found.count("Conv") == 2


# ---------------------------------------------------------------- 6, 9. the CLI: mistakes and checks

def _cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repfuse: error:"), lines
    assert "Traceback" not in err


@pytest.mark.parametrize("spec", ["x:1,4,8", "x:3,4,8,8", "nosuch:1,4,8,8", "x:1,4,a,8", "x:1,-4,8,8", "x1,4,8,8"],
                         ids=["wrong_rank", "conflicting_static_dim", "unknown_input", "not_int", "negative",
                              "no_name"])
def test_bad_input_shape_is_one_line_exit_2_nothing_written(spec, tmp_path, capsys):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(conv_bn(shape=(2, 4, 8, 8)), str(src))
    code, _, err = _cli(["optimize", str(src), "-o", str(out), "--check", "--input-shape", spec], capsys)
    assert code == 2
    _one_error_line(err)
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]  # no OUT, no temporary


@pytest.mark.parametrize("case", ["missing", "truncated", "not_onnx", "unwritable_dir", "unknown_rule"])
def test_user_mistakes_are_one_line_exit_2(case, tmp_path, capsys):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    good = conv_bn().SerializeToString()
    args = ["optimize", str(src), "-o", str(out)]
    if case == "truncated":
        src.write_bytes(good[:len(good) // 2])
    elif case == "not_onnx":
        src.write_bytes(b"\x89PNG\r\n\x1a\n not a model")
    elif case == "unwritable_dir":
        src.write_bytes(good)
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        args[-1] = str(ro / "out.onnx")
        if os.access(ro, os.W_OK):  # root ignores permissions
            ro.chmod(0o700)
            args[-1] = str(tmp_path / "missing_dir" / "out.onnx")
    elif case == "unknown_rule":
        src.write_bytes(good)
        args += ["--disable", "no_such_rule"]
    code, _, err = _cli(args, capsys)
    assert code == 2
    _one_error_line(err)
    assert not out.exists()


def _typed_inputs_model():
    """A bool mask, an int index and a float scalar next to the image."""
    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w")] + bn_params(rng, 4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
             helper.make_node("Mul", ["bn", "t"], ["bt"]),
             helper.make_node("Gather", ["bt", "idx"], ["g"], axis=1),
             helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["g", "mf"], ["y"])]
    inputs = [tensor("x", ["N", 4, 8, 8]), tensor("t", []), tensor("idx", [3], TensorProto.INT64),
              tensor("mask", [1, 1, 1, 8], TensorProto.BOOL)]
    return make(nodes, inputs, [tensor("y", ["N", 3, 8, 8])], inits)


def test_check_with_bool_int_and_scalar_inputs(tmp_path, capsys):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_typed_inputs_model(), str(src))
    code, stdout, err = _cli(["optimize", str(src), "-o", str(out), "--check", "--input-shape", "t:"], capsys)
    assert code == 0, err
    assert "DIFFERENT" not in stdout and stdout.count(" ok") == 1
    assert "BatchNormalization" not in op_types(onnx.load(str(out)))


def test_check_skipped_for_custom_domain_ops(tmp_path, capsys):
    model = conv_bn()
    model.graph.node.append(helper.make_node("MyOp", ["y"], ["z"], domain="com.example"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    code, stdout, err = _cli(["optimize", str(src), "-o", str(out), "--check", "--no-simplify"], capsys)
    assert code == 0, err
    assert "check skipped: onnxruntime cannot run custom-domain ops (com.example.MyOp)" in stdout
    assert op_types(onnx.load(str(out))) == ["Conv", "MyOp"]


def test_check_that_cannot_run_is_exit_2_and_leaves_nothing(tmp_path, capsys):
    """The input itself fails in onnxruntime at the chosen size (a Reshape to a fixed element count)."""
    rng = np.random.default_rng(9)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([2, 256], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Reshape", ["c", "shape"], ["y"])]
    model = make(nodes, [tensor("x", ["N", 4, "H", "W"])], [tensor("y", [2, 256])], inits)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    code, _, err = _cli(["optimize", str(src), "-o", str(out), "--check", "--input-shape", "x:2,4,9,9"], capsys)
    assert code == 2
    _one_error_line(err)
    assert "cannot run the input model" in err
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]
    code, _, err = _cli(["optimize", str(src), "-o", str(out), "--check", "--input-shape", "x:2,4,8,8"], capsys)
    assert code == 0 and out.exists()


def test_failed_check_writes_no_output(tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(conv_bn(), str(src))
    real = pipeline.compare

    def wrong(names, ref, cand, *tolerances):  # as if the optimized model were wrong
        return real(names, ref, [c + 1 for c in cand], *tolerances)

    monkeypatch.setattr(pipeline, "compare", wrong)
    code, stdout, err = _cli(["optimize", str(src), "-o", str(out), "--check"], capsys)
    assert code == 1 and "DIFFERENT" in stdout and "not written" in err
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


def test_in_place_check_compares_against_the_original(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    original = conv_bn()
    onnx.save(original, str(src))
    code, stdout, _ = _cli(["optimize", str(src), "--in-place", "--check"], capsys)
    assert code == 0 and " ok" in stdout
    assert op_types(onnx.load(str(src))) == ["Conv"]
    assert_same(onnx.load(str(src)), original, x_feed())
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


# ---------------------------------------------------------------- 7. Ctrl-C

def test_interrupt_during_onnxsim_is_prompt(monkeypatch):
    """onnxsim runs in a forked child: Ctrl-C in the parent stops it at once and kills the child."""
    import onnxsim
    import threading

    monkeypatch.setattr(onnxsim, "simplify", lambda model, *a, **k: time.sleep(60))  # a stuck onnxsim (in the child)
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    start = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        pipeline.simplify(conv_bn(), warn=lambda m: None, isolate=True)
    assert time.perf_counter() - start < 3.0


def test_onnxsim_crash_in_child_is_a_warning(monkeypatch):
    import onnxsim

    monkeypatch.setattr(onnxsim, "simplify", lambda model, *a, **k: os._exit(3))
    warned = []
    proto = pipeline.simplify(conv_bn(), warn=warned.append, isolate=True)
    assert warned and "crashed" in warned[0]
    assert op_types(proto) == ["Conv", "BatchNormalization"]


def test_interrupt_during_check_writes_nothing(tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(conv_bn(), str(src))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "compare_outputs", interrupted)
    code, _, err = _cli(["optimize", str(src), "-o", str(out), "--check", "--report", str(tmp_path / "r.json")],
                        capsys)
    assert code == 130 and "nothing written" in err
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


def _signal_cli(script: str, mark, sig) -> tuple[int, str, float]:
    """Run `script` in a fresh interpreter, wait until it touches `mark`, send `sig`: (exit code, stderr,
    seconds from the signal to the exit)."""
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.perf_counter() + 60
    while not mark.exists() and time.perf_counter() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert mark.exists(), proc.communicate()[1]
    sent = time.perf_counter()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err, time.perf_counter() - sent


def test_sigint_to_the_cli_process(tmp_path):
    """A real SIGINT to the CLI process while onnxsim (made to hang) runs in its child: prompt exit 130."""
    src, out, mark = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "in_onnxsim"
    onnx.save(conv_bn(), str(src))
    script = (f"import pathlib, sys, time, onnxsim\n"
              f"def hang(*a, **k):\n    pathlib.Path({str(mark)!r}).touch()\n    time.sleep(60)\n"
              f"onnxsim.simplify = hang\n"
              f"from repfuse.backends.cli import main\n"
              f"sys.exit(main(['optimize', {str(src)!r}, '-o', {str(out)!r}, '--check']))\n")
    code, err, latency = _signal_cli(script, mark, signal.SIGINT)
    assert code == 130, err
    assert "nothing written" in err and "Traceback" not in err
    assert latency < 5.0, latency  # a hang would be 60 s; 1.5 s measured, more on a loaded machine
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "in_onnxsim"]


# ---------------------------------------------------------------- 8. external data

def test_external_data_in_and_out(tmp_path, capsys):
    model = conv_bn(c=8, shape=(2, 8, 8, 8))
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = src_dir / "model.onnx"
    onnx.save(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=0)
    assert (src_dir / "weights.bin").stat().st_size >= 8 * 8 * 9 * 4
    out = out_dir / "fused.onnx"
    code, stdout, err = _cli(["optimize", str(src), "-o", str(out), "--external-data", "--check"], capsys)
    assert code == 0, err
    assert " ok" in stdout
    assert sorted(os.listdir(out_dir)) == ["fused.onnx", "fused.onnx.data"]
    loaded = onnx.load(str(out), load_external_data=False)
    weight = max(loaded.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    assert weight.data_location == TensorProto.EXTERNAL
    assert op_types(loaded) == ["Conv"]
    feeds = x_feed((2, 8, 8, 8))
    assert_same(out, src, feeds)


class PadThenPool(torch.nn.Module):
    """Fuzzer seed 107299: onnxsim's fuse_pad_into_pool gives the pool pads >= its kernel, which
    onnxruntime refuses to load; repfuse skips that onnxsim pass."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.pool = torch.nn.AvgPool2d(3, 3, 1, ceil_mode=True, count_include_pad=True)

    def forward(self, x):
        return self.pool(torch.nn.functional.pad(self.conv(x), [1, 1, 2, 2]))


def test_onnxsim_pad_into_pool_never_breaks_the_model(tmp_path):
    x = torch.randn(2, 3, 10, 10)
    src = export(PadThenPool().eval(), x, tmp_path / "m.onnx")
    out = repfuse.optimize_onnx(src)
    assert_same(out, src, {"x": x.numpy()})
    pools = [n for n in out.graph.node if n.op_type == "AveragePool"]
    for pool in pools:  # whatever stays a pool keeps pads below its kernel
        attrs = {a.name: list(a.ints) for a in pool.attribute}
        assert all(p < k for p, k in zip(attrs.get("pads", []), attrs["kernel_shape"] * 2))


def test_sigterm_during_the_check_leaves_no_output_and_no_staging_folder(tmp_path):
    """`kill` while the staged OUT waits for --check: exit 143, no OUT, no .repfuse-* folder beside it."""
    src, out, mark = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "checking"
    onnx.save(conv_bn(), str(src))
    script = (f"import pathlib, sys, time\n"
              f"import repfuse.backends.onnx as pipeline\n"
              f"def hang(*a, **k):\n"
              f"    assert any(p.name.startswith('.repfuse-') for p in pathlib.Path({str(tmp_path)!r}).iterdir())\n"
              f"    pathlib.Path({str(mark)!r}).touch()\n    time.sleep(60)\n"
              f"pipeline.compare_outputs = hang\n"
              f"from repfuse.backends.cli import main\n"
              f"sys.exit(main(['optimize', {str(src)!r}, {str(out)!r}, '--check']))\n")
    code, err, _ = _signal_cli(script, mark, signal.SIGTERM)  # OUT is staged while the check runs
    assert code == 143, err
    assert "terminated; nothing written" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["checking", "in.onnx"]
