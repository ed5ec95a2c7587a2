"""MobileOne-S0 in training form, with the paper's deploy conversion.

Paper: Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", CVPR 2023.

Training form: a MobileOne block is relu(sum of k conv-BN branches + a 1x1
conv-BN "scale" branch (only when the kernel is larger than 1) + a BN identity
(only when in == out channels and stride == 1)).  After a 3x3/2 stem block
(one conv-BN branch), each layer of the four stages is a depthwise 3x3 block
(stride 2 in a stage's first layer) then a pointwise 1x1 block.  S0: k = 4
branches, width multipliers (0.75, 1, 1, 2) on (64, 128, 256, 512), so stage
widths 48, 128, 256, 1024 with 2, 8, 10, 1 layers, stem width min(64, 48);
then global average pooling and a Linear classifier.

Deploy conversion (the paper, Sec. 3.1, as in RepVGG): fold every branch's BN,
zero-pad the 1x1 scale kernel to 3x3, write the BN identity as a kernel with 1
at the centre of each channel's own input (grouped conv aware), and sum: one
conv with bias, then ReLU, per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    from .common import conv_bn, fuse_conv_bn, identity_kernel, load_fused
except ImportError:  # run with examples/zoo on sys.path
    from common import conv_bn, fuse_conv_bn, identity_kernel, load_fused

INPUT_SIZE = (1, 3, 224, 224)

S0_STAGES = [(48, 2), (128, 8), (256, 10), (1024, 1)]  # (width, layers): 64*.75, 128*1, 256*1, 512*2
S0_STEM = 48  # min(64, 64 * 0.75)
S0_BRANCHES = 4


class MobileOneBlock(nn.Module):
    """Training form: k kxk conv-BN branches + 1x1 conv-BN scale branch + BN identity, then ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int, branches: int):
        super().__init__()
        self.convs = nn.ModuleList(conv_bn(cin, cout, kernel, stride, kernel // 2, groups)
                                   for _ in range(branches))
        self.scale = conv_bn(cin, cout, 1, stride, 0, groups) if kernel > 1 else None
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = 0
        if self.identity is not None:
            y = self.identity(x)
        if self.scale is not None:
            y = y + self.scale(x)
        for conv in self.convs:
            y = y + conv(x)
        return F.relu(y)


class MobileOneDeployBlock(nn.Module):
    """Deploy form: one conv with bias, then ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int, branches: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=True)

    def forward(self, x):
        return F.relu(self.conv(x))


class MobileOne(nn.Module):
    def __init__(self, num_classes: int = 1000, deploy: bool = False):
        super().__init__()
        block = MobileOneDeployBlock if deploy else MobileOneBlock
        layers = [block(3, S0_STEM, 3, 2, 1, 1)]  # the stem block has one conv-BN branch
        cin = S0_STEM
        for width, depth in S0_STAGES:
            for i in range(depth):
                layers.append(block(cin, cin, 3, 2 if i == 0 else 1, cin, S0_BRANCHES))  # depthwise
                layers.append(block(cin, width, 1, 1, 1, S0_BRANCHES))  # pointwise
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(num_classes: int = 1000) -> MobileOne:
    """The training-form MobileOne-S0."""
    return MobileOne(num_classes)


def fuse_block(block: MobileOneBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel and bias of the single conv equal to a block's branches."""
    conv = block.convs[0][0]
    p = conv.kernel_size[0] // 2
    weight = torch.zeros_like(conv.weight)
    bias = torch.zeros(conv.out_channels)
    for branch in block.convs:
        w, b = fuse_conv_bn(branch[0].weight, None, branch[1])
        weight, bias = weight + w, bias + b
    if block.scale is not None:
        w, b = fuse_conv_bn(block.scale[0].weight, None, block.scale[1])
        weight, bias = weight + F.pad(w, [p, p, p, p]), bias + b
    if block.identity is not None:
        w, b = fuse_conv_bn(identity_kernel(conv.weight), None, block.identity)
        weight, bias = weight + w, bias + b
    return weight, bias


@torch.no_grad()
def to_deploy(model: MobileOne) -> MobileOne:
    """A new MobileOne with one conv + ReLU per block, equal to `model` in eval mode."""
    deploy = MobileOne(model.fc.out_features, deploy=True)
    load_fused(model.layers, [block.conv for block in deploy.layers], fuse_block)
    deploy.fc.load_state_dict(model.fc.state_dict())
    return deploy.eval()
