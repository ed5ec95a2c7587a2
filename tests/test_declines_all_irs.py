"""Every must-not-fire case on all three IRs: the rule leaves the graph alone, and the report names the
rule and the reason (one rule, written once, says the same thing whichever IR it reads).

Each case is one torch module; FX gets it through repfuse.deploy, ONNX through the TorchScript exporter
and repfuse's ONNX pipeline, Relax through torch.export and TVM's frontend.  Numbers are compared with
the unfused model on every IR.
"""

import contextlib
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blocks as B  # noqa: E402

import repfuse  # noqa: E402

warnings.filterwarnings("ignore")


class BiasedPointwiseThenPadded(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(self.a(x))


class DenseAndDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense, self.dw = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        return self.dense(x) + self.dw(x)


class PoolWithoutPadCount(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return F.avg_pool2d(self.conv(x), 3, 1, 1, count_include_pad=False)


class ReflectPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect"))


class GhostReluOnCheapHalf(nn.Module):
    def __init__(self):
        super().__init__()
        self.primary = nn.Conv2d(8, 6, 1)
        self.cheap = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.consumer = nn.Conv2d(12, 8, 1)

    def forward(self, x):
        y = self.primary(x)  # no ReLU here: relu(G(y)) would clip the intrinsic half
        return self.consumer(torch.cat([y, F.relu(self.cheap(y))], 1))


class DynamicLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.gate = nn.Linear(8, 3)

    def forward(self, x):
        pi = torch.softmax(self.gate(x), 1)
        return sum(pi[:, k:k + 1] * e(x) for k, e in enumerate(self.experts))


CASES = [  # (module, input shape, rule, a phrase of the reason, options)
    (BiasedPointwiseThenPadded, (2, 4, 9, 9), "affine", "border differs", {}),
    (DenseAndDepthwise, (2, 8, 9, 9), "affine", "MACs per input position", {}),
    (PoolWithoutPadCount, (2, 4, 9, 9), "affine", "count_include_pad=False", {}),
    (ReflectPad, (2, 4, 9, 9), "affine", "reflect padding", {}),
    (GhostReluOnCheapHalf, (2, 8, 9, 9), "ghost_concat", "intrinsic half", {"enable": ["ghost_concat"]}),
    (DynamicLinear, (4, 8), "dynamic_conv", "dynamic linear", {}),
]
IDS = [c[0].__name__ for c in CASES]


def make(case):
    cls, shape, *_ = case
    model = B.randomize(cls()).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model, x, model(x).numpy()


def assert_close(out, ref):
    assert out.shape == ref.shape and np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def assert_declined(declines, rule, phrase):
    found = [(d.rule, d.reason) for d in declines]
    assert any(r == rule and phrase in why for r, why in found), found


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fx(case):
    model, x, ref = make(case)
    gm = repfuse.deploy(model, (x,), **case[4])
    with torch.no_grad():
        assert_close(gm(x).numpy(), ref)
    assert_declined(gm.meta["repfuse_report"].declined, case[2], case[3])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_onnx(case):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from repfuse.backends import onnx as pipeline
    from repfuse.patterns.rules import enabled

    model, x, ref = make(case)
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
    fused, report = pipeline.optimize(onnx.load_from_string(buffer.getvalue()),
                                      rules=enabled(enable=case[4].get("enable", ())))
    session = ort.InferenceSession(pipeline.to_proto(fused).SerializeToString(), providers=["CPUExecutionProvider"])
    assert_close(session.run(None, {"x": x.numpy()})[0], ref)
    assert_declined(report.declined, case[2], case[3])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_relax(case):
    tvm = pytest.importorskip("tvm")
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from repfuse.backends.tvm import RepFuse

    model, x, ref = make(case)
    with torch.no_grad():
        mod = from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=False)
    fuse = RepFuse(**case[4])
    fused = fuse(mod)
    vm = relax.VirtualMachine(tvm.compile(fused, target="llvm"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    assert_close((out if hasattr(out, "numpy") else out[0]).numpy(), ref)
    assert_declined(fuse.last_declines, case[2], case[3])


def test_explain_on_every_entry_point(caplog, tmp_path):
    """deploy(explain=True), optimize_onnx(explain=True), RepFuse(explain=True) and the CLI's --explain
    all show the decline with its rule and reason."""
    import logging

    import onnx

    model, x, _ = make(CASES[0])
    src = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(src), dynamo=False, input_names=["x"])
    with caplog.at_level(logging.WARNING, logger="repfuse"):
        repfuse.deploy(model, (x,), explain=True)
        repfuse.optimize_onnx(onnx.load(str(src)), explain=True)
    assert caplog.text.count("affine: the second op pads with zeros where the first op's bias would be") == 2

    from repfuse.backends.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--explain"]) == 0
    assert "affine: the second op pads with zeros" in out.getvalue()
