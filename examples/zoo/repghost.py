"""RepGhostNet 1.0x in its training form, with the paper's deploy conversion.

Paper: C. Chen, Z. Guo, H. Zeng, P. Xiong, J. Dong, "RepGhost: A Hardware-Efficient
Ghost Module via Re-parameterization", arXiv:2211.06088, 2022.

A RepGhost module replaces GhostNet's concat by an addition: the primary 1x1
conv-BN(-ReLU) features y feed a cheap depthwise conv-BN, and a BN-only identity branch
of y is added to it (ReLU after the sum), so the module keeps y's width. The bottleneck,
stem and head are GhostNet's, with about half the hidden channels.

Conversion (`to_deploy`): fold the identity BN into the depthwise conv as a centre-tap
kernel (scale gamma / sqrt(var + eps), shift beta - mean * scale), fold the cheap conv's
BN, then fold every remaining conv-BN pair: one depthwise conv per RepGhost module.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .common import conv_bn, fuse_conv_bn, identity_kernel
from .ghostnet import GhostBottleneck, GhostNet, fold_all_conv_bn, fold_conv_bn

INPUT_SIZE = (1, 3, 224, 224)

# kernel, hidden channels, output channels, SE ratio, stride
CFG = [
    (3, 8, 16, 0, 1),
    (3, 24, 24, 0, 2),
    (3, 36, 24, 0, 1),
    (5, 36, 40, 0.25, 2),
    (5, 60, 40, 0.25, 1),
    (3, 120, 80, 0, 2),
    (3, 100, 80, 0, 1),
    (3, 120, 80, 0, 1),
    (3, 120, 80, 0, 1),
    (3, 240, 112, 0.25, 1),
    (3, 336, 112, 0.25, 1),
    (5, 336, 160, 0.25, 2),
    (5, 480, 160, 0, 1),
    (5, 480, 160, 0.25, 1),
    (5, 480, 160, 0, 1),
    (5, 480, 160, 0.25, 1),
]


class RepGhostModule(nn.Module):
    """y = 1x1 conv-BN(-ReLU); out = cheap_dw_conv_bn(y) + BN(y), then ReLU if `relu`."""

    def __init__(self, cin: int, cout: int, relu: bool = True, dw_size: int = 3):
        super().__init__()
        self.primary = conv_bn(cin, cout, 1)
        self.cheap = conv_bn(cout, cout, dw_size, 1, dw_size // 2, groups=cout)
        self.identity_bn = nn.BatchNorm2d(cout)  # None once re-parameterized
        self.relu = relu

    def forward(self, x):
        y = self.primary(x)
        if self.relu:
            y = F.relu(y)
        z = self.cheap(y)
        if self.identity_bn is not None:
            z = z + self.identity_bn(y)
        return F.relu(z) if self.relu else z

    @torch.no_grad()
    def reparameterize(self):
        """Merge the identity BN branch and the cheap conv-BN into one depthwise conv with bias."""
        fused = fold_conv_bn(self.cheap)
        weight, bias = fuse_conv_bn(identity_kernel(fused.weight), None, self.identity_bn)
        fused.weight += weight
        fused.bias += bias
        self.cheap = fused
        self.identity_bn = None


class RepGhostBottleneck(GhostBottleneck):
    """GhostNet's bottleneck (depthwise stride conv, SE, shortcut) built from RepGhost modules."""

    module = RepGhostModule


def build(num_classes: int = 1000, width: float = 1.0) -> GhostNet:
    # the last 1x1 conv has twice the last hidden width (480 * 2 = 960 at 1.0x)
    return GhostNet(num_classes, width, cfg=CFG, block=RepGhostBottleneck, head_mult=2)


def to_deploy(model: nn.Module) -> nn.Module:
    """A copy of `model` in the paper's deploy form: one depthwise conv per RepGhost module, no BN."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for m in list(model.modules()):
            if isinstance(m, RepGhostModule) and m.identity_bn is not None:
                m.reparameterize()
        fold_all_conv_bn(model)
    return model
