"""Ghost modules one after another (the fuzzer's seed 91): the consumer that one Ghost rewrite replaces
is the next Ghost's source.  Every IR must read the rewritten value, stay exact and drop both concats."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import repfuse
from blocks import op_counts
from rewrite_blocks import Ghost


class TwoGhosts(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = Ghost(8, 6, 10)
        self.second = Ghost(10, 5, 7)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


class GhostIntoGhost(nn.Module):
    """The first Ghost's consumer conv *is* the second Ghost's primary conv (no activation anywhere)."""

    def __init__(self):
        super().__init__()
        self.first = Ghost(8, 6, 10)
        self.second = Ghost(8, 10, 7)  # its cheap and consumer convs only

    def forward(self, x):
        y = self.first.primary(x)
        y2 = self.first.consumer(torch.cat([y, self.first.cheap(y)], 1))
        return self.second.consumer(torch.cat([y2, self.second.cheap(y2)], 1))


MODELS = {"two-ghosts": TwoGhosts, "ghost-into-ghost": GhostIntoGhost}
SHAPE = (2, 8, 9, 9)


def close(out, ref):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


@pytest.fixture(params=list(MODELS))
def model(request):
    torch.manual_seed(0)
    return MODELS[request.param]().eval()


def test_fx(model):
    x = torch.randn(SHAPE)
    gm = repfuse.deploy(model, (x,), enable=["ghost_concat"])
    with torch.no_grad():
        close(gm(x), model(x))
    assert op_counts(gm)["cat"] == 0 and op_counts(gm)["batch_norm"] == 0


def test_onnx(model, tmp_path):
    x = torch.randn(SHAPE)
    path = tmp_path / "m.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"])
        ref = model(x).numpy()
    out_model = repfuse.optimize_onnx(str(path), enable=["ghost_concat"])
    onnx.checker.check_model(out_model)
    assert not any(n.op_type in ("Concat", "BatchNormalization") for n in out_model.graph.node)
    sess = ort.InferenceSession(out_model.SerializeToString(), providers=["CPUExecutionProvider"])
    close(sess.run(None, {"x": x.numpy()})[0], ref)


def test_tvm(model):
    tvm = pytest.importorskip("tvm")
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from repfuse.backends.tvm import RepFuse

    x = torch.randn(SHAPE)
    with torch.no_grad():
        mod = from_exported_program(torch.export.export(model, (x,)))
        ref = model(x).numpy()
    fused = RepFuse(enable=["ghost_concat"])(mod)
    found = []
    relax.analysis.post_order_visit(fused["main"], lambda e: found.append(e.op.name) if isinstance(
        e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    assert "relax.concat" not in found and "relax.nn.batch_norm" not in found
    vm = relax.VirtualMachine(tvm.compile(fused, target="llvm"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    close((out if hasattr(out, "numpy") else out[0]).numpy(), ref)
