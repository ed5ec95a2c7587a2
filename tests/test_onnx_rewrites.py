"""The seed-paper rewrites on the ONNX path: dead channels, dynamic convs, weight-slice folding, rule switches.

Every model is exported with the TorchScript exporter and checked against onnxruntime on the
unoptimized export and against torch; structure is checked on the Conv nodes (weight shapes,
counts, including Convs inside a Scan body).
"""

import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import repfuse
import rewrite_blocks as RB
from repfuse.backends.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from zoo import NETWORKS  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


def export(model, x, path, dynamic_batch=False, fold=True):
    kwargs = dict(dynamo=False, input_names=["x"], output_names=["y"], do_constant_folding=fold)
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"x": {0: "N"}, "y": {0: "N"}}
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), **kwargs)
    return path


def run(model, x):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def close(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(out - ref).max()


def check_numbers(model, src, proto, x):
    """optimized == onnxruntime(unoptimized export) == torch."""
    with torch.no_grad():
        ref = model(x).numpy()
    out = run(proto, x.numpy())
    close(out, run(src, x.numpy()))
    close(out, ref)


def convs(graph):
    """Every Conv node, subgraphs (a Scan body) included."""
    found = []
    for node in graph.node:
        if node.op_type == "Conv":
            found.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += convs(attr.g)
    return found


def weight_shapes(proto):
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    return [inits.get(n.input[1]) for n in convs(proto.graph)]


def rule(proto_or_report, name):
    return next(r for r in proto_or_report.rules if r.name == name)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


# ---------------------------------------------------------------- dead channels

@pytest.mark.parametrize("k, padding, kept", [(1, 0, 6), (3, 1, 7)], ids=["1x1", "3x3-padded"])
def test_dead_channels(k, padding, kept, tmp_path):
    """Channel 1 (constant 0) always goes; channel 2 (constant 0.5) goes into an unpadded consumer's bias."""
    model = RB.DeadChannels(0.5, k=k, padding=padding)
    x = torch.randn(2, 3, 10, 10)
    src = export(model, x, tmp_path / "in.onnx")
    assert [s[0] for s in weight_shapes(onnx.load(str(src)))] == [8, 6]
    proto = repfuse.optimize_onnx(str(src))
    shapes = weight_shapes(proto)
    assert shapes[0][0] == kept and shapes[1][:2] == (6, kept), shapes
    check_numbers(model, src, proto, x)


@pytest.mark.parametrize("both, channels", [(False, 8), (True, 7)], ids=["one-branch", "both-branches"])
def test_residual_dead_channel(both, channels, tmp_path):
    """A channel dead in one branch of a residual add is not constant after it; dead in both, it goes."""
    model = RB.ResidualDead(both=both)
    x = torch.randn(2, 3, 10, 10)
    src = export(model, x, tmp_path / "in.onnx")
    proto = repfuse.optimize_onnx(str(src))
    shapes = weight_shapes(proto)
    assert [s[0] for s in shapes] == [8, channels, channels, 4], shapes
    assert shapes[-1][1] == channels
    check_numbers(model, src, proto, x)


def test_disable_dead_channels(tmp_path, capsys):
    src = export(RB.DeadChannels(0.5), torch.randn(1, 3, 8, 8), tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--disable", "dead_channels", "--check"]) == 0
    text = capsys.readouterr().out
    assert weight_shapes(onnx.load(str(out)))[0][0] == 8
    rules = next(line for line in text.splitlines() if line.startswith("rules:"))
    assert rules.split("; off: ")[1].split(", ")[0] == "dead_channels"
    proto = repfuse.optimize_onnx(str(src), disable=["dead_channels"])
    assert weight_shapes(proto)[0][0] == 8


# ---------------------------------------------------------------- dynamic convs

@pytest.mark.parametrize("batch", [1, 4])
def test_dynamic_conv_static_batch(batch, tmp_path):
    model = RB.DynamicNet()
    x = torch.randn(batch, 3, 12, 12)
    src = export(model, x, tmp_path / "in.onnx")
    assert len(convs(onnx.load(str(src)).graph)) == 9  # stem + 2 x K=4
    proto = repfuse.optimize_onnx(str(src))
    assert len(convs(proto.graph)) == 3
    check_numbers(model, src, proto, x)


def test_dynamic_conv_dynamic_batch(tmp_path):
    model = RB.DynamicNet()
    src = export(model, torch.randn(2, 3, 12, 12), tmp_path / "in.onnx", dynamic_batch=True)
    proto = repfuse.optimize_onnx(str(src))
    assert len(convs(proto.graph)) == 3  # two of them in Scan bodies: ONNX's group must be static
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for batch in (1, 4):
        check_numbers(model, src, proto, torch.randn(batch, 3, 12, 12))


def test_dynamic_conv_report(tmp_path):
    src = export(RB.DynamicNet(), torch.randn(2, 3, 12, 12), tmp_path / "in.onnx")
    from repfuse.backends import onnx as pipeline

    _, report = pipeline.optimize(onnx.load(str(src)))
    row = rule(report, "dynamic_conv")
    assert row.enabled and row.applied == 2 and "8 weighted convs -> 2" in row.detail
    assert [r["name"] for r in report.to_dict()["rules"]][:6] == ["onnxsim", "constant_folding", "affine",
                                                                  "conv_transpose", "dynamic_conv", "dead_channels"]


# ---------------------------------------------------------------- zoo networks

def _reference_shapes(reference):
    return sorted(tuple(m.weight.shape) for m in reference.modules() if isinstance(m, torch.nn.Conv2d))


def test_pruned_resnet_reaches_the_smaller_network(tmp_path):
    net = NETWORKS["pruned-resnet"]
    model = net.build()
    reference = net.to_deploy(model)
    x = torch.randn(1, 3, 64, 64)
    src = export(model, x, tmp_path / "in.onnx")
    proto = repfuse.optimize_onnx(str(src))
    assert sorted(weight_shapes(proto)) == _reference_shapes(reference)
    check_numbers(model, src, proto, x)


def test_nas_supernet_weight_slices_fold_without_onnxsim(tmp_path):
    """Exported without the exporter's own constant folding: every conv weight is Slice(Slice(W, ...))."""
    net = NETWORKS["nas-supernet"]
    model = net.build()
    reference = net.to_deploy(model)
    x = torch.randn(1, 3, 64, 64)
    src = export(model, x, tmp_path / "in.onnx", fold=False)
    assert Counter(n.op_type for n in onnx.load(str(src)).graph.node)["Slice"] > 0
    proto = repfuse.optimize_onnx(str(src), simplify=False)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["Slice"] == 0 and ops["BatchNormalization"] == 0, ops
    assert sorted(weight_shapes(proto)) == _reference_shapes(reference)
    check_numbers(model, src, proto, x)


def test_constant_folding_off_keeps_the_slices(tmp_path):
    src = export(RB.DeadChannels(0.0), torch.randn(1, 3, 8, 8), tmp_path / "in.onnx", fold=False)
    proto = repfuse.optimize_onnx(str(src), simplify=False, disable=["constant_folding"])
    onnx.checker.check_model(proto)


# ---------------------------------------------------------------- switches

def test_unknown_rule_is_one_line_and_exit_2(tmp_path, capsys):
    src = export(RB.DeadChannels(0.5), torch.randn(1, 3, 8, 8), tmp_path / "in.onnx")
    assert main(["optimize", str(src), "-o", str(tmp_path / "out.onnx"), "--disable", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bogus" in err and "dead_channels" in err
    assert not (tmp_path / "out.onnx").exists()
    assert main(["compile", str(src), "-o", str(tmp_path / "out.so"), "--enable", "nope,affine"]) == 2
    with pytest.raises(Exception, match="bogus"):
        repfuse.optimize_onnx(str(src), disable=["bogus"])


def test_list_rules(capsys):
    assert main(["optimize", "--list-rules"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:] if not line[:1].isspace()]  # summaries wrap onto indented lines
    assert [r[0] for r in rows] == ["constant_folding", "affine", "conv_transpose", "dynamic_conv", "dead_channels",
                                    "ghost_concat"]
    assert rows[-1][1] == "off" and rows[0][1] == "on"


def test_report_json_has_rule_rows(tmp_path):
    import json

    src = export(RB.DeadChannels(0.5), torch.randn(1, 3, 8, 8), tmp_path / "in.onnx")
    report = tmp_path / "r.json"
    assert main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--report", str(report), "-q"]) == 0
    rows = {r["name"]: r for r in json.loads(report.read_text())["rules"]}
    assert rows["dead_channels"]["applied"] == 2 and not rows["ghost_concat"]["enabled"]


def test_qdq_weights_pass_through_and_plain_slices_fold():
    """Q/DQ on a weight is left alone (even though it reads only constants); a Slice of a weight folds."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    ints = lambda v, name: numpy_helper.from_array(np.array([v], np.int64), name)  # noqa: E731
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(0.05), "scale"),
             numpy_helper.from_array(np.int8(0), "zero"), ints(0, "s0"), ints(6, "s1"), ints(0, "ax")]
    nodes = [helper.make_node("QuantizeLinear", ["w", "scale", "zero"], ["wq"]),
             helper.make_node("DequantizeLinear", ["wq", "scale", "zero"], ["wd"]),
             helper.make_node("Conv", ["x", "wd"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Slice", ["w", "s0", "s1", "ax"], ["ws"]),
             helper.make_node("Conv", ["x", "ws"], ["b"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    proto = repfuse.optimize_onnx(model, simplify=False)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1 and ops["Slice"] == 0, ops
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    for a, b in zip(ort.InferenceSession(model.SerializeToString()).run(None, {"x": x}),
                    ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})):
        close(b, a)


# ---------------------------------------------------------------- Ghost concat

@pytest.mark.parametrize("enable", [False, True], ids=["default-off", "enabled"])
def test_ghost_concat_fires_only_where_enabled(enable, tmp_path):
    model = RB.Ghost()
    x = torch.randn(2, 8, 9, 9)
    src = export(model, x, tmp_path / "in.onnx")
    proto = repfuse.optimize_onnx(str(src), enable=["ghost_concat"] if enable else [])
    check_numbers(model, src, proto, x)
    assert sum(n.op_type == "Concat" for n in proto.graph.node) == (0 if enable else 1)
    assert ((12, 1, 3, 3) in weight_shapes(proto)) == enable  # two outputs per channel
