"""Golden Before/Expected graphs on FX, one per rule: the deployed graph's op list is exactly the
expected one, and it computes what the unfused model computes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repfuse
from repfuse.passes.fx import op_kind

import blocks as B
from rewrite_blocks import DeadChannels, DynamicNet, Ghost


def ops(gm) -> list[str]:
    """The graph's ops in order, without the input-size guard deploy puts first."""
    return [op_kind(n, gm) for n in gm.graph.nodes
            if n.op in ("call_function", "call_method", "call_module") and op_kind(n, gm) != "ShapeGuard"]


def deployed(model, shape, **options):
    model = B.randomize(model).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    gm = repfuse.deploy(model, (x,), **options)
    with torch.no_grad():
        ref, out = model(x), gm(x)
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    return gm


class SlicedWeight(nn.Module):
    """One-shot NAS weight slicing and a binary mask: parameter-only computations."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 4, 3, 3))
        self.register_buffer("mask", (torch.rand(6, 1, 1, 1) > 0.3).float())

    def forward(self, x):
        return F.conv2d(x, self.weight[:6] * self.mask, padding=1)


class PadConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)

    def forward(self, x):
        return self.conv(F.pad(x, (1, 2, 1, 0)))


@pytest.mark.parametrize("model, shape, expected", [
    (B.ConvBN(), (2, 4, 9, 9), ["conv2d"]),
    (B.RepVGGBlock(4, 4), (2, 4, 9, 9), ["conv2d", "relu"]),
    (B.ACBlock(4, 6) if hasattr(B, "ACBlock") else B.ConvBN(), (2, 4, 9, 9), ["conv2d"]),
    (PadConv(), (2, 4, 9, 9), ["pad", "conv2d"]),  # asymmetric padding: torch's conv needs the pad anyway
], ids=["conv-bn", "repvgg", "acnet", "pad-conv"])
def test_affine_golden(model, shape, expected):
    assert ops(deployed(model, shape)) == expected


def test_affine_golden_asymmetric_pad_is_left_as_written():
    # fused, it would be written as a pad and a conv again (torch's convs pad both ends alike): no gain,
    # and rewriting it every round would never reach a fixed point
    gm = deployed(PadConv(), (2, 4, 9, 9))
    [pad] = [n for n in gm.graph.nodes if op_kind(n, gm) == "pad"]
    assert list(pad.args[1]) == [1, 2, 1, 0] and not gm.meta["repfuse_report"].regions


class PadConvBN(PadConv):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(super().forward(x))


def test_affine_golden_asymmetric_pad_keeps_only_the_surplus():
    gm = deployed(PadConvBN(), (2, 4, 9, 9))  # three ops become two: the surplus pad and one conv
    [pad] = [n for n in gm.graph.nodes if op_kind(n, gm) == "pad"]
    [conv] = [n for n in gm.graph.nodes if op_kind(n, gm) == "conv2d"]
    assert list(pad.args[1]) == [0, 1, 1, 0] and tuple(conv.args[4]) == (0, 1)  # (1,2,1,0) = sym (1, 0) + surplus


def test_constant_folding_golden():
    gm = deployed(SlicedWeight(), (2, 4, 9, 9))
    assert ops(gm) == ["conv2d"]
    assert [tuple(p.shape) for p in gm.parameters()] == [(6, 4, 3, 3)]


def test_dynamic_conv_golden():
    gm = deployed(DynamicNet(K=3), (2, 3, 12, 12))
    written = ["cat", "mm", "reshape", "addmm", "reshape", "size", "mul", "flatten", "unsqueeze", "conv2d",
               "unflatten", "squeeze"]  # pi [N, K] -> per-sample kernels [N*O, I/g, k, k] -> one grouped conv
    got = ops(gm)
    starts = [i for i in range(len(got)) if got[i:i + len(written)] == written]
    assert len(starts) == 2 and got.count("conv2d") == 3  # two dynamic convs, each one conv, and the stem


def test_dead_channels_golden():
    gm = deployed(DeadChannels(0.5, 1, 0), (2, 3, 10, 10))
    assert ops(gm) == ["conv2d", "relu", "conv2d"]
    assert [tuple(p.shape) for p in gm.parameters() if p.dim() == 4] == [(6, 3, 3, 3), (6, 6, 1, 1)]  # 2 of 8 channels gone


def test_ghost_concat_golden():
    before = ops(deployed(Ghost(), (2, 8, 9, 9)))
    after = ops(deployed(Ghost(), (2, 8, 9, 9), enable=["ghost_concat"]))
    assert before == ["conv2d", "relu", "conv2d", "relu", "cat", "conv2d"]
    assert after == ["conv2d", "relu", "conv2d", "relu", "conv2d"]  # cheap conv and concat: one 2-output dwconv


def test_standalone_per_channel_affine_never_becomes_a_conv():
    """A BN after an add (DenseNet-style) fuses into nothing that adds a conv: it stays elementwise."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(torch.relu(self.a(x)) + torch.relu(self.b(x))) * 2.0

    gm = deployed(Residual(), (2, 4, 9, 9))
    assert ops(gm).count("conv2d") == 2 and set(ops(gm)) <= {"conv2d", "relu", "add", "mul", "batch_norm"}


class Tokens(nn.Module):
    """LeViT-style tokens [B, N, C]: Linear -> BatchNorm1d over C (through flatten(0, 1)) -> Linear -> LayerScale."""

    def __init__(self, bn_over_tokens: bool = False):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.bn = nn.BatchNorm1d(5 if bn_over_tokens else 16)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.bn_over_tokens = bn_over_tokens

    def forward(self, x):
        b, n, _ = x.shape
        if self.bn_over_tokens:  # BatchNorm1d on [B, N, C] normalizes dim 1: the tokens, not the channels
            return self.fc2(self.bn(self.fc(x))) * self.gamma
        return self.fc2(self.bn(self.fc(x).flatten(0, 1)).reshape(b, n, -1)) * self.gamma


def test_tokens_linear_batchnorm_layerscale_fuse_to_one_linear():
    gm = deployed(Tokens(), (3, 5, 8))
    assert ops(gm) == ["linear"]  # the whole chain is one linear over C; flatten/reshape cancel
    assert [tuple(p.shape) for p in gm.parameters()] == [(8, 8), (8,)]


@pytest.mark.parametrize("shape", [(4, 7, 8), (1, 5, 8)])
def test_tokens_fused_linear_serves_other_sizes(shape):
    model = B.randomize(Tokens()).eval()
    gm = repfuse.deploy(model, (torch.randn(3, 5, 8),))
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x)
        assert (gm(x) - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert ops(gm) == ["linear"]


def test_batchnorm_over_the_token_axis_is_not_a_channel_affine():
    gm = deployed(Tokens(bn_over_tokens=True), (3, 5, 8))
    assert "batch_norm" in ops(gm) or "_native_batch_norm_legit_no_training" in ops(gm)
    reasons = {(d.rule, d.reason) for d in gm.meta["repfuse_report"].declined}
    assert ("affine", "BatchNorm over dim 1 of a tensor read channels-last") in reasons
