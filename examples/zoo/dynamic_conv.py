"""MobileNetV2 (width 1.0) with dynamic convolutions, in training form, with the paper's inference form.

Paper: Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR 2020
(the same aggregation as CondConv, Yang et al. 2019, and DyNet, Zhang et al. 2020).

Training form: every pointwise and depthwise conv of the inverted residual blocks is a
dynamic conv with K kernels W_k and biases b_k.  Per sample, an attention

    pi(x) = softmax(FC(ReLU(FC(GAP(x)))) / temperature)          (K weights, summing to 1)

weights K separate convolutions:  y = sum_k pi_k(x) * (conv(x, W_k) + b_k),  followed by
BN (and ReLU6 except after the projection).  The stem conv, the last 1x1 conv (1280
channels) and the classifier are static, as in the paper's DY-MobileNetV2 block layout.
`temperature` is 1.0: the value the paper anneals to (from 30) early in training.

Inference form (the paper, Sec. 3): aggregate the kernel first, then run ONE conv:

    W(x) = sum_k pi_k(x) W_k,   b(x) = sum_k pi_k(x) b_k,   y = conv(x, W(x)) + b(x).

Because sum_k pi_k = 1, the BN after the conv folds into every W_k, b_k.  Each sample has
its own kernel, so a batch of N runs as one grouped conv: the input is reshaped to
[1, N*C, H, W], the N aggregated kernels are stacked, and groups = N * groups.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

try:
    from .common import conv_bn, fuse_conv_bn
except ImportError:  # run with examples/zoo on sys.path
    from common import conv_bn, fuse_conv_bn

INPUT_SIZE = (1, 3, 224, 224)

# MobileNetV2 inverted residual settings: (expand ratio, channels, repeats, first stride)
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class Attention(nn.Module):
    """pi(x) = softmax(FC(ReLU(FC(GAP(x)))) / temperature), shape [N, K]."""

    def __init__(self, cin: int, K: int, temperature: float = 1.0, reduction: int = 4):
        super().__init__()
        hidden = max(cin // reduction, 4)
        self.fc1 = nn.Linear(cin, hidden)
        self.fc2 = nn.Linear(hidden, K)
        self.temperature = temperature

    def forward(self, x):
        z = self.fc2(F.relu(self.fc1(x.mean((2, 3)))))
        return torch.softmax(z / self.temperature, dim=1)


class DynamicConvBN(nn.Module):
    """Training form: K convs (each with bias) weighted by pi(x) and summed, then BN."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, K: int = 4):
        super().__init__()
        self.attention = Attention(cin, K)
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=True)
                                   for _ in range(K))
        self.bn = nn.BatchNorm2d(cout)
        # He init x 2, attention logits x ~5: with the default init, averaging K independent
        # kernels and an eval BN of scale 0.3-1 (common.randomize) leave the output of this
        # 52-layer network independent of its input and the attention uniform.  Much larger
        # and the random network turns chaotic (float32 rounding grows ~2x per block).
        with torch.no_grad():
            for conv in self.convs:
                nn.init.normal_(conv.weight, 0.0, 2.0 * math.sqrt(2.0 / conv.weight[0].numel()))
            nn.init.normal_(self.attention.fc2.weight, 0.0, 3.0 / math.sqrt(self.attention.fc2.in_features))

    def forward(self, x):
        pi = self.attention(x)
        y = 0
        for k, conv in enumerate(self.convs):
            y = y + pi[:, k].reshape(-1, 1, 1, 1) * conv(x)
        return self.bn(y)


class AggregatedDynamicConv(nn.Module):
    """Inference form: aggregate sum_k pi_k W_k (BN folded in) per sample, then one grouped conv."""

    def __init__(self, src: DynamicConvBN):
        super().__init__()
        conv = src.convs[0]
        self.attention = src.attention
        self.stride, self.padding, self.groups = conv.stride, conv.padding, conv.groups
        fused = [fuse_conv_bn(c.weight, c.bias, src.bn) for c in src.convs]
        self.weight = nn.Parameter(torch.stack([w for w, _ in fused]))  # [K, Cout, Cin/g, kh, kw]
        self.bias = nn.Parameter(torch.stack([b for _, b in fused]))    # [K, Cout]

    def forward(self, x):
        n, c, h, w = x.shape
        pi = self.attention(x)                                           # [N, K]
        weight = torch.einsum("nk,koihw->noihw", pi, self.weight)        # [N, Cout, Cin/g, kh, kw]
        bias = pi @ self.bias                                            # [N, Cout]
        cout = weight.shape[1]
        y = F.conv2d(x.reshape(1, n * c, h, w), weight.reshape(n * cout, *weight.shape[2:]),
                     bias.reshape(-1), self.stride, self.padding, groups=n * self.groups)
        return y.reshape(n, cout, y.shape[2], y.shape[3])


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand - ReLU6] - 3x3 depthwise - ReLU6 - 1x1 project (+ x)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, K: int):
        super().__init__()
        hidden = cin * expand
        layers = []
        if expand != 1:
            layers += [DynamicConvBN(cin, hidden, 1, K=K), nn.ReLU6()]
        layers += [DynamicConvBN(hidden, hidden, 3, stride, groups=hidden, K=K), nn.ReLU6(),
                   DynamicConvBN(hidden, cout, 1, K=K)]
        self.layers = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.layers(x)
        return x + y if self.residual else y


class DyMobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, K: int = 4):
        super().__init__()
        self.K = K
        layers, cin = [conv_bn(3, 32, 3, 2, 1), nn.ReLU6()], 32
        for expand, cout, repeats, stride in SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand, K))
                cin = cout
        layers += [conv_bn(cin, 1280, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(num_classes: int = 1000, K: int = 4) -> DyMobileNetV2:
    """The training-form dynamic MobileNetV2 (width 1.0) with K kernels per dynamic conv."""
    return DyMobileNetV2(num_classes, K)


def _fused_conv(seq: nn.Sequential) -> nn.Conv2d:
    """A conv with bias equal to nn.Sequential(conv, BN) in eval mode."""
    conv, bn = seq
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, groups=conv.groups, bias=True)
    weight, bias = fuse_conv_bn(conv.weight, conv.bias, bn)
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    return fused


@torch.no_grad()
def to_deploy(model: DyMobileNetV2) -> DyMobileNetV2:
    """A copy of `model` where each dynamic conv + BN aggregates its kernel and runs one conv,
    and each static conv-BN is one conv with bias; equal to `model` in eval mode."""
    deploy = DyMobileNetV2(model.classifier.out_features, model.K)
    deploy.load_state_dict(model.state_dict())

    def replace(module: nn.Module):
        for name, child in module.named_children():
            if isinstance(child, DynamicConvBN):
                setattr(module, name, AggregatedDynamicConv(child))
            elif isinstance(child, nn.Sequential) and len(child) == 2 and isinstance(child[1], nn.BatchNorm2d):
                setattr(module, name, _fused_conv(child))
            else:
                replace(child)

    replace(deploy)
    return deploy.eval()
