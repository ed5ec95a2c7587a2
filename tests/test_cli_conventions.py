"""The command line conventions users bring from onnxsim, onnxslim and torch: positional OUT, --version,
`python -m repfuse` the same as the script.  Every run compares IN and OUT in onnxruntime."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import repfuse
from repfuse.backends.cli import main


def conv_bn_relu(path, batch="n"):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.random(4).astype(np.float32) + 0.5, "s"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "m"),
             numpy_helper.from_array(rng.random(4).astype(np.float32) + 0.5, "v")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def same_outputs(a, b, batch=2):
    x = np.random.default_rng(1).standard_normal((batch, 3, 8, 8)).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa
    np.testing.assert_allclose(run(b), run(a), rtol=1e-5, atol=1e-5)


def op_types(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("form", ["positional", "flag", "both-equal"])
def test_out_is_positional_or_a_flag(form, tmp_path):
    src, out = conv_bn_relu(tmp_path / "in.onnx"), tmp_path / "out.onnx"
    argv = {"positional": [str(src), str(out)], "flag": [str(src), "-o", str(out)],
            "both-equal": [str(src), str(out), "-o", str(out)]}[form]
    assert main(["optimize", *argv, "-q"]) == 0
    assert op_types(out) == ["Conv", "Relu"]
    same_outputs(src, out)


def test_two_different_outputs_are_refused(tmp_path, capsys):
    src = conv_bn_relu(tmp_path / "in.onnx")
    assert main(["optimize", str(src), str(tmp_path / "a.onnx"), "-o", str(tmp_path / "b.onnx")]) == 2
    assert "two outputs given" in capsys.readouterr().err
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


def test_missing_out_names_both_forms(tmp_path, capsys):
    src = conv_bn_relu(tmp_path / "in.onnx")
    assert main(["optimize", str(src)]) == 2
    assert "repfuse optimize IN OUT, or -o OUT" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["repfuse"], [sys.executable, "-m", "repfuse"]], ids=["script", "module"])
def test_version_and_module_entry_point(command, tmp_path):
    version = subprocess.run(command + ["--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"repfuse {repfuse.__version__}"
    src, out = conv_bn_relu(tmp_path / "in.onnx"), tmp_path / "out.onnx"
    done = subprocess.run(command + ["optimize", str(src), str(out), "-q"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert op_types(out) == ["Conv", "Relu"]
    same_outputs(src, out)
    usage = subprocess.run(command + ["optimize", "--help"], capture_output=True, text=True, timeout=60)
    assert usage.stdout.startswith("usage: repfuse optimize")  # the same program name either way
