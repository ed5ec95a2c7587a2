"""Quickstart: a training-form network to its deployment form with repfuse.

    python examples/quickstart.py            # 224x224 input
    python examples/quickstart.py --small    # 32x32 input (used by the tests)

Builds a small RepVGG/ACNet/DBB-style network in its training form (parallel
conv-BN branches), then
  1. repfuse.deploy(model, example)        -> a fused torch.fx.GraphModule,
  2. torch.compile(model, backend="repfuse") -> fused before inductor,
and prints what changed and how far the outputs are from the training form.
"""

from __future__ import annotations

import argparse
import time

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
    return ((a - b).abs().max() / b.abs().max()).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="32x32 input instead of 224x224")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile step")
    args = p.parse_args(argv)
    size = 32 if args.small else 224
    torch.manual_seed(0)
    model = randomize_bn(TrainingFormNet())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = model(x)

    t = time.perf_counter()
    deployed = repfuse.deploy(model, (x,))
    print(f"repfuse.deploy took {time.perf_counter() - t:.2f} s")
    print(deployed.meta["repfuse_report"])
    with torch.no_grad():
        print(f"max relative error, deploy vs training form: {rel_err(deployed(x), reference):.2e}")

    if not args.no_compile:
        t = time.perf_counter()
        compiled = torch.compile(model, backend="repfuse")
        with torch.no_grad():
            out = compiled(x)
        print(f"torch.compile(backend='repfuse') first call (compile) took {time.perf_counter() - t:.1f} s")
        print(f"max relative error, compiled vs training form: {rel_err(out, reference):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
