"""Shared helpers for the model zoo: random BatchNorm state, conv-BN units, the BN fold, conv counting.

Nothing here uses repfuse: the zoo's deploy conversions are independent references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters; return model.eval().

    Weights keep torch's default initialization.  For each BatchNorm, drawn from a
    torch.Generator seeded with `seed`:

        running_var  ~ U(0.5, 2.0)
        running_mean ~ N(0, 0.1^2)
        weight       ~ U(0.3, 1.0) * sqrt(running_var + eps)
        bias         ~ N(0, 0.1^2)

    so the effective per-channel scale weight / sqrt(var + eps) lies in [0.3, 1.0].
    That keeps activations of moderate size through deep networks whose blocks sum
    several BN-ended branches, while folding stays far from a no-op.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                if m.affine:
                    std = torch.sqrt(m.running_var + m.eps)
                    m.weight.copy_((torch.rand(c, generator=g) * 0.7 + 0.3) * std)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def conv_bn(cin: int, cout: int, k, stride=1, padding=0, groups: int = 1, dilation=1) -> nn.Sequential:
    """nn.Sequential(Conv2d without bias, BatchNorm2d): the training-form conv unit."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, dilation=dilation, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


def fuse_conv_bn(weight: torch.Tensor, bias: torch.Tensor | None,
                 bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the conv before it.

    bn(conv(x)) = gamma * (W x + b - mean) / sqrt(var + eps) + beta
                = (W * s) x + (beta + (b - mean) * s),   s = gamma / sqrt(var + eps)
    """
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    if bias is None:
        bias = torch.zeros_like(bn.running_mean)
    return weight * scale.reshape(-1, 1, 1, 1), bn.bias + (bias - bn.running_mean) * scale


def identity_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The identity as a conv kernel shaped like `weight` ([C, C/groups, kh, kw]): 1 at the
    centre tap of each channel's own input, whatever the groups."""
    c, per_group, kh, kw = weight.shape
    kernel = torch.zeros_like(weight)
    kernel[torch.arange(c), torch.arange(c) % per_group, kh // 2, kw // 2] = 1.0
    return kernel


def count_convs(module: nn.Module) -> int:
    """Number of nn.Conv2d and nn.Linear modules in `module`."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())


class _CountConvCalls(torch.overrides.TorchFunctionMode):
    CONVS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv2d}

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in self.CONVS
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def count_conv_calls(module: nn.Module, x: torch.Tensor) -> int:
    """Conv and linear ops one forward pass runs (for forms that compute weights on the fly)."""
    with _CountConvCalls() as mode:
        module(x)
    return mode.calls


class BasicBlock(nn.Module):
    """ResNet basic block; `unit(cin, cout, k, stride)` makes each conv (a conv-BN, a
    re-parameterizable block, or a deploy conv with bias)."""

    def __init__(self, unit, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = unit(cin, cout, 3, stride)
        self.conv2 = unit(cout, cout, 3, 1)
        self.shortcut = unit(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))

    def units(self) -> list[nn.Module]:
        return [self.conv1, self.conv2] + ([self.shortcut] if self.shortcut is not None else [])


class ResNet18(nn.Module):
    """ResNet-18 (He et al., 2016): 7x7/2 stem, 3x3/2 max-pool, four stages of two basic
    blocks (64, 128, 256, 512 channels), global average pooling, Linear."""

    def __init__(self, unit, num_classes: int = 1000):
        super().__init__()
        self.stem = unit(3, 64, 7, 2)
        blocks, cin = [], 64
        for stage, width in enumerate([64, 128, 256, 512]):
            for i in range(2):
                blocks.append(BasicBlock(unit, cin, width, 2 if stage > 0 and i == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.stem(x)), 3, 2, 1)
        x = self.blocks(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def units(self) -> list[nn.Module]:
        """Every conv unit in a fixed order, so a training form and its deploy form can be zipped."""
        return [self.stem] + [u for block in self.blocks for u in block.units()]


def deploy_conv(cin: int, cout: int, k: int, stride: int) -> nn.Conv2d:
    """The deploy-form ResNet unit: one kxk conv with bias, 'same' padding."""
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=True)


@torch.no_grad()
def load_fused(units, convs, fuse) -> None:
    """Copy `fuse(unit) -> (weight, bias)` of each training-form unit into its deploy conv."""
    for unit, conv in zip(units, convs, strict=True):
        weight, bias = fuse(unit)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)


@torch.no_grad()
def resnet18_deploy(model: ResNet18, fuse_unit) -> ResNet18:
    """A new ResNet-18 with one conv (with bias) per unit; `fuse_unit(unit) -> (weight, bias)` is the paper's fold."""
    deploy = ResNet18(deploy_conv, model.fc.out_features)
    load_fused(model.units(), deploy.units(), fuse_unit)
    deploy.fc.load_state_dict(model.fc.state_dict())
    return deploy.eval()
