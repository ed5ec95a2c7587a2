"""Small training-form models for the seed-paper rewrites (dead channels, dynamic conv, Ghost concat).

Shared by the FX, ONNX and TVM tests, so every IR is checked on the same models.
Every model has random weights and random BatchNorm statistics (`randomize_bn`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blocks import conv_bn  # the zoo's conv-BN unit


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


def _kill(unit: nn.Sequential, channels, value: float) -> None:
    """Zero the conv weights of `channels` and make BN(0) = `value` there."""
    conv, bn = unit
    with torch.no_grad():
        conv.weight[channels] = 0.0
        bn.weight[channels] = 1.0
        bn.running_mean[channels] = 0.0
        bn.running_var[channels] = 1.0 - bn.eps
        bn.bias[channels] = value


class DeadChannels(nn.Module):
    """conv-BN-ReLU (8 channels; 1 and 2 have zero weights, 2 is the constant `value` after ReLU)
    feeding a consumer conv with kernel `k` and padding `padding`."""

    def __init__(self, value: float = 0.5, k: int = 1, padding: int = 0):
        super().__init__()
        self.producer = conv_bn(3, 8, 3, padding=1)
        self.consumer = conv_bn(8, 6, k, padding=padding)
        randomize_bn(self)
        _kill(self.producer, [1], 0.0)
        _kill(self.producer, [2], value)

    def forward(self, x):
        return self.consumer(F.relu(self.producer(x)))


class ResidualDead(nn.Module):
    """relu(a(x)) + b(x) -> 1x1 conv.  Channel 3 of branch a is dead (constant 0); with
    `both` it is dead in branch b too (then the sum's channel 3 is constant and can go)."""

    def __init__(self, both: bool = False):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, padding=1)
        self.a = conv_bn(8, 8, 3, padding=1)
        self.b = conv_bn(8, 8, 1)
        self.head = conv_bn(8, 4, 1)
        randomize_bn(self)
        _kill(self.a, [3], 0.0)
        if both:
            _kill(self.b, [3], 0.0)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.head(F.relu(self.a(x)) + self.b(x))


class DynamicConv(nn.Module):
    """DyConv (Chen et al. 2020): sum_k pi_k(x) * conv(x, W_k) then BN, with pi = softmax(FC(GAP(x)))."""

    def __init__(self, cin: int = 8, cout: int = 12, k: int = 3, stride: int = 1, groups: int = 1, K: int = 4):
        super().__init__()
        self.fc = nn.Linear(cin, K)
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups) for _ in range(K))
        self.bn = nn.BatchNorm2d(cout)
        randomize_bn(self)

    def forward(self, x):
        pi = torch.softmax(self.fc(x.mean((2, 3))), dim=1)
        y = 0
        for k, conv in enumerate(self.convs):
            y = y + pi[:, k].reshape(-1, 1, 1, 1) * conv(x)
        return F.relu(self.bn(y))


class DynamicNet(nn.Module):
    """Two dynamic convs (a dense 3x3 and a depthwise 3x3 with stride 2) after a static stem."""

    def __init__(self, K: int = 4):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, padding=1)
        self.dense = DynamicConv(8, 12, 3, K=K)
        self.depthwise = DynamicConv(12, 12, 3, stride=2, groups=12, K=K)
        randomize_bn(self)

    def forward(self, x):
        return self.depthwise(self.dense(F.relu(self.stem(x))))


class Ghost(nn.Module):
    """GhostNet module: y = ReLU(BN(1x1 conv)), z = ReLU(BN(depthwise 3x3(y))), concat(y, z) -> 1x1 conv."""

    def __init__(self, cin: int = 8, half: int = 6, cout: int = 10):
        super().__init__()
        self.primary = conv_bn(cin, half, 1)
        self.cheap = conv_bn(half, half, 3, padding=1, groups=half)
        self.consumer = conv_bn(2 * half, cout, 1)
        randomize_bn(self)

    def forward(self, x):
        y = F.relu(self.primary(x))
        return self.consumer(torch.cat([y, F.relu(self.cheap(y))], 1))
