"""GhostNet 1.0x in its training form, with a hand-written deploy form.

Paper: K. Han, Y. Wang, Q. Tian, J. Guo, C. Xu, C. Xu, "GhostNet: More Features from
Cheap Operations", CVPR 2020 (Table 1 for the layout).

A Ghost module computes a few "intrinsic" features y with a 1x1 conv-BN(-ReLU) and
produces the rest with a cheap depthwise conv-BN(-ReLU) of y, concatenating the two.
Ghost bottlenecks stack two Ghost modules (a depthwise stride-2 conv-BN between them
when strided, squeeze-and-excitation where the table has it) around a shortcut.

Conversion: GhostNet defines no re-parameterized deploy form (the concat stays), so
`to_deploy` only folds every BatchNorm into the conv before it, giving a conv with
bias; the number of convolutions is unchanged.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import conv_bn, fuse_conv_bn

INPUT_SIZE = (1, 3, 224, 224)

# kernel, hidden (expansion) channels, output channels, SE ratio, stride -- Table 1
CFG = [
    (3, 16, 16, 0, 1),
    (3, 48, 24, 0, 2),
    (3, 72, 24, 0, 1),
    (5, 72, 40, 0.25, 2),
    (5, 120, 40, 0.25, 1),
    (3, 240, 80, 0, 2),
    (3, 200, 80, 0, 1),
    (3, 184, 80, 0, 1),
    (3, 184, 80, 0, 1),
    (3, 480, 112, 0.25, 1),
    (3, 672, 112, 0.25, 1),
    (5, 672, 160, 0.25, 2),
    (5, 960, 160, 0, 1),
    (5, 960, 160, 0.25, 1),
    (5, 960, 160, 0, 1),
    (5, 960, 160, 0.25, 1),
]


def make_divisible(v: float, divisor: int = 4) -> int:
    """Round a width-scaled channel count to a multiple of `divisor`, losing at most 10%."""
    rounded = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * v else rounded


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x + 3.0) / 6.0


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 conv -> ReLU -> 1x1 conv -> hard sigmoid gate on the input."""

    def __init__(self, channels: int, ratio: float = 0.25):
        super().__init__()
        reduced = make_divisible(channels * ratio)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * hard_sigmoid(self.expand(F.relu(self.reduce(s))))


class GhostModule(nn.Module):
    """cat([y, cheap(y)]) with y = 1x1 conv-BN(-ReLU) and cheap = depthwise conv-BN(-ReLU)."""

    def __init__(self, cin: int, cout: int, relu: bool = True, ratio: int = 2, dw_size: int = 3):
        super().__init__()
        intrinsic = math.ceil(cout / ratio)
        self.primary = conv_bn(cin, intrinsic, 1)
        self.cheap = conv_bn(intrinsic, intrinsic * (ratio - 1), dw_size, 1, dw_size // 2, groups=intrinsic)
        self.relu = relu
        self.cout = cout
        self.trim = intrinsic * ratio > cout  # slice when the ratio overshoots the output width

    def forward(self, x):
        y = self.primary(x)
        if self.relu:
            y = F.relu(y)
        z = self.cheap(y)
        if self.relu:
            z = F.relu(z)
        out = torch.cat([y, z], dim=1)
        return out[:, :self.cout] if self.trim else out


class GhostBottleneck(nn.Module):
    """ghost1 (ReLU) -> [depthwise stride conv-BN] -> [SE] -> ghost2 (linear), plus shortcut."""

    module = GhostModule  # RepGhostNet swaps this for its own module

    def __init__(self, cin: int, mid: int, cout: int, k: int, stride: int, se_ratio: float):
        super().__init__()
        pad = (k - 1) // 2
        self.ghost1 = self.module(cin, mid, relu=True)
        self.dw = conv_bn(mid, mid, k, stride, pad, groups=mid) if stride > 1 else None
        self.se = SqueezeExcite(mid, se_ratio) if se_ratio else None
        self.ghost2 = self.module(mid, cout, relu=False)
        if cin == cout and stride == 1:
            self.shortcut = nn.Identity()
        else:  # depthwise conv-BN at the block's stride, then a 1x1 conv-BN to the new width
            self.shortcut = nn.Sequential(conv_bn(cin, cin, k, stride, pad, groups=cin), conv_bn(cin, cout, 1))

    def forward(self, x):
        y = self.ghost1(x)
        if self.dw is not None:
            y = self.dw(y)
        if self.se is not None:
            y = self.se(y)
        return self.ghost2(y) + self.shortcut(x)


class GhostNet(nn.Module):
    """Stem conv-BN-ReLU, bottlenecks, 1x1 conv-BN-ReLU, global pool, 1x1 conv 1280 + ReLU, classifier."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, cfg=CFG, block=GhostBottleneck,
                 head_mult: int = 1, dropout: float = 0.2):
        super().__init__()
        cin = make_divisible(16 * width)
        self.stem = conv_bn(3, cin, 3, 2, 1)
        blocks = []
        for k, hidden, c, se_ratio, stride in cfg:
            cout = make_divisible(c * width)
            blocks.append(block(cin, make_divisible(hidden * width), cout, k, stride, se_ratio))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        last = make_divisible(cfg[-1][1] * width * head_mult)
        self.final = conv_bn(cin, last, 1)
        self.head = nn.Conv2d(last, 1280, 1)  # with bias, no BN
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.final(self.blocks(x)))
        x = F.relu(self.head(x.mean((2, 3), keepdim=True)))
        return self.classifier(self.dropout(x.flatten(1)))


def build(num_classes: int = 1000, width: float = 1.0) -> GhostNet:
    return GhostNet(num_classes, width)


def is_conv_bn(m: nn.Module) -> bool:
    return (isinstance(m, nn.Sequential) and len(m) == 2
            and isinstance(m[0], nn.Conv2d) and isinstance(m[1], nn.BatchNorm2d))


def fold_conv_bn(pair: nn.Sequential) -> nn.Conv2d:
    """One conv with bias equal to the eval-mode conv-BN `pair`."""
    conv, bn = pair
    weight, bias = fuse_conv_bn(conv.weight, conv.bias, bn)
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter(weight.detach().clone())
    fused.bias = nn.Parameter(bias.detach().clone())
    return fused


def fold_all_conv_bn(module: nn.Module) -> nn.Module:
    """Replace, in place, every conv-BN pair under `module` by its folded conv."""
    for name, child in module.named_children():
        if is_conv_bn(child):
            setattr(module, name, fold_conv_bn(child))
        else:
            fold_all_conv_bn(child)
    return module


def to_deploy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every BatchNorm folded into its conv (same conv count)."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        fold_all_conv_bn(model)
    return model
