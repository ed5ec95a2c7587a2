"""The ONNX path: both torch exporters, the CLI, dynamic dims, fp16, pass-through and bad input.

Numbers are checked by onnxruntime against the unfused file (`--check`), structure
by counting Conv/Gemm and BatchNormalization nodes in the output.
"""

import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import blocks as B
import repfuse
from repfuse.backends.cli import main

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


def export(model, x, path, dynamo, dynamic=False):
    kwargs = dict(dynamo=dynamo, input_names=["x"], output_names=["y"])
    if dynamic and x.dim() == 4:
        if dynamo:
            dim = torch.export.Dim.DYNAMIC
            kwargs["dynamic_shapes"] = ({0: dim, 2: dim, 3: dim},)
        else:
            kwargs["dynamic_axes"] = {"x": {0: "N", 2: "H", 3: "W"}}
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), **kwargs)
    return path


def ops(path):
    model = onnx.load(str(path))
    return [n.op_type for n in model.graph.node]


def run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


FAMILIES = list(B.CASES)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", FAMILIES)
def test_exported_block_fuses_and_checks(name, dynamo, tmp_path, capsys):
    factory, shape, n_convs, n_bns = B.CASES[name]
    model = B.randomize(factory(), seed=11)
    x = torch.randn(shape)
    src = export(model, x, tmp_path / "in.onnx", dynamo)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--check", "-q"]) == 0
    assert "ok" in capsys.readouterr().out
    found = ops(out)
    assert found.count("Conv") + found.count("Gemm") == n_convs, found
    if n_bns is not None:
        assert found.count("BatchNormalization") == n_bns
    # and against torch itself, not only against the unfused file
    ref = model(x).detach().numpy()
    assert np.abs(run(out, x.numpy()) - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_dynamic_batch_and_spatial_dims_survive(dynamo, tmp_path):
    model = B.randomize(B.RepVGGBlock(8, 8))
    src = export(model, torch.randn(2, 8, 12, 12), tmp_path / "in.onnx", dynamo, dynamic=True)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "-o", str(out), "-q"]) == 0
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField("dim_param") for d in dims] == [True, False, True, True]
    assert ops(out).count("Conv") == 1
    for size in [(1, 8, 7, 7), (3, 8, 16, 10)]:
        x = torch.randn(size)
        ref = model(x).detach().numpy()
        assert np.abs(run(out, x.numpy()) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_fp16_model_is_fused_and_stays_fp16(tmp_path, capsys):
    model = B.randomize(B.DBB(8, 8)).half()
    src = export(model, torch.randn(1, 8, 9, 9).half(), tmp_path / "in.onnx", dynamo=False)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--check", "-q"]) == 0
    fused = onnx.load(str(out))
    assert [n.op_type for n in fused.graph.node] == ["Conv"]
    assert all(i.data_type == TensorProto.FLOAT16 for i in fused.graph.initializer)


def test_python_api_returns_model_proto_and_leaves_input_alone(tmp_path):
    model = B.randomize(B.ACBlock(8, 8))
    src = export(model, torch.randn(1, 8, 9, 9), tmp_path / "in.onnx", dynamo=False)
    before = src.read_bytes()
    proto = repfuse.optimize_onnx(str(src))
    assert isinstance(proto, onnx.ModelProto)
    assert [n.op_type for n in proto.graph.node] == ["Conv"]
    assert src.read_bytes() == before
    again = repfuse.optimize_onnx(onnx.load(str(src)), simplify=False)
    assert [n.op_type for n in again.graph.node] == ["Conv"]


# --- what must pass through untouched


def _conv_bn_graph(extra_nodes, extra_inits=(), opset=17, domains=()):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.random(4).astype(np.float32) + 0.5, "s"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "m"),
             numpy_helper.from_array(rng.random(4).astype(np.float32) + 0.5, "v"), *extra_inits]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]), *extra_nodes]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports, ir_version=9)


def test_avg_pool_without_counted_padding_is_left_alone(tmp_path, capsys):
    model = _conv_bn_graph([
        helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0),
        helper.make_node("Add", ["bn", "p"], ["y"])])
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--check", "--no-simplify", "--explain"]) == 0
    assert "count_include_pad" in capsys.readouterr().out
    assert ops(out) == ["Conv", "AveragePool", "Add"]  # BN folded, pool and add kept


def test_custom_domain_op_passes_through(tmp_path):
    model = _conv_bn_graph([helper.make_node("Relu", ["bn"], ["r"]),
                            helper.make_node("MyOp", ["r"], ["y"], domain="com.example")],
                           domains=["com.example"])
    out = repfuse.optimize_onnx(model, simplify=False)
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu", "MyOp"]
    assert out.graph.node[2].domain == "com.example"
    onnx.checker.check_model(out)


def test_quantized_region_passes_through(tmp_path):
    rng = np.random.default_rng(1)
    qw = rng.integers(-100, 100, (4, 4, 1, 1)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "scale"),
             numpy_helper.from_array(np.array(0, np.int8), "zero"),
             numpy_helper.from_array(qw, "qw"),
             numpy_helper.from_array(np.array(0.01, np.float32), "wscale")]
    model = _conv_bn_graph([
        helper.make_node("QuantizeLinear", ["bn", "scale", "zero"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"]),
        helper.make_node("DequantizeLinear", ["qw", "wscale"], ["dqw"]),
        helper.make_node("Conv", ["dq", "dqw"], ["y"])], inits)
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--check", "-q"]) == 0
    found = ops(out)
    assert found.count("QuantizeLinear") == 1 and found.count("DequantizeLinear") == 2
    assert found[-1] == "Conv"
    onnx.checker.check_model(onnx.load(str(out)))


# --- files


def test_external_data_round_trips(tmp_path, capsys):
    model = B.randomize(B.RepVGGBlock(16, 16))
    src = export(model, torch.randn(1, 16, 8, 8), tmp_path / "in.onnx", dynamo=False)
    proto = onnx.load(str(src))
    ext = tmp_path / "ext.onnx"
    onnx.save(proto, str(ext), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.weights",
              size_threshold=0)
    assert (tmp_path / "ext.weights").exists()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "fused.onnx"
    assert main(["optimize", str(ext), "-o", str(out), "--external-data", "--check", "-q"]) == 0
    assert (out_dir / "fused.onnx.data").exists()
    loaded = onnx.load(str(out))
    assert [n.op_type for n in loaded.graph.node] == ["Conv", "Relu"]
    assert not list(out_dir.glob(".repfuse-*"))  # no temporary files left behind


def test_in_place_needs_the_flag(tmp_path, capsys):
    src = export(B.randomize(B.ConvBN()), torch.randn(1, 4, 6, 6), tmp_path / "m.onnx", dynamo=False)
    before = src.read_bytes()
    assert main(["optimize", str(src), "-o", str(src)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert src.read_bytes() == before
    assert main(["optimize", str(src), "--in-place", "--check", "-q"]) == 0
    assert ops(src) == ["Conv"]


@pytest.mark.parametrize("case", ["truncated", "not_onnx", "missing", "unwritable", "opset_too_new", "no_output"])
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    good = export(B.randomize(B.ConvBN()), torch.randn(1, 4, 6, 6), tmp_path / "good.onnx", dynamo=False)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    args = ["optimize", str(src), "-o", str(out)]
    if case == "truncated":
        src.write_bytes(good.read_bytes()[:200])
    elif case == "not_onnx":
        src.write_text("this is not a model\n")
    elif case == "missing":
        pass
    elif case == "unwritable":
        src.write_bytes(good.read_bytes())
        args[-1] = str(tmp_path / "no" / "such" / "dir" / "out.onnx")
    elif case == "opset_too_new":
        proto = onnx.load(str(good))
        proto.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
        src.write_bytes(proto.SerializeToString())
    elif case == "no_output":
        src.write_bytes(good.read_bytes())
        args = ["optimize", str(src)]
    before = src.read_bytes() if src.exists() else None
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("repfuse: error:"), err
    assert "Traceback" not in err[0]
    assert not out.exists()
    assert (src.read_bytes() if src.exists() else None) == before


def test_cli_help_has_examples():
    import subprocess
    import sys

    text = subprocess.run([sys.executable, "-m", "repfuse", "optimize", "--help"], capture_output=True, text=True,
                          check=True).stdout
    assert "--check" in text and "examples:" in text and "repfuse optimize model.onnx -o" in text


def test_report_json(tmp_path):
    import json

    src = export(B.randomize(B.RepVGGBlock(8, 8)), torch.randn(1, 8, 9, 9), tmp_path / "in.onnx", dynamo=False)
    report = tmp_path / "r.json"
    assert main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--report", str(report), "-q"]) == 0
    data = json.loads(report.read_text())
    assert data["before"]["convs"] == 2 and data["after"]["convs"] == 1
    assert data["file_bytes"][1] < data["file_bytes"][0]
    assert os.path.basename(data["output"]) == "o.onnx"


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("name", ["repvgg", "dbb_bn_and_pad"])
def test_older_opsets(name, opset, tmp_path, capsys):
    factory, shape, n_convs, _ = B.CASES[name]
    model = B.randomize(factory(), seed=5)
    src = tmp_path / "in.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.randn(shape),), str(src), dynamo=False, opset_version=opset)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--check", "-q"]) == 0
    assert ops(out).count("Conv") == n_convs
    assert onnx.load(str(out)).opset_import[0].version == opset


def test_opset_older_than_11_is_converted(tmp_path, capsys):
    proto = _conv_bn_graph([helper.make_node("Relu", ["bn"], ["y"])], opset=9)
    src, out = tmp_path / "old.onnx", tmp_path / "o.onnx"
    onnx.save(proto, str(src))
    assert main(["optimize", str(src), "-o", str(out)]) == 0
    assert "converted from opset 9 to 11 with onnx.version_converter" in capsys.readouterr().err
    assert ops(out) == ["Conv", "Relu"]
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(str(out), x), run(str(src), x), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="converted from opset 9"):
        assert [n.op_type for n in repfuse.optimize_onnx(proto).graph.node] == ["Conv", "Relu"]


def test_opset_the_converter_cannot_take_is_refused_in_one_line(tmp_path, capsys):
    rng = np.random.default_rng(0)  # a GRU at opset 3: the converter has no adapter for it
    weights = [numpy_helper.from_array(rng.standard_normal((1, 12, 4)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.standard_normal((1, 12, 4)).astype(np.float32), "r")]
    graph = helper.make_graph([helper.make_node("GRU", ["x", "w", "r"], ["y"], hidden_size=4)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)
    src, out = tmp_path / "old.onnx", tmp_path / "o.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 3)], ir_version=7), str(src))
    assert main(["optimize", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "uses opset 3; onnx.version_converter could not convert it to 11" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("auto_pad,stride", [("SAME_UPPER", 1), ("SAME_LOWER", 1), ("SAME_UPPER", 2), ("VALID", 1)])
def test_conv_auto_pad(auto_pad, stride, tmp_path):
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 4, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.random(4).astype(np.float32) + 0.5, "s"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "m"),
             numpy_helper.from_array(rng.random(4).astype(np.float32) + 0.5, "v")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], auto_pad=auto_pad, strides=[stride, stride]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    src = tmp_path / "in.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(src))
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--check", "-q", "--no-simplify"]) == 0
    assert ops(out) == ["Conv"]


def test_onnx_path_does_not_import_torch(tmp_path):
    """`repfuse optimize` (onnxsim, fusing, --check) never imports torch: +1 s a run when it is installed."""
    import subprocess
    import sys

    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_conv_bn_graph([helper.make_node("Relu", ["bn"], ["y"])]), str(src))
    code = ("import sys\nfrom repfuse.backends.cli import main\n"
            f"rc = main(['optimize', {str(src)!r}, '-o', {str(out)!r}, '--check'])\n"
            "print('exit', rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "exit 0 False", done.stdout + done.stderr
    fused = onnx.load(str(out))
    assert [n.op_type for n in fused.graph.node] == ["Conv", "Relu"]  # the BatchNorm went into the conv
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(str(out), x), run(str(src), x), rtol=1e-5, atol=1e-5)
