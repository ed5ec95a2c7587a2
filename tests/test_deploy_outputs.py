"""What users do with a deployed model: save it, export it, and get told when tracing fails."""

import io

import pytest
import torch

import blocks as B
import repfuse


@pytest.fixture(scope="module")
def deployed():
    model = B.randomize(B.TinyRepNet())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    return repfuse.deploy(model, (x,)), x, ref


def close(a, b):
    assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()


def test_torch_save_and_load(deployed):
    gm, x, ref = deployed
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        close(loaded(x), ref)


def test_torch_export(deployed):
    gm, x, ref = deployed
    ep = torch.export.export(gm, (x,))
    with torch.no_grad():
        close(ep.module()(x), ref)


def test_torch_onnx_export(deployed, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    gm, x, ref = deployed
    path = tmp_path / "deployed.onnx"
    torch.onnx.export(gm, (x,), str(path), dynamo=False, input_names=["x"])
    model = onnx.load(str(path))
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 6
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    close(torch.from_numpy(out), ref)


def test_untraceable_model_names_the_line():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.conv(x)
            if y.sum().item() > 0:  # data-dependent control flow
                return y * 2
            return y

    with pytest.raises(repfuse.TraceError) as info:
        repfuse.deploy(DataDependent(), (torch.randn(1, 3, 4, 4),))
    message = str(info.value)
    assert "DataDependent" in message
    assert "test_deploy_outputs.py" in message and "line" in message
