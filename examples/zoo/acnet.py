"""ResNet-18 with ACNet blocks, in training form, with the paper's deploy conversion.

Paper: Ding et al., "ACNet: Strengthening the Kernel Skeletons for Powerful CNN
via Asymmetric Convolution Blocks", ICCV 2019.

Training form: every 3x3 conv-BN of ResNet-18 is an Asymmetric Convolution
Block, BN(conv3x3(x)) + BN(conv1x3(x)) + BN(conv3x1(x)), the 1x3 padded (0, 1)
and the 3x1 padded (1, 0) so that all three slide over the same centres.  The
7x7 stem and the 1x1 shortcut convs stay plain conv-BN.

Deploy conversion (the paper, Sec. 3.3, BN fusion then branch fusion): fold each
BN into its kernel, add the 1x3 kernel into the centre row and the 3x1 kernel
into the centre column of the 3x3 kernel, and sum the biases: one 3x3 conv
with bias per block.  Plain conv-BNs are BN-folded.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from .common import ResNet18, conv_bn, fuse_conv_bn, resnet18_deploy
except ImportError:  # run with examples/zoo on sys.path
    from common import ResNet18, conv_bn, fuse_conv_bn, resnet18_deploy

INPUT_SIZE = (1, 3, 224, 224)


class ACBlock(nn.Module):
    """Asymmetric Convolution Block: square 3x3, horizontal 1x3 and vertical 3x1 conv-BNs, summed."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.square = conv_bn(cin, cout, (3, 3), stride, (1, 1))
        self.hor = conv_bn(cin, cout, (1, 3), stride, (0, 1))
        self.ver = conv_bn(cin, cout, (3, 1), stride, (1, 0))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


def acnet_unit(cin: int, cout: int, k: int, stride: int) -> nn.Module:
    return ACBlock(cin, cout, stride) if k == 3 else conv_bn(cin, cout, k, stride, k // 2)


def build(num_classes: int = 1000) -> ResNet18:
    """The training-form ACNet ResNet-18."""
    return ResNet18(acnet_unit, num_classes)


def fuse_unit(unit: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel and bias of the single conv equal to a training-form unit."""
    if isinstance(unit, ACBlock):
        weight, bias = fuse_conv_bn(unit.square[0].weight, None, unit.square[1])
        w_hor, b_hor = fuse_conv_bn(unit.hor[0].weight, None, unit.hor[1])  # (cout, cin, 1, 3)
        w_ver, b_ver = fuse_conv_bn(unit.ver[0].weight, None, unit.ver[1])  # (cout, cin, 3, 1)
        weight = weight.clone()
        weight[:, :, 1:2, :] += w_hor
        weight[:, :, :, 1:2] += w_ver
        return weight, bias + b_hor + b_ver
    conv, bn = unit
    return fuse_conv_bn(conv.weight, conv.bias, bn)


def to_deploy(model: ResNet18) -> ResNet18:
    """A new ResNet-18 with one conv (with bias) per unit, equal to `model` in eval mode."""
    return resnet18_deploy(model, fuse_unit)
