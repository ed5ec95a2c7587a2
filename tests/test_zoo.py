"""Every zoo network on every path: the paper's reference and repfuse's three paths equal the training form.

Wherever the paper defines a deploy form, repfuse must reach the conv count
the reference runs (convs and linears executed in one forward pass); the
rewrite families (dynamic-conv aggregation, dead channels, weight slicing)
must also reach the reference's conv weight shapes.
"""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import repfuse
from blocks import op_counts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from zoo import NETWORKS  # noqa: E402
from zoo.common import count_conv_calls  # noqa: E402

warnings.filterwarnings("ignore")

SIZE = 64  # small inputs keep the suite fast; the zoo's own checks also run 224


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            net = NETWORKS[name]
            torch.manual_seed(0)
            model = net.build()
            x = torch.randn(2, 3, SIZE, SIZE)
            with torch.no_grad():
                y = model(x)
            cache[name] = (net, model, x, y)
        return cache[name]

    return get


def close(out, ref):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(out - ref).max()


def check_convs(net, model, x, before: int, after: int):
    """Equal to the conv count the reference runs; without a reference, never more convs."""
    if net.to_deploy is not None:
        with torch.no_grad():
            assert after == count_conv_calls(net.to_deploy(model), x)
    else:
        assert after <= before


def reference_conv_shapes(net, model) -> list[tuple]:
    with torch.no_grad():
        return sorted(tuple(m.weight.shape) for m in net.to_deploy(model).modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("name", list(NETWORKS))
def test_reference_matches_training_form(name, built):
    net, model, x, y = built(name)
    assert float(y.abs().max()) < 1e4 and float((y[0] - y[1]).abs().max()) > 1e-4  # signal survives depth
    if net.to_deploy is None:
        pytest.skip(f"{name}: the paper defines no separate deploy form")
    with torch.no_grad():
        reference = net.to_deploy(model).eval()
        close(reference(x), y)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_fx_path(name, built):
    net, model, x, y = built(name)
    gm = repfuse.deploy(model, (x,))
    with torch.no_grad():
        close(gm(x), y)
    ops = op_counts(gm)
    n = ops["conv2d"] + ops["linear"]
    check_convs(net, model, x, gm.meta["repfuse_report"].before.convs, n)
    if net.name in ("pruned-resnet", "nas-supernet"):  # channels removed / weights sliced as in the reference
        assert sorted(tuple(p.shape) for _, p in gm.named_parameters() if p.dim() == 4) == \
            reference_conv_shapes(net, model)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_onnx_path(name, built, tmp_path):
    import onnx
    import onnxruntime as ort

    net, model, x, y = built(name)
    src = tmp_path / f"{name}.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(src), dynamo=False, input_names=["x"])
    proto = repfuse.optimize_onnx(str(src))
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    close(session.run(None, {"x": x.numpy()})[0], y.numpy())
    n = sum(node.op_type in ("Conv", "Gemm") for node in proto.graph.node)
    check_convs(net, model, x, sum(node.op_type in ("Conv", "Gemm", "MatMul") for node in onnx.load(str(src)).graph.node), n)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_tvm_path(name, built):
    tvm = pytest.importorskip("tvm")
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from repfuse.backends.tvm import RepFuse

    net, model, x, y = built(name)
    x1 = x[:1]
    with torch.no_grad():
        y1 = model(x1)
        try:
            mod = from_exported_program(torch.export.export(model, (x1,)), keep_params_as_input=False)
        except Exception as e:  # TVM's frontend, not repfuse: report which op it lacks
            pytest.skip(f"TVM's torch frontend cannot import {name}: {str(e).splitlines()[0][:200]}")
    fused = RepFuse()(mod)
    count = lambda m: m["main"].script().count("R.nn.conv2d(") + m["main"].script().count("R.matmul(")  # noqa: E731
    check_convs(net, model, x1, count(mod), count(fused))
    vm = relax.VirtualMachine(tvm.compile(fused, target="llvm"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x1.numpy()))[0].numpy()
    close(out, y1.numpy())
