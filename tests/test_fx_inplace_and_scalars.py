"""Patterns from timm's families on FX: in-place sums (`out += branch(x)`), scalar learnable affines
(HGNetV2's `scale * x + bias`) before zero padding, and per-channel branches summed behind a shared
producer (GhostNetV3).  Each is checked against the unfused model, and where the rewrite must not
fire, that the graph keeps its ops."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repfuse
from repfuse.passes.fx import op_kind

import blocks as B


def deployed(model, shape, atol=1e-5):
    model = B.randomize(model).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    gm = repfuse.deploy(model, (x,))
    with torch.no_grad():
        ref, out = model(x), gm(x)
    assert (out - ref).abs().max().item() <= atol * max(1.0, ref.abs().max().item())
    return gm


def count(gm, kind: str) -> int:
    return sum(op_kind(n, gm).startswith(kind) for n in gm.graph.nodes
               if n.op in ("call_function", "call_method", "call_module"))


def conv_bn(cin, cout, k, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class InPlaceBranches(nn.Module):
    """MobileOne / RepVGG in timm: `out = 0; out += branch(x)` and `x += identity`."""

    def __init__(self, c=6, inplace_first=True):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn(c, c, 3) for _ in range(3)])
        self.scale = conv_bn(c, c, 1)
        self.identity = nn.BatchNorm2d(c)
        self.inplace_first = inplace_first

    def forward(self, x):
        out = 0
        for b in self.branches:
            out += b(x)
        out = out + self.scale(x)
        out += self.identity(x)
        return F.relu(out)


def test_in_place_sum_is_one_conv():
    gm = deployed(InPlaceBranches(), (2, 6, 9, 9))
    assert count(gm, "conv") == 1 and count(gm, "batch_norm") == 0 and count(gm, "add") == 0


class WriteSeenLater(nn.Module):
    """`a.add_(b)` without rebinding: later reads of `a` see the write."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv_bn(4, 4, 3), conv_bn(4, 4, 3)

    def forward(self, x):
        a = self.c1(x)
        a.add_(self.c2(x))
        return a * 2 + a.relu()


class WriteIntoView(nn.Module):
    """An in-place add into a slice of a tensor writes into the whole tensor."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv_bn(4, 8, 3), conv_bn(4, 4, 3)

    def forward(self, x):
        a = self.c1(x)
        v = a[:, :4]
        v += self.c2(x)
        return a


class WriteIntoInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = conv_bn(4, 4, 3)

    def forward(self, x):
        y = x.clone()
        y += self.c1(x)
        return y


@pytest.mark.parametrize("model", [WriteSeenLater(), WriteIntoView(), WriteIntoInput()],
                         ids=["read-after-write", "write-into-view", "write-into-clone"])
def test_in_place_writes_others_see_are_exact(model):
    # numbers first: whatever is fused, the written values must still reach every reader
    gm = deployed(model, (2, 4, 9, 9))
    assert count(gm, "batch_norm") == 0  # the conv-BN pairs still fold


class ScalarAffine(nn.Module):
    """HGNetV2's LearnableAffineBlock: scalar parameters, `scale * x + bias`."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.7]))
        self.bias = nn.Parameter(torch.tensor([0.3]))

    def forward(self, x):
        return self.scale * x + self.bias


class LabPadConv(nn.Module):
    """conv-BN-ReLU-affine, then zero padding and a conv: the affine's shift differs from zero at the
    padded border, so it cannot enter the next conv, and it must not become a 1x1 depthwise conv."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3)
        self.lab1, self.lab2 = ScalarAffine(), ScalarAffine()
        self.next = conv_bn(8, 8, 2)
        self.last = conv_bn(8, 8, 1)

    def forward(self, x):
        y = self.lab1(F.relu(self.stem(x)))
        y = F.relu(self.next(F.pad(y, (0, 1, 0, 1))))
        return self.last(self.lab2(y))  # the second affine folds into the 1x1 conv after it


def test_scalar_affine_before_padding_stays_elementwise():
    gm = deployed(LabPadConv(), (2, 3, 12, 12))
    assert count(gm, "conv") == 3 and count(gm, "batch_norm") == 0
    assert count(gm, "mul") == 1 and count(gm, "add") == 1  # lab1 stays as it was written; lab2 folded


class GhostV3(nn.Module):
    """GhostNetV3's module without activations: x1 = sum of 1x1 conv-BNs; x2 = BN(x1) + dw 1x1 conv-BN(x1)
    + dw 3x3 conv-BNs(x1); cat(x1, x2).  x1 and x2 are one conv each."""

    def __init__(self, c=8):
        super().__init__()
        self.primary = nn.ModuleList([conv_bn(c, c, 1) for _ in range(3)])
        self.cheap_skip = nn.BatchNorm2d(c)
        self.cheap_scale = conv_bn(c, c, 1, groups=c)
        self.cheap = nn.ModuleList([conv_bn(c, c, 3, groups=c) for _ in range(3)])

    def forward(self, x):
        x1 = 0
        for b in self.primary:
            x1 += b(x)
        x2 = self.cheap_scale(x1) + self.cheap_skip(x1)
        for b in self.cheap:
            x2 += b(x1)
        return torch.cat([x1, x2], 1)


def test_per_channel_branches_sum_behind_a_shared_producer():
    gm = deployed(GhostV3(), (2, 8, 10, 10))
    assert count(gm, "conv") == 2 and count(gm, "batch_norm") == 0


class LinearNorm(nn.Module):
    """LeViT's Linear + BatchNorm1d over tokens: `bn(x.flatten(0, 1)).reshape_as(x)`."""

    def __init__(self, cin, cout):
        super().__init__()
        self.linear, self.bn = nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTMlp(nn.Module):
    def __init__(self, c=8, relu_inside=False):
        super().__init__()
        self.ln1, self.ln2 = LinearNorm(c, 2 * c), LinearNorm(2 * c, c)
        self.relu_inside = relu_inside

    def forward(self, x):
        if self.relu_inside:  # the reshape_as reads the linear's shape across a ReLU: the linear stays
            y = self.ln1.linear(x)
            return torch.relu(self.ln1.bn(y.flatten(0, 1))).reshape_as(y)
        return x + self.ln2(torch.relu(self.ln1(x)))


def test_reshape_as_reads_only_the_shape():
    model = B.randomize(LeViTMlp()).eval()
    gm = deployed(model, (2, 5, 8))
    assert count(gm, "linear") == 2 and count(gm, "batch_norm") == 0
    with torch.no_grad():  # other batch and token counts
        x = torch.randn(3, 7, 8)
        assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_reshape_as_outside_the_region_keeps_what_it_reads():
    gm = deployed(LeViTMlp(relu_inside=True), (2, 5, 8))
    assert count(gm, "batch_norm") == 0
