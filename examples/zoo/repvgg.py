"""RepVGG-A0 and RepVGG-B0 in training form, with the paper's deploy conversion.

Paper: Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021.

Training form: every block is relu(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)), the
identity BN only where in == out channels and stride == 1.  Five stages (the
first is the single stem block), stride 2 in the first block of each stage,
widths min(64, 64a), 64a, 128a, 256a, 512b; then global average pooling and a
Linear classifier.

Deploy conversion (the paper, Sec. 3.4): fold each BN into its branch, zero-pad
the 1x1 kernel to 3x3, write the identity as a 3x3 kernel with 1 at the centre
of the channel diagonal (BN folded into it), and sum the three kernels and
biases into one 3x3 conv with bias, followed by ReLU.
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

# variant -> (blocks per stage after the stem, a, b)
VARIANTS = {
    "A0": ([2, 4, 14, 1], 0.75, 2.5),
    "B0": ([4, 6, 16, 1], 1.0, 2.5),
}


def stage_specs(variant: str) -> list[tuple[int, int]]:
    """(width, number of blocks) of each stage, the stem block first."""
    depths, a, b = VARIANTS[variant]
    widths = [min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b)]
    return list(zip(widths, [1] + depths))


class RepVGGBlock(nn.Module):
    """Training form: 3x3-BN + 1x1-BN + BN identity (where shapes allow), then ReLU.
    `groups` > 1 is the paper's group-wise variant (e.g. RepVGG-B1g2)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.one = conv_bn(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return F.relu(y)


class RepVGGDeployBlock(nn.Module):
    """Deploy form: one 3x3 conv with bias, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=True)

    def forward(self, x):
        return F.relu(self.conv(x))


class RepVGG(nn.Module):
    def __init__(self, variant: str = "A0", num_classes: int = 1000, deploy: bool = False):
        super().__init__()
        self.variant = variant
        block = RepVGGDeployBlock if deploy else RepVGGBlock
        blocks, cin = [], 3
        for width, depth in stage_specs(variant):
            for i in range(depth):
                blocks.append(block(cin, width, 2 if i == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def build(variant: str = "A0", num_classes: int = 1000) -> RepVGG:
    """The training-form RepVGG-A0 or RepVGG-B0."""
    return RepVGG(variant, num_classes)


def fuse_block(block: RepVGGBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3x3 kernel and bias equal to the sum of a block's branches."""
    w3, b3 = fuse_conv_bn(block.dense[0].weight, None, block.dense[1])
    w1, b1 = fuse_conv_bn(F.pad(block.one[0].weight, [1, 1, 1, 1]), None, block.one[1])
    weight, bias = w3 + w1, b3 + b1
    if block.identity is not None:
        wi, bi = fuse_conv_bn(identity_kernel(w3), None, block.identity)
        weight, bias = weight + wi, bias + bi
    return weight, bias


@torch.no_grad()
def to_deploy(model: RepVGG) -> RepVGG:
    """A new RepVGG with one 3x3 conv + ReLU per block, equal to `model` in eval mode."""
    deploy = RepVGG(model.variant, model.fc.out_features, deploy=True)
    load_fused(model.blocks, [block.conv for block in deploy.blocks], fuse_block)
    deploy.fc.load_state_dict(model.fc.state_dict())
    return deploy.eval()
