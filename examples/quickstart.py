"""Quickstart: one training-form network through every repfuse entry point.

    python examples/quickstart.py            # 224x224 input, all steps
    python examples/quickstart.py --small    # 32x32 input (what the tests run)

A small RepVGG / ACNet-style network in its training form (parallel conv-BN
branches, BN identities) goes through
  1. torch.compile(model, backend="repfuse")   fused, then inductor
  2. repfuse.deploy(model, example)            a fused torch.fx.GraphModule
  3. torch.onnx.export + `repfuse optimize --check`
  4. tvm.compile(..., relax_pipeline="repfuse")
and each step prints what changed and how far its outputs are from the
training form.  Steps whose optional dependency is missing are skipped with a
note saying which extra to install.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import repfuse


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepBlock(nn.Module):
    """RepVGG block: 3x3-BN + 1x1-BN (+ BN identity) -> ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.k3 = conv_bn(cin, cout, 3, stride, 1)
        self.k1 = conv_bn(cin, cout, 1, stride, 0)
        self.id = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.k3(x) + self.k1(x)
        return F.relu(y + self.id(x) if self.id is not None else y)


class ACBlock(nn.Module):
    """ACNet block: 3x3 + 1x3 + 3x1 conv-BN branches -> ReLU."""

    def __init__(self, c):
        super().__init__()
        self.sq, self.h, self.v = conv_bn(c, c, 3, 1, 1), conv_bn(c, c, (1, 3), 1, (0, 1)), conv_bn(c, c, (3, 1), 1, (1, 0))

    def forward(self, x):
        return F.relu(self.sq(x) + self.h(x) + self.v(x))


class TrainingFormNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(RepBlock(3, 32, 2), RepBlock(32, 32), RepBlock(32, 64, 2), ACBlock(64),
                                      RepBlock(64, 64), RepBlock(64, 128, 2), RepBlock(128, 128))
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.3, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.5, generator=g)
    return model.eval()


def rel_err(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return ((a - b).abs().max() / b.abs().max()).item()


def step(title):
    print(f"\n== {title}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="32x32 input instead of 224x224")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile step (inductor is slow to start)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # exporter notices, not ours
    warnings.filterwarnings("ignore", category=FutureWarning)
    size = 32 if args.small else 224
    torch.manual_seed(0)
    model = randomize_bn(TrainingFormNet())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = model(x)

    if not args.no_compile:
        step('torch.compile(model, backend="repfuse")')
        t = time.perf_counter()
        compiled = torch.compile(model, backend="repfuse")
        with torch.no_grad():
            out = compiled(x)
        print(f"first call (compile) {time.perf_counter() - t:.1f} s; "
              f"max relative error vs training form {rel_err(out, reference):.2e}")

    step("repfuse.deploy(model, (x,))")
    t = time.perf_counter()
    deployed = repfuse.deploy(model, (x,))
    print(f"took {time.perf_counter() - t:.2f} s")
    print(deployed.meta["repfuse_report"])
    with torch.no_grad():
        print(f"max relative error, deploy vs training form: {rel_err(deployed(x), reference):.2e}")

    with tempfile.TemporaryDirectory() as tmp:
        onnx_in, onnx_out = Path(tmp) / "train.onnx", Path(tmp) / "deploy.onnx"
        if importlib.util.find_spec("onnx_ir") and importlib.util.find_spec("onnxruntime"):
            step("ONNX: torch.onnx.export, then `repfuse optimize IN OUT --check`")
            from repfuse.backends.cli import main as cli

            with torch.no_grad():
                torch.onnx.export(model, (x,), str(onnx_in), dynamo=False, input_names=["x"],
                                  dynamic_axes={"x": {0: "N"}})
            status = cli(["optimize", str(onnx_in), str(onnx_out), "--check"])
            print(f"repfuse optimize exit code {status}")
        else:
            step("ONNX: skipped (pip install 'repfuse[onnx]')")

        if importlib.util.find_spec("tvm"):
            step('TVM: tvm.compile(mod, "llvm", relax_pipeline="repfuse")')
            import tvm
            from tvm import relax
            from tvm.relax.frontend.torch import from_exported_program

            from repfuse.backends.tvm import RepFuse  # importing it registers the "repfuse" pipeline

            with torch.no_grad():
                mod = from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=False)
            t = time.perf_counter()
            fused = RepFuse()(mod)
            convs = [s.count("R.nn.conv2d(") for s in (mod["main"].script(), fused["main"].script())]
            vm = relax.VirtualMachine(tvm.compile(mod, target="llvm", relax_pipeline="repfuse"), tvm.cpu())
            out = vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
            print(f"conv2d calls {convs[0]} -> {convs[1]}; built in {time.perf_counter() - t:.1f} s; "
                  f"max relative error vs training form {rel_err(out, reference):.2e}")
        else:
            step("TVM: skipped (pip install 'repfuse[tvm]')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
