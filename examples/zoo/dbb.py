"""ResNet-18 with Diverse Branch Blocks, in training form, with the paper's deploy conversion.

Paper: Ding et al., "Diverse Branch Block: Building a Convolution as an
Inception-like Unit", CVPR 2021.

Training form: every 3x3 conv-BN of ResNet-18 is a DBB with four branches,
summed:

    kxk-BN
    1x1-BN
    1x1 -> BN-and-pad -> avgpool kxk (no padding) -> BN
    1x1 -> BN-and-pad -> kxk conv (no padding) -> BN

BN-and-pad pads its BN output by k // 2 with the value the BN gives a zero
input, so that the later kxk stage sees exactly what a 1x1 conv with bias
followed by a zero-padded kxk would see: this is what makes the block exactly
one conv.  The 7x7 stem and the 1x1 shortcut convs stay plain conv-BN.

Deploy conversion (DBB's transforms): I fold each BN into the conv before it;
III merges a 1x1 conv followed by a kxk conv by the channel product of their
kernels (bias: the kxk kernel summed over space times the 1x1 bias, plus the
kxk bias); V writes the kxk average pool as a kxk conv with 1/k^2 on the
channel diagonal; VI zero-pads the 1x1 kernel to kxk; II adds the branches.
One kxk conv with bias per DBB; plain conv-BNs are BN-folded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    from .common import ResNet18, conv_bn, fuse_conv_bn, resnet18_deploy
except ImportError:  # run with examples/zoo on sys.path
    from common import ResNet18, conv_bn, fuse_conv_bn, resnet18_deploy

INPUT_SIZE = (1, 3, 224, 224)


class BNAndPad(nn.Module):
    """BatchNorm, then pad by `pad` with the BN's response to a zero input."""

    def __init__(self, channels: int, pad: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def fill(self) -> torch.Tensor:
        """[C]: what the BN gives a zero input."""
        bn = self.bn
        return bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)

    def forward(self, x):
        y = self.bn(x)
        p = self.pad
        if p == 0:
            return y
        fill = self.fill().view(1, -1, 1, 1)
        y = F.pad(y, [p, p, p, p])
        y[:, :, 0:p, :] = fill
        y[:, :, -p:, :] = fill
        y[:, :, :, 0:p] = fill
        y[:, :, :, -p:] = fill
        return y


class DBB(nn.Module):
    """Diverse Branch Block replacing a kxk conv-BN (internal width of the 1x1-kxk branch =
    in_channels, as in the paper's ResNet setting).

    `bn_and_pad=False` is the naive form the paper's BN-and-pad layer exists to avoid: the
    1x1-BN output is zero-padded by the avgpool / kxk conv itself, so those two branches
    are not one conv.  `fuse_dbb` needs groups = 1 and BN-and-pad.
    """

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 bn_and_pad: bool = True):
        super().__init__()
        p = k // 2
        inner = 0 if bn_and_pad else p  # padding of the avgpool and of the chain's kxk conv
        self.groups, self.bn_and_pad = groups, bn_and_pad
        self.kxk = conv_bn(cin, cout, k, stride, p, groups)
        self.one = conv_bn(cin, cout, 1, stride, 0, groups)
        self.avg_conv = nn.Conv2d(cin, cout, 1, groups=groups, bias=False)
        self.avg_pad = BNAndPad(cout, p) if bn_and_pad else nn.BatchNorm2d(cout)
        self.avg = nn.AvgPool2d(k, stride, padding=inner)
        self.avg_bn = nn.BatchNorm2d(cout)
        self.chain_conv = nn.Conv2d(cin, cin, 1, groups=groups, bias=False)
        self.chain_pad = BNAndPad(cin, p) if bn_and_pad else nn.BatchNorm2d(cin)
        self.chain_kxk = nn.Conv2d(cin, cout, k, stride, padding=inner, groups=groups, bias=False)
        self.chain_bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        a = self.kxk(x)
        b = self.one(x)
        c = self.avg_bn(self.avg(self.avg_pad(self.avg_conv(x))))
        d = self.chain_bn(self.chain_kxk(self.chain_pad(self.chain_conv(x))))
        return a + b + c + d


def dbb_unit(cin: int, cout: int, k: int, stride: int) -> nn.Module:
    return DBB(cin, cout, k, stride) if k == 3 else conv_bn(cin, cout, k, stride, k // 2)


def build(num_classes: int = 1000) -> ResNet18:
    """The training-form DBB ResNet-18."""
    return ResNet18(dbb_unit, num_classes)


def merge_1x1_kxk(w1, b1, w2, b2) -> tuple[torch.Tensor, torch.Tensor]:
    """Transform III: a 1x1 conv (w1, b1) then a kxk conv (w2, b2) as one kxk conv.

    Exact because the tensor between them is padded with b1 (BN-and-pad), so every
    tap of the kxk conv reads w1 x + b1, with x = 0 outside the input.
    """
    weight = torch.einsum("omhw,mi->oihw", w2, w1[:, :, 0, 0])
    bias = b2 + (w2.sum(dim=(2, 3)) * b1.view(1, -1)).sum(dim=1)
    return weight, bias


def avg_kernel(channels: int, k: int) -> torch.Tensor:
    """Transform V: a kxk average pool as a kxk conv kernel, 1/k^2 on the channel diagonal."""
    kernel = torch.zeros(channels, channels, k, k)
    kernel[torch.arange(channels), torch.arange(channels)] = 1.0 / (k * k)
    return kernel


def fuse_dbb(block: DBB) -> tuple[torch.Tensor, torch.Tensor]:
    if block.groups != 1 or not block.bn_and_pad:
        raise ValueError("fuse_dbb needs groups=1 and BN-and-pad")
    k = block.kxk[0].kernel_size[0]
    p = k // 2
    cout = block.kxk[0].out_channels
    # kxk-BN (transform I)
    w_a, b_a = fuse_conv_bn(block.kxk[0].weight, None, block.kxk[1])
    # 1x1-BN, zero-padded to kxk (I, VI)
    w_b, b_b = fuse_conv_bn(block.one[0].weight, None, block.one[1])
    w_b = F.pad(w_b, [p, p, p, p])
    # 1x1 -> BN-and-pad -> avgpool -> BN (I, V, III)
    w1, b1 = fuse_conv_bn(block.avg_conv.weight, None, block.avg_pad.bn)
    w2, b2 = fuse_conv_bn(avg_kernel(cout, k), None, block.avg_bn)
    w_c, b_c = merge_1x1_kxk(w1, b1, w2, b2)
    # 1x1 -> BN-and-pad -> kxk -> BN (I, III)
    w1, b1 = fuse_conv_bn(block.chain_conv.weight, None, block.chain_pad.bn)
    w2, b2 = fuse_conv_bn(block.chain_kxk.weight, None, block.chain_bn)
    w_d, b_d = merge_1x1_kxk(w1, b1, w2, b2)
    # branch addition (II)
    return w_a + w_b + w_c + w_d, b_a + b_b + b_c + b_d


def fuse_unit(unit: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel and bias of the single conv equal to a training-form unit."""
    if isinstance(unit, DBB):
        return fuse_dbb(unit)
    conv, bn = unit
    return fuse_conv_bn(conv.weight, conv.bias, bn)


def to_deploy(model: ResNet18) -> ResNet18:
    """A new ResNet-18 with one conv (with bias) per unit, equal to `model` in eval mode."""
    return resnet18_deploy(model, fuse_unit)
