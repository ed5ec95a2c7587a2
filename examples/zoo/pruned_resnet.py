"""A channel-pruned ResNet (pruned by zeroing) and the physically smaller network it stands for.

Papers: Liu et al., "Learning Efficient Convolutional Networks through Network Slimming",
ICCV 2017 (prune the channels whose BN scale is zero), and Liu et al., "MetaPruning",
ICCV 2019 (per-layer channel counts); ResNet: He et al., CVPR 2016.

Training form: ResNet-18 (depth=18, basic blocks, the default) or ResNet-50 (depth=50,
bottleneck blocks), every conv followed by BN, at full width.  Pruning is by zeroing: in
every block, a fixed random subset of round(ratio * C) output channels of the inner convs
(conv1 of a basic block; conv1 and conv2 of a bottleneck) has all-zero conv weights and BN
gamma = beta = 0, so after BN and ReLU the channel is the constant 0.  A few channels of each
subset (CONSTANT_PER_LAYER, the first two drawn) get BN beta in [0.25, 0.75] instead: they are
the constant relu(beta) != 0.  Block outputs (added to the shortcut) are never pruned, so the
residual adds stay as they are.

Reference conversion: the smaller network.  For each pruned conv-BN-ReLU feeding a consumer
conv, a channel whose conv weights are all zero is the constant
c = relu(beta - gamma * mean / sqrt(var + eps)) (computed from the actual parameters), and
  * c == 0: it is removed from the producer conv and BN and from the consumer's input channels;
  * c != 0 and the consumer is unpadded (the 1x1 conv3 of a bottleneck): it is removed the same
    way and c * sum(consumer weights of that channel) is added to the consumer's bias;
  * c != 0 and the consumer is padded (every 3x3 consumer): it is kept, since near the borders
    the padding zeros make its contribution position-dependent.
So in ResNet-18 the constant channels are kept; in ResNet-50 those of conv2 are folded.

Note: common.randomize draws new BN gamma/beta for every channel, undoing the zeroed BN
parameters (the zero conv weights remain, so the channels stay constant, just not zero:
to_deploy is still exact, but it removes only those whose constant is 0, about half).
Use this module's `randomize`, which calls common.randomize and then prunes again.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

try:
    from .common import conv_bn, randomize as randomize_bn
except ImportError:  # run with examples/zoo on sys.path
    from common import conv_bn, randomize as randomize_bn

INPUT_SIZE = (1, 3, 224, 224)
CONSTANT_PER_LAYER = 2


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, width, 3, stride, 1)
        self.conv2 = conv_bn(width, width, 3, 1, 1)
        self.shortcut = conv_bn(cin, width, 1, stride) if stride != 1 or cin != width else None

    def pruned_pairs(self):
        """(pruned conv-BN unit, the unit consuming its ReLU output)."""
        return [(self.conv1, self.conv2)]

    def forward(self, x):
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = conv_bn(cin, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride, 1)
        self.conv3 = conv_bn(width, cout, 1)
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def pruned_pairs(self):
        return [(self.conv1, self.conv2), (self.conv2, self.conv3)]

    def forward(self, x):
        y = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


DEPTHS = {18: (BasicBlock, [2, 2, 2, 2]), 50: (Bottleneck, [3, 4, 6, 3])}


class ResNet(nn.Module):
    def __init__(self, depth: int = 18, num_classes: int = 1000):
        super().__init__()
        block, counts = DEPTHS[depth]
        self.depth = depth
        self.stem = conv_bn(3, 64, 7, 2, 3)
        blocks, cin = [], 64
        for stage, (width, n) in enumerate(zip([64, 128, 256, 512], counts)):
            for i in range(n):
                blocks.append(block(cin, width, 2 if stage > 0 and i == 0 else 1))
                cin = width * block.expansion
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    def pruned_pairs(self):
        return [pair for block in self.blocks for pair in block.pruned_pairs()]

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2, 1)
        x = self.blocks(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@torch.no_grad()
def prune(model: ResNet, ratio: float = 0.5, seed: int = 0) -> ResNet:
    """Zero round(ratio * C) random output channels of every pruned unit (conv weights, BN gamma
    and beta); the first CONSTANT_PER_LAYER of them get beta in [0.25, 0.75] instead of 0."""
    g = torch.Generator().manual_seed(seed)
    for (conv, bn), _ in model.pruned_pairs():
        channels = torch.randperm(conv.out_channels, generator=g)[:round(ratio * conv.out_channels)]
        conv.weight[channels] = 0.0
        bn.weight[channels] = 0.0
        bn.bias[channels] = 0.0
        constant = channels[:CONSTANT_PER_LAYER]
        bn.bias[constant] = torch.rand(len(constant), generator=g) * 0.5 + 0.25
    model.ratio, model.seed = ratio, seed
    return model


def build(num_classes: int = 1000, ratio: float = 0.5, depth: int = 18) -> ResNet:
    """ResNet-18 (or ResNet-50) pruned by zeroing a `ratio` of the inner channels of every block."""
    return prune(ResNet(depth, num_classes), ratio)


def randomize(model: ResNet, seed: int = 0) -> ResNet:
    """common.randomize (random BN statistics and affine parameters), then the same pruning again."""
    return prune(randomize_bn(model, seed), model.ratio, model.seed).eval()


def _shrink(producer: nn.Sequential, consumer: nn.Sequential):
    """Remove the constant channels of producer -> ReLU -> consumer that can be removed exactly."""
    conv, bn = producer
    nxt = consumer[0]
    dead = (conv.weight.flatten(1) == 0).all(1)
    value = F.relu(bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps))
    foldable = nxt.padding == (0, 0) and nxt.padding_mode == "zeros" and nxt.groups == 1
    remove = dead & ((value == 0) | foldable)
    keep = ~remove
    folded = remove & (value != 0)

    new_conv = nn.Conv2d(conv.in_channels, int(keep.sum()), conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, bias=False)
    new_conv.weight.copy_(conv.weight[keep])
    new_bn = nn.BatchNorm2d(int(keep.sum()), bn.eps, bn.momentum)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new_bn, name).copy_(getattr(bn, name)[keep])

    new_nxt = nn.Conv2d(int(keep.sum()), nxt.out_channels, nxt.kernel_size, nxt.stride, nxt.padding,
                        nxt.dilation, nxt.groups, bias=nxt.bias is not None or bool(folded.any()))
    new_nxt.weight.copy_(nxt.weight[:, keep])
    if new_nxt.bias is not None:
        bias = nxt.bias.clone() if nxt.bias is not None else torch.zeros(nxt.out_channels)
        # an unpadded conv sees the constant channel as value * (sum of its kernel) everywhere
        bias += nxt.weight[:, folded].sum((2, 3)) @ value[folded]
        new_nxt.bias.copy_(bias)
    producer[0], producer[1], consumer[0] = new_conv, new_bn, new_nxt


@torch.no_grad()
def to_deploy(model: ResNet) -> ResNet:
    """A copy of `model` with its removable constant channels physically removed."""
    deploy = copy.deepcopy(model)
    for producer, consumer in deploy.pruned_pairs():
        _shrink(producer, consumer)
    return deploy.eval()
