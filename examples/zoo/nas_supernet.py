"""A one-shot NAS supernet (SPOS choice blocks + OFA-style width slicing) and its standalone subnet.

Papers: Guo et al., "Single Path One-Shot Neural Architecture Search with Uniform Sampling"
(SPOS), ECCV 2020, and Cai et al., "Once-for-All: Train One Network and Specialize it for
Efficient Deployment" (OFA), ICLR 2020.

Supernet (training form): a fixed stem (conv-BN-ReLU6, 16 channels), five stages of choice
blocks, a 1x1 head conv (960 channels), pooling and a Linear.  Each choice block holds six
candidate MobileNetV2 inverted-residual blocks (kernel 3, 5 or 7 x expand ratio 3 or 6), each
with its own weights (SPOS).  Each stage also searches its output width among a few options
(OFA elastic width): every conv stores its weight at the maximum width and the forward uses
`weight[:out_c, :in_c]` (depthwise: `weight[:c]`), and each BN normalizes with its parameters
and running statistics sliced to the active width (F.batch_norm).  A block adds its input
unless it is the first of its stage.

`model.set_path(choices, widths)` fixes one path: `choices[i]` is the candidate index of
block i (see CANDIDATES), `widths[s]` the output width of stage s.  The forward then runs
exactly that subnet, so a trace of it is one subnet's graph.  SPOS/OFA training would call
set_path with a random path at every step.

Reference conversion (the papers' deployment): the standalone subnet.  to_deploy builds a
plain network (Conv2d / BatchNorm2d / ReLU6) with only the chosen candidate of each block,
at the chosen widths, and copies the sliced weights and BN statistics into it.  Its convs
have the sliced shapes; BN is kept (no folding): the subnet is extracted, not fused.
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

CANDIDATES = [(3, 3), (3, 6), (5, 3), (5, 6), (7, 3), (7, 6)]    # (kernel, expand ratio)
# stages: (width options, number of blocks, stride of the first block); max width = last option
STAGES = [((16, 24), 2, 2), ((24, 32, 40), 3, 2), ((48, 64, 80), 3, 2),
          ((80, 96, 112), 3, 1), ((112, 136, 160), 3, 2)]
STEM, HEAD = 16, 960
DEFAULT_WIDTHS = [16, 32, 64, 96, 136]
DEFAULT_CHOICES = [i % len(CANDIDATES) for i in range(sum(n for _, n, _ in STAGES))]


class SlicedConv2d(nn.Module):
    """A conv (no bias, 'same' padding) with a max-width weight; runs on weight[:out_c, :in_c].

    in_c is the input's channel count; out_c is set by the supernet's set_path.  A depthwise
    conv has out_c = in_c and uses weight[:in_c] with groups = in_c."""

    def __init__(self, max_in: int, max_out: int, k: int, stride: int = 1, depthwise: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_out, 1 if depthwise else max_in, k, k))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
        self.stride, self.padding, self.depthwise = stride, k // 2, depthwise
        self.out_c = max_out

    def forward(self, x):
        in_c = x.shape[1]
        if self.depthwise:
            return F.conv2d(x, self.weight[:in_c], None, self.stride, self.padding, groups=in_c)
        return F.conv2d(x, self.weight[:self.out_c, :in_c], None, self.stride, self.padding)


class SlicedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first c = x.shape[1] channels of its max-width parameters and buffers."""

    def forward(self, x):
        c = x.shape[1]
        return F.batch_norm(x, self.running_mean[:c], self.running_var[:c], self.weight[:c], self.bias[:c],
                            self.training, self.momentum, self.eps)


class SuperMBConv(nn.Module):
    """One candidate: 1x1 expand - BN - ReLU6 - kxk depthwise - BN - ReLU6 - 1x1 project - BN."""

    def __init__(self, max_in: int, max_out: int, k: int, expand: int, stride: int):
        super().__init__()
        hidden = max_in * expand
        self.k, self.expand, self.stride = k, expand, stride
        self.expand_conv, self.bn1 = SlicedConv2d(max_in, hidden, 1), SlicedBatchNorm2d(hidden)
        self.dw_conv, self.bn2 = SlicedConv2d(hidden, hidden, k, stride, depthwise=True), SlicedBatchNorm2d(hidden)
        self.project_conv, self.bn3 = SlicedConv2d(hidden, max_out, 1), SlicedBatchNorm2d(max_out)

    def set_width(self, in_c: int, out_c: int):
        self.expand_conv.out_c = in_c * self.expand
        self.project_conv.out_c = out_c

    def pairs(self):
        """(conv, BN) in order, for extracting the subnet."""
        return [(self.expand_conv, self.bn1), (self.dw_conv, self.bn2), (self.project_conv, self.bn3)]

    def forward(self, x):
        x = F.relu6(self.bn1(self.expand_conv(x)))
        x = F.relu6(self.bn2(self.dw_conv(x)))
        return self.bn3(self.project_conv(x))


class ChoiceBlock(nn.Module):
    """The candidates of one block; the forward runs ops[choice] (+ x where residual)."""

    def __init__(self, max_in: int, max_out: int, stride: int, residual: bool):
        super().__init__()
        self.ops = nn.ModuleList(SuperMBConv(max_in, max_out, k, e, stride) for k, e in CANDIDATES)
        self.residual = residual
        self.choice = 0

    def forward(self, x):
        y = self.ops[self.choice](x)
        return x + y if self.residual else y


class Supernet(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = conv_bn(3, STEM, 3, 2, 1)
        blocks, cin = [], STEM
        for options, n, stride in STAGES:
            for i in range(n):
                blocks.append(ChoiceBlock(cin, options[-1], stride if i == 0 else 1, residual=i > 0))
                cin = options[-1]
        self.blocks = nn.Sequential(*blocks)
        self.head_conv, self.head_bn = SlicedConv2d(cin, HEAD, 1), nn.BatchNorm2d(HEAD)
        self.fc = nn.Linear(HEAD, num_classes)
        # He init x 1.5: with an eval BN of scale 0.3-1 (common.randomize) the default init
        # leaves the output of this ~45-conv network almost independent of its input.
        with torch.no_grad():
            for mod in self.modules():
                if isinstance(mod, (nn.Conv2d, SlicedConv2d)):
                    nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                    mod.weight.mul_(1.5)
        self.set_path(DEFAULT_CHOICES, DEFAULT_WIDTHS)

    def set_path(self, choices, widths):
        """Fix the subnet: a candidate index per block and an output width per stage."""
        if len(choices) != len(self.blocks) or len(widths) != len(STAGES):
            raise ValueError("need one choice per block and one width per stage")
        for (options, _, _), width in zip(STAGES, widths):
            if width not in options:
                raise ValueError(f"width {width} not among {options}")
        if not all(0 <= c < len(CANDIDATES) for c in choices):
            raise ValueError(f"choices must lie in [0, {len(CANDIDATES)})")
        self.choices, self.widths = list(choices), list(widths)
        for block, choice in zip(self.blocks, choices):
            block.choice = choice
        for block, (cin, cout) in zip(self.blocks, self.block_widths()):
            block.ops[block.choice].set_width(cin, cout)

    def block_widths(self) -> list[tuple[int, int]]:
        """(input width, output width) of every block on the current path."""
        result, cin = [], STEM
        for (_, n, _), width in zip(STAGES, self.widths):
            for _ in range(n):
                result.append((cin, width))
                cin = width
        return result

    def forward(self, x):
        x = self.blocks(F.relu6(self.stem(x)))
        x = F.relu6(self.head_bn(self.head_conv(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MBConv(nn.Module):
    """Standalone inverted residual block: conv-BN units at fixed widths."""

    def __init__(self, cin: int, cout: int, k: int, expand: int, stride: int, residual: bool):
        super().__init__()
        hidden = cin * expand
        self.layers = nn.Sequential(conv_bn(cin, hidden, 1), nn.ReLU6(),
                                    conv_bn(hidden, hidden, k, stride, k // 2, hidden), nn.ReLU6(),
                                    conv_bn(hidden, cout, 1))
        self.residual = residual

    def units(self):
        return [self.layers[0], self.layers[2], self.layers[4]]

    def forward(self, x):
        y = self.layers(x)
        return x + y if self.residual else y


class Subnet(nn.Module):
    """The standalone network of one supernet path."""

    def __init__(self, blocks: list[MBConv], last_width: int, num_classes: int):
        super().__init__()
        self.stem = conv_bn(3, STEM, 3, 2, 1)
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(last_width, HEAD, 1)
        self.fc = nn.Linear(HEAD, num_classes)

    def forward(self, x):
        x = self.blocks(F.relu6(self.stem(x)))
        x = F.relu6(self.head(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(num_classes: int = 1000) -> Supernet:
    """The supernet, set to the default path (DEFAULT_CHOICES, DEFAULT_WIDTHS)."""
    return Supernet(num_classes)


def _copy_sliced(unit: nn.Sequential, conv: SlicedConv2d, bn: SlicedBatchNorm2d):
    """Copy the active slices of a sliced conv and BN into a conv-BN unit of the sliced shape."""
    dst_conv, dst_bn = unit
    out_c, in_per_group = dst_conv.weight.shape[:2]
    dst_conv.weight.copy_(conv.weight[:out_c, :in_per_group])
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst_bn, name).copy_(getattr(bn, name)[:out_c])
    dst_bn.eps, dst_bn.momentum = bn.eps, bn.momentum


@torch.no_grad()
def to_deploy(model: Supernet) -> Subnet:
    """The standalone subnet of `model`'s current path, with the sliced weights copied."""
    blocks = []
    for block, (cin, cout) in zip(model.blocks, model.block_widths()):
        op = block.ops[block.choice]
        plain = MBConv(cin, cout, op.k, op.expand, op.stride, block.residual)
        for unit, (conv, bn) in zip(plain.units(), op.pairs()):
            _copy_sliced(unit, conv, bn)
        blocks.append(plain)
    subnet = Subnet(blocks, model.widths[-1], model.fc.out_features)
    subnet.stem.load_state_dict(model.stem.state_dict())
    _copy_sliced(subnet.head, model.head_conv, model.head_bn)
    subnet.fc.load_state_dict(model.fc.state_dict())
    return subnet.eval()
