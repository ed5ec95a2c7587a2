"""Tokens [B, N, C] on every IR: LeViT's Linear -> flatten(0, 1) -> BatchNorm1d -> reshape -> Linear ->
LayerScale is one linear over C (the layout's channel axis is last), exact against the unfused model; a
BatchNorm1d over the token axis is not a channel affine and stays."""

import io
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blocks as B  # noqa: E402
from test_fx_golden import Tokens  # noqa: E402

warnings.filterwarnings("ignore")


def model_and_input(bn_over_tokens=False):
    model = B.randomize(Tokens(bn_over_tokens)).eval()
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model, x, model(x).numpy()


def assert_close(out, ref):
    assert out.shape == ref.shape and np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("bn_over_tokens", [False, True], ids=["bn-over-channels", "bn-over-tokens"])
def test_onnx(bn_over_tokens):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from repfuse.backends import onnx as pipeline

    model, x, ref = model_and_input(bn_over_tokens)
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
    fused, report = pipeline.optimize(onnx.load_from_string(buffer.getvalue()))
    session = ort.InferenceSession(pipeline.to_proto(fused).SerializeToString(), providers=["CPUExecutionProvider"])
    assert_close(session.run(None, {"x": x.numpy()})[0], ref)
    ops = Counter(n.op_type for n in fused.graph)
    if bn_over_tokens:
        assert ops["BatchNormalization"] == 1
    else:
        assert ops["BatchNormalization"] == 0 and ops["MatMul"] + ops["Gemm"] == 1 and ops["Mul"] == 0


@pytest.mark.parametrize("bn_over_tokens", [False, True], ids=["bn-over-channels", "bn-over-tokens"])
def test_relax(bn_over_tokens):
    tvm = pytest.importorskip("tvm")
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from repfuse.backends.tvm import RepFuse

    model, x, ref = model_and_input(bn_over_tokens)
    with torch.no_grad():
        mod = from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=False)
    fused = RepFuse()(mod)
    vm = relax.VirtualMachine(tvm.compile(fused, target="llvm"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    assert_close((out if hasattr(out, "numpy") else out[0]).numpy(), ref)
    ops = Counter()
    relax.analysis.post_order_visit(fused["main"], lambda e: ops.update([e.op.name]) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) else None)
    if bn_over_tokens:
        assert ops["relax.nn.batch_norm"] == 1
    else:
        assert ops["relax.nn.batch_norm"] == 0 and ops["relax.matmul"] == 1 and ops["relax.multiply"] == 0


def test_one_linear_and_views_is_left_as_written():
    """A region of one op plus reshapes (a lone token linear, which TVM writes as reshape, matmul, reshape)
    saves nothing: the planner must not rewrite it, or it would be written again every round."""
    import repfuse

    class LoneLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 16)

        def forward(self, x):
            return self.fc(x).flatten(0, 1)

    model, x = LoneLinear().eval(), torch.randn(3, 5, 8)
    gm = repfuse.deploy(model, (x,))
    with torch.no_grad():
        assert_close(gm(x).numpy(), model(x).numpy())
    affine = next(r for r in gm.meta["repfuse_report"].rules if r.name == "affine")
    assert affine.applied == 0 and not gm.meta["repfuse_report"].regions
