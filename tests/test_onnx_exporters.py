"""What torch's ONNX exporters write by default, whichever exporter and options: every BatchNorm folds
and the numbers match onnxruntime on the exported (unfused) model."""

import contextlib
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from repfuse.backends import onnx as pipeline

import blocks as B


class Net(nn.Module):
    """conv-BN-ReLU, a residual RepVGG-style sum of a 3x3 and a 1x1 conv-BN, a BN identity, and a head."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.k3(x) + self.k1(x) + self.identity(x))
        return self.head(x.mean((2, 3)))


EXPORTS = {
    "torchscript": dict(dynamo=False),
    "torchscript-dynamic-batch": dict(dynamo=False, dynamic_axes={"x": {0: "batch"}}),
    "dynamo": dict(dynamo=True),
    "dynamo-unoptimized": dict(dynamo=True, optimize=False),
    "dynamo-dynamic": dict(dynamo=True, dynamic_shapes=({0: "batch", 2: "h", 3: "w"},)),
}


def export(model, x, options) -> onnx.ModelProto:
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if options.get("dynamo"):
            return torch.onnx.export(model, (x,), input_names=["x"], verbose=False, **options).model_proto
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, input_names=["x"], **options)
        return onnx.load_from_string(buf.getvalue())


def run(proto, x):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("simplify", [True, False], ids=["onnxsim", "no-onnxsim"])
@pytest.mark.parametrize("exporter", list(EXPORTS))
def test_every_exporter_dialect_fuses(exporter, simplify):
    model = B.randomize(Net()).eval()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    exported = export(model, x, EXPORTS[exporter])
    fused, report = pipeline.optimize(exported, simplify_first=simplify)
    fused = pipeline.to_proto(fused)
    kinds = [n.op_type for n in fused.graph.node]
    assert "BatchNormalization" not in kinds and kinds.count("Conv") == 2, kinds
    assert "CastLike" not in kinds and "Expand" not in kinds  # the dynamo exporter's zero bias is a constant
    xs = [x.numpy()] + ([np.random.default_rng(1).standard_normal((3, 3, 12, 12), dtype=np.float32)]
                        if "dynamic" in exporter else [])
    for feed in xs:
        np.testing.assert_allclose(run(fused, feed), run(exported, feed), rtol=1e-5, atol=1e-5)


class OuterWeight(nn.Module):
    """OREPA's generated kernel: an outer product of parameters, 64x its inputs' size."""

    def __init__(self, c=96):
        super().__init__()
        self.a, self.k = nn.Parameter(torch.randn(c, c)), nn.Parameter(torch.randn(3, 3))
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(nn.functional.conv2d(x, torch.einsum("oi,hw->oihw", self.a, self.k), padding=1))


class BroadcastBias(nn.Module):
    """A small constant expanded to the activation's full size before an Add: not a weight, kept small."""

    def forward(self, x):
        return x + torch.ones(1, 1, 1, 1).expand(1, 96, 64, 64)


def test_a_generated_weight_folds_however_large_and_a_broadcast_stays():
    model = B.randomize(OuterWeight()).eval()
    x = torch.randn(1, 96, 8, 8, generator=torch.Generator().manual_seed(0))
    exported = export(model, x, EXPORTS["dynamo"])
    fused = pipeline.to_proto(pipeline.optimize(exported, simplify_first=False)[0])
    assert [n.op_type for n in fused.graph.node] == ["Conv"]
    np.testing.assert_allclose(run(fused, x.numpy()), run(exported, x.numpy()), rtol=1e-4, atol=1e-4)
    y = torch.randn(1, 96, 64, 64)
    exported = export(BroadcastBias().eval(), y, EXPORTS["torchscript"])
    fused = pipeline.to_proto(pipeline.optimize(exported, simplify_first=False)[0])
    big = [t for t in fused.graph.initializer if np.prod(t.dims) >= 96 * 64 * 64]
    assert not big  # the expanded constant (1.5 MB) is not stored
    np.testing.assert_allclose(run(fused, y.numpy()), run(exported, y.numpy()))
