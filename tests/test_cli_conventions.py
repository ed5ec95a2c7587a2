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
from repfuse.patterns.rules import RULES


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


def chain(path, blocks):
    """`blocks` RepVGG-style blocks (3x3-BN + 1x1-BN + BN identity, then Relu): 8 nodes each."""
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"

    def const(name, array):
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def bn(name, src):
        params = [const(f"{name}.{p}", v) for p, v in (("s", rng.random(4) + 0.5), ("b", rng.standard_normal(4)),
                                                       ("m", rng.standard_normal(4)), ("v", rng.random(4) + 0.5))]
        nodes.append(helper.make_node("BatchNormalization", [src] + params, [name]))
        return name

    for i in range(blocks):
        nodes.append(helper.make_node("Conv", [x, const(f"w3_{i}", rng.standard_normal((4, 4, 3, 3)) * 0.3)],
                                      [f"c3_{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Conv", [x, const(f"w1_{i}", rng.standard_normal((4, 4, 1, 1)) * 0.3)],
                                      [f"c1_{i}"]))
        a, b, c = bn(f"bn3_{i}", f"c3_{i}"), bn(f"bn1_{i}", f"c1_{i}"), bn(f"bnid_{i}", x)
        nodes += [helper.make_node("Add", [a, b], [f"s1_{i}"]), helper.make_node("Add", [f"s1_{i}", c], [f"s2_{i}"]),
                  helper.make_node("Relu", [f"s2_{i}"], [f"y{i}"])]
        x = f"y{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def test_default_output_is_compact_on_a_large_model(tmp_path, capsys):
    src, out = chain(tmp_path / "in.onnx", 250), tmp_path / "out.onnx"  # 2,001 nodes
    assert main(["optimize", str(src), str(out), "--no-simplify"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 20, "\n".join(lines)
    assert any(line.startswith("regions fused: 250") for line in lines)
    assert op_types(out).count("Conv") == 250 and "BatchNormalization" not in op_types(out)
    x = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa
    np.testing.assert_allclose(run(out), run(src), rtol=1e-4, atol=1e-4 * float(np.abs(run(src)).max()))
    assert main(["optimize", str(src), str(out), "--no-simplify", "--verbose"]) == 0
    assert len(capsys.readouterr().out.splitlines()) > 250  # a row per fused region


def test_report_has_an_onnxsim_row(tmp_path):
    import json

    src, out, report = conv_bn_relu(tmp_path / "in.onnx"), tmp_path / "out.onnx", tmp_path / "r.json"
    assert main(["optimize", str(src), str(out), "--report", str(report), "-q"]) == 0
    rules = json.loads(report.read_text())["rules"]
    assert rules[0]["name"] == "onnxsim" and rules[0]["enabled"] and "ops" in rules[0]["detail"]
    assert [r["name"] for r in rules[1:]] == [r.name for r in RULES]
    assert main(["optimize", str(src), str(out), "--report", str(report), "--no-simplify", "-q"]) == 0
    assert not json.loads(report.read_text())["rules"][0]["enabled"]
    same_outputs(src, out)


def input_dims(path):
    return [[d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in onnx.load(str(path)).graph.input]


@pytest.mark.parametrize("check", [False, True])
def test_input_shape_is_fixed_in_the_output(check, tmp_path):
    src, out = conv_bn_relu(tmp_path / "in.onnx"), tmp_path / "out.onnx"
    assert main(["optimize", str(src), str(out), "--input-shape", "x:3,3,8,8", "-q"] + ["--check"] * check) == 0
    assert input_dims(out) == [[3, 3, 8, 8]] and input_dims(src) == [["n", 3, 8, 8]]
    same_outputs(src, out, batch=3)


@pytest.mark.parametrize("spec, message", [
    ("x:1,3,8", "gives 3 dims; the input has rank 4"),
    ("x:1,4,8,8", "dim 1 is 4, but the model fixes it at 3"),
    ("y:1,3,8,8", "names unknown inputs: y"),
    ("x:1,-3,8,8", "expected NAME:D1,D2,... with positive sizes"),
])
def test_input_shape_is_validated_in_one_line(spec, message, tmp_path, capsys):
    src, out = conv_bn_relu(tmp_path / "in.onnx"), tmp_path / "out.onnx"
    assert main(["optimize", str(src), str(out), "--input-shape", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_check_runs_several_input_sets_and_reports_them(tmp_path, capsys):
    import json

    src, out, report = conv_bn_relu(tmp_path / "in.onnx"), tmp_path / "out.onnx", tmp_path / "r.json"
    assert main(["optimize", str(src), str(out), "--check", "--check-runs", "3", "--report", str(report)]) == 0
    assert "3 input sets) ok" in capsys.readouterr().out
    rows = json.loads(report.read_text())["check"]
    assert [r["output"] for r in rows] == ["y"] and rows[0]["ok"] and rows[0]["max_abs_error"] <= rows[0]["tolerance"]
    same_outputs(src, out)


def test_check_input_from_npy(tmp_path, capsys):
    src, out = conv_bn_relu(tmp_path / "in.onnx"), tmp_path / "out.onnx"
    x = np.random.default_rng(5).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["optimize", str(src), str(out), "--check", "--check-input", f"x={tmp_path / 'x.npy'}"]) == 0
    assert "check y:" in capsys.readouterr().out
    same_outputs(src, out, batch=5)
    assert main(["optimize", str(src), str(out), "--check", "--check-input", f"z={tmp_path / 'x.npy'}"]) == 2
    assert "--check-input names unknown inputs: z" in capsys.readouterr().err
    assert main(["optimize", str(src), str(out), "--check", "--check-input", f"x={tmp_path / 'missing.npy'}"]) == 2
    assert "--check-input x: cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--check-runs", "2"], "add --check"),
    (["--check", "--check-runs", "0"], "--check-runs must be 1 or more"),
    (["--check", "--rtol", "-1"], "not negative"),
])
def test_check_options_are_validated(argv, message, tmp_path, capsys):
    src, out = conv_bn_relu(tmp_path / "in.onnx"), tmp_path / "out.onnx"
    assert main(["optimize", str(src), str(out), *argv]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_input_the_check_cannot_generate_is_a_skip_with_its_reason(tmp_path, capsys):
    # a string input beside the image: onnxruntime runs it, the check cannot invent strings
    model = onnx.load(str(conv_bn_relu(tmp_path / "base.onnx")))
    model.graph.input.append(helper.make_tensor_value_info("tag", TensorProto.STRING, [1]))
    model.graph.node.append(helper.make_node("Identity", ["tag"], ["tag_out"]))
    model.graph.output.append(helper.make_tensor_value_info("tag_out", TensorProto.STRING, [1]))
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    assert main(["optimize", str(src), str(out), "--check"]) == 0
    text = capsys.readouterr().out
    assert "check skipped: input tag has type tensor(string), which the check cannot generate" in text
    assert "Conv" in op_types(out) and "BatchNormalization" not in op_types(out)


def test_tolerance_follows_the_models_own_noise():
    from repfuse.backends.onnx import compare

    ref, out = [np.array([1.0, -2.0, 1000.0])], [np.array([1.0, -2.0, 1000.5])]
    assert not compare(["y"], ref, out)[0]["ok"]  # 0.5 > 1e-4 * 1000
    assert compare(["y"], ref, out, noise=[0.06])[0]["ok"]  # 10x the input model's own spread
    assert compare(["y"], ref, out, rtol=1e-3)[0]["ok"]
    assert compare(["y"], ref, out, atol=0.5)[0]["ok"]
    assert compare(["y"], [np.array([np.nan, 1.0])], [np.array([np.nan, 1.0])])[0]["ok"]  # NaN where IN has NaN
    assert not compare(["y"], [np.array([0.0, 1.0])], [np.array([np.nan, 1.0])])[0]["ok"]


def test_python_api_gives_the_cli_report_and_check(tmp_path):
    import json

    src, out, report = conv_bn_relu(tmp_path / "in.onnx"), tmp_path / "out.onnx", tmp_path / "r.json"
    assert main(["optimize", str(src), str(out), "--check", "--report", str(report), "-q"]) == 0
    from_cli = json.loads(report.read_text())
    proto, from_api = repfuse.optimize_onnx(str(src), check=True, report=True)
    assert set(from_api) == set(from_cli)  # one schema
    assert [r["name"] for r in from_api["rules"]] == [r["name"] for r in from_cli["rules"]]
    assert from_api["check"][0]["ok"] and from_api["after"]["convs"] == from_cli["after"]["convs"] == 1
    onnx.save(proto, str(tmp_path / "api.onnx"))
    same_outputs(src, tmp_path / "api.onnx")
    # a ModelProto, fixed dims, one rule name as a string
    proto, data = repfuse.optimize_onnx(onnx.load(str(src)), report=True, input_shapes={"x": [4, 3, 8, 8]},
                                        disable="affine", check=True)
    assert data["rules"][2] == {"name": "affine", "enabled": False, "applied": 0, "detail": ""}
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [4, 3, 8, 8]


def test_python_api_check_failure_raises_with_the_report(tmp_path, monkeypatch):
    from repfuse.backends import onnx as pipeline

    real = pipeline.compare
    monkeypatch.setattr(pipeline, "compare", lambda n, r, c, *t: real(n, r, [x + 1 for x in c], *t))
    with pytest.raises(repfuse.CheckFailed, match="outputs differ: y") as failed:
        repfuse.optimize_onnx(str(conv_bn_relu(tmp_path / "in.onnx")), check=True)
    assert failed.value.report["check"][0]["ok"] is False


def test_stale_onnxsim_metadata_is_not_copied(tmp_path):
    model = onnx.load(str(conv_bn_relu(tmp_path / "in.onnx")))
    model.metadata_props.add(key="onnxsim.version", value="0.4.0")
    model.metadata_props.add(key="author", value="me")
    keys = {p.key for p in repfuse.optimize_onnx(model).metadata_props}
    assert "onnxsim.version" not in keys and "author" in keys


@pytest.mark.parametrize("tty", [True, False])
def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_log(tty, capsys):
    from repfuse.backends.cli import Progress

    progress = Progress(enabled=True)
    progress.tty = tty
    for done in range(1, 41):
        progress("fusing", done, 40)
    progress.stage("writing out.onnx")
    err = capsys.readouterr().err
    if tty:  # tqdm's bar: redrawn in place, cleared when done
        assert "\r" in err and "fusing" in err and "region" in err
    else:  # one line per tenth, nothing redrawn
        assert "\r" not in err and err.count("fusing: ") == 11 and "fusing: 40/40" in err  # tenths 0..10
    assert "writing out.onnx" in err


def test_input_size_counts_the_data_files_the_model_uses(tmp_path, capsys):
    import json

    src = conv_bn_relu(tmp_path / "plain.onnx")
    model = onnx.load(str(src))
    ext = tmp_path / "ext.onnx"
    onnx.save(model, str(ext), save_as_external_data=True, location="weights.bin", size_threshold=0)
    (tmp_path / "ext_unrelated.data").write_bytes(b"x" * 100_000)  # beside it, but not the model's
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main(["optimize", str(ext), str(out), "--report", str(report), "-q"]) == 0
    used = ext.stat().st_size + (tmp_path / "weights.bin").stat().st_size
    assert json.loads(report.read_text())["file_bytes"][0] == used
    same_outputs(src, out)


def test_compile_checks_its_input_before_importing_tvm(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    code = ("import sys\nfrom repfuse.backends.cli import main\n"
            f"rc = main(['compile', {str(bad)!r}, {str(tmp_path / 'out.so')!r}])\n"
            "print('exit', rc, 'tvm' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "exit 2 False", done.stdout + done.stderr
    assert "not a readable ONNX model" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_check_of_many_outputs_stays_compact(tmp_path, capsys):
    model = onnx.load(str(conv_bn_relu(tmp_path / "base.onnx")))
    for i in range(8):  # eight more outputs, each a Relu of a Conv+BN branch
        model.graph.node.append(helper.make_node("Relu", ["bn"], [f"y{i}"]))
        model.graph.output.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["n", 4, 8, 8]))
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    assert main(["optimize", str(src), str(out), "--check"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 20, "\n".join(lines)
    assert any(line.startswith("check: 9 of 9 outputs ok") for line in lines)
    assert main(["optimize", str(src), str(out), "--check", "--verbose"]) == 0
    assert sum(line.startswith("check y") for line in capsys.readouterr().out.splitlines()) == 9
    same_outputs(src, out)
