"""A small network of DRConv blocks (Dynamic Region-Aware Convolution), training form only.

Paper: Chen et al., "Dynamic Region-Aware Convolution", CVPR 2021.

A DRConv layer divides the image into m regions and convolves each region with its own
filter.  A guide branch (a standard k x k conv with m output channels) gives every pixel
the region argmax_j guide_j; the output at a pixel is that region's filter applied there:

    y = sum_j mask_j * conv(x, W_j),   mask = one_hot(argmax_j guide_j(x))   (per pixel)

Training form, written as above: all m convolutions are computed and one is selected per
pixel with the one-hot mask.  In training mode the mask is the paper's straight-through
"guided mask": hard one-hot forward, softmax(guide) gradient backward; in eval mode it is
the hard one-hot mask.

Simplification: the m filters W_j are static learned filters.  In the paper they come from
a filter generator (adaptive pooling of x to k x k, then 1x1 convs), i.e. they are per
sample; the region selection, which is what this example exercises, is the same.

Network: stem conv-BN-ReLU (3 -> 32, stride 2), three DRConv-BN-ReLU blocks
(32 -> 64 /2, 64 -> 128 /2, 128 -> 128), global average pooling, Linear.

to_deploy = None: the paper defines no separate inference form.  Inference runs the same
computation with the hard argmax mask (the official code also computes the m
convolutions, then gathers per pixel).  The BN after each DRConv could be folded into every
W_j (the mask sums to 1 at each pixel), but that is a generic BN fold, not a conversion
defined by the paper, so there is no reference here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    from .common import conv_bn
except ImportError:  # run with examples/zoo on sys.path
    from common import conv_bn

INPUT_SIZE = (1, 3, 224, 224)


class DRConv(nn.Module):
    """m static k x k filters; each pixel uses the filter of its region (argmax of the guide)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, m: int = 4):
        super().__init__()
        self.m = m
        self.guide = nn.Conv2d(cin, m, k, stride, k // 2)
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False) for _ in range(m))

    def forward(self, x):
        guide = self.guide(x)                                               # [N, m, H, W]
        mask = F.one_hot(guide.argmax(1), self.m).permute(0, 3, 1, 2).to(x.dtype)
        if self.training:  # straight-through: the forward value is the hard mask
            soft = guide.softmax(1)
            mask = mask + soft - soft.detach()
        y = 0
        for j, conv in enumerate(self.convs):
            y = y + mask[:, j:j + 1] * conv(x)
        return y


class DRBlock(nn.Module):
    """DRConv - BN - ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, m: int):
        super().__init__()
        self.conv = DRConv(cin, cout, 3, stride, m)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class DRNet(nn.Module):
    def __init__(self, num_classes: int = 1000, m: int = 4):
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2, 1)
        self.blocks = nn.Sequential(DRBlock(32, 64, 2, m), DRBlock(64, 128, 2, m), DRBlock(128, 128, 1, m))
        self.fc = nn.Linear(128, num_classes)
        for mod in self.modules():  # He init: the default init shrinks the signal ~4x per layer
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(num_classes: int = 1000, m: int = 4) -> DRNet:
    """The training-form DRConv network with m regions per DRConv."""
    return DRNet(num_classes, m)


to_deploy = None
