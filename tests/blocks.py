"""Blocks for the tests: the paper blocks come from examples/zoo, the rest are test-only.

RepVGG, ACNet, DBB (with its BN-and-pad layer) and MobileOne blocks are the zoo's
(`zoo.repvgg`, `zoo.acnet`, `zoo.dbb`, `zoo.mobileone`); this file adds the small
blocks the zoo has no use for and `CASES`, every block family with what its
hand-fused form has.  `randomize(model, seed)` gives every BatchNorm (and conv
bias) non-trivial values so that folding mistakes show up in the numbers.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from zoo.acnet import ACBlock  # noqa: E402,F401
from zoo.common import conv_bn  # noqa: E402,F401
from zoo.dbb import DBB, BNAndPad  # noqa: E402,F401
from zoo.mobileone import MobileOneBlock  # noqa: E402
from zoo.repvgg import RepVGGBlock  # noqa: E402


def op_counts(gm) -> Counter[str]:
    """An FX graph's ops by name, whatever the dialect (torch function, aten op, module call)."""
    from repfuse.passes.fx import op_kind

    return Counter(op_kind(n, gm) for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module"))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.5)
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


class ConvBN(nn.Module):
    def __init__(self, cin=4, cout=8, k=3, stride=1, padding=1, groups=1, dilation=1, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, dilation=dilation, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class BNConv(nn.Module):
    """BatchNorm before a conv: exact to fold only when the conv reads no padding."""

    def __init__(self, c=4, cout=8, padding=0):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, cout, 3, padding=padding)

    def forward(self, x):
        return self.conv(self.bn(x))


class LinearBN(nn.Module):
    def __init__(self, cin=16, cout=12):
        super().__init__()
        self.fc = nn.Linear(cin, cout)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        return self.bn(self.fc(x))


class RepGhostBlock(nn.Module):
    """RepGhost's re-parameterizable part: depthwise conv-BN plus a BN shortcut, added."""

    def __init__(self, c=8):
        super().__init__()
        self.cheap = conv_bn(c, c, 3, 1, 1, groups=c)
        self.fusion_bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.cheap(x) + self.fusion_bn(x))


class DilatedBranches(nn.Module):
    """A dilated 3x3 summed with an undilated 1x1 on the same grid."""

    def __init__(self, c=8, dilation=2):
        super().__init__()
        self.a = conv_bn(c, c, 3, 1, dilation, dilation=dilation)
        self.b = conv_bn(c, c, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


class SharedWeight(nn.Module):
    """One conv weight read by two convs (e.g. a tied kernel), each followed by its own BN."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn1(self.conv(x))
        z = self.bn2(F.conv2d(F.relu(y), self.conv.weight, None, 1, 1))
        return z


class TinyRepNet(nn.Module):
    """A small network mixing the blocks, for end-to-end tests."""

    def __init__(self):
        super().__init__()
        self.stem = RepVGGBlock(3, 16, stride=2)
        self.b1 = RepVGGBlock(16, 16)
        self.ac = ACBlock(16, 16)
        self.dbb = DBB(16, 16)
        self.mo_dw = MobileOneBlock(16, 16, kernel=3, stride=1, groups=16, branches=3)
        self.mo_pw = MobileOneBlock(16, 16, kernel=1, stride=1, groups=1, branches=3)
        self.head = nn.Linear(16, 10)
        self.head_bn = nn.BatchNorm1d(10)

    def forward(self, x):
        x = self.b1(self.stem(x))
        x = F.relu(self.ac(x))
        x = F.relu(self.dbb(x))
        x = self.mo_pw(self.mo_dw(x))
        x = x.mean((2, 3))
        return self.head_bn(self.head(x))


class ConcatBranches(nn.Module):
    """Parallel conv-BN branches concatenated on channels (horizontal merge): one conv."""

    def __init__(self, cin=4, k_b=3):
        super().__init__()
        self.a = conv_bn(cin, 3, 3, 1, 1)
        self.b = conv_bn(cin, 5, k_b, 1, k_b // 2)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class ScaledResidual(nn.Module):
    """x * s + conv(x) - 0.5 * bn(x): per-channel Mul/Sub by constants joining the region."""

    def __init__(self, c=6):
        super().__init__()
        self.conv = conv_bn(c, c, 3, 1, 1)
        self.bn = nn.BatchNorm2d(c)
        self.scale = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)

    def forward(self, x):
        return x * self.scale + self.conv(x) - 0.5 * self.bn(x)


# Every block family with what its hand-fused (paper) form has.
# name: (factory, input shape, convs after, batchnorms after; None = not asserted)
CASES = {
    "conv_bn": (lambda: ConvBN(), (2, 4, 9, 9), 1, 0),
    "conv_bn_strided_grouped": (lambda: ConvBN(4, 8, 3, stride=2, padding=1, groups=2), (2, 4, 10, 10), 1, 0),
    "bn_conv_pad0_fuses": (lambda: BNConv(padding=0), (2, 4, 9, 9), 1, 0),
    "bn_conv_pad1_stays": (lambda: BNConv(padding=1), (2, 4, 9, 9), 1, 1),
    "linear_bn1d": (lambda: LinearBN(), (3, 16), 1, 0),
    "repvgg": (lambda: RepVGGBlock(8, 8), (2, 8, 9, 9), 1, 0),
    "repvgg_strided": (lambda: RepVGGBlock(8, 16, stride=2), (2, 8, 10, 10), 1, 0),
    "repvgg_grouped": (lambda: RepVGGBlock(8, 8, groups=4), (2, 8, 9, 9), 1, 0),
    "acnet": (lambda: ACBlock(8, 8), (2, 8, 9, 9), 1, 0),
    "acnet_strided": (lambda: ACBlock(8, 8, stride=2), (2, 8, 11, 11), 1, 0),
    "dbb_bn_and_pad": (lambda: DBB(8, 8), (2, 8, 9, 9), 1, 0),
    "dbb_bn_and_pad_5x5_strided": (lambda: DBB(8, 8, k=5, stride=2), (2, 8, 12, 12), 1, 0),
    # zero padding after 1x1-BN: the chains through padded kxk / avgpool must stay unfused
    "dbb_zero_pad": (lambda: DBB(8, 8, bn_and_pad=False), (2, 8, 9, 9), 5, None),
    # MobileOneBlock(cin, cout, kernel, stride, groups, branches)
    "mobileone_depthwise": (lambda: MobileOneBlock(8, 8, 3, 1, 8, 3), (2, 8, 9, 9), 1, 0),
    "mobileone_depthwise_strided": (lambda: MobileOneBlock(8, 8, 3, 2, 8, 2), (2, 8, 10, 10), 1, 0),
    "mobileone_pointwise": (lambda: MobileOneBlock(8, 8, 1, 1, 1, 3), (2, 8, 9, 9), 1, 0),
    "repghost": (lambda: RepGhostBlock(), (2, 8, 9, 9), 1, 0),
    "dilated": (lambda: DilatedBranches(8, 2), (2, 8, 11, 11), 1, 0),
    "shared_weight": (lambda: SharedWeight(), (2, 8, 9, 9), 2, 0),
    "dbb_depthwise": (lambda: DBB(8, 8, groups=8), (2, 8, 9, 9), 1, 0),
    "concat_branches": (lambda: ConcatBranches(), (2, 4, 9, 9), 1, 0),
    # 3x3 beside 1x1: merging would pad the 1x1 to 3x3 and cost more, so the cost model keeps two convs
    "concat_mixed_kernels_stays": (lambda: ConcatBranches(k_b=1), (2, 4, 9, 9), 2, 0),
    "scaled_residual": (lambda: ScaledResidual(), (2, 6, 9, 9), 1, 0),
    "tiny_net": (lambda: TinyRepNet(), (2, 3, 32, 32), 7, 0),
}
