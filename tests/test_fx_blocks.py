"""Every training-form block through the FX pass: same numbers, fewer ops.

Each case runs the unfused module with torch as the reference, on random input
with randomized BatchNorm statistics and batch 2, and asserts the structure
that must result (one conv, no BatchNorm left) or must survive (inexact folds).
"""

import operator
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import fx

import blocks as B
import repfuse
from repfuse.backends.pytorch import fuse_graph_module

CONV_TARGETS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.ops.aten.convolution.default,
                torch.ops.aten.conv2d.default}
BN_TARGETS = {F.batch_norm, torch.batch_norm, torch.ops.aten._native_batch_norm_legit_no_training.default,
              torch.ops.aten.batch_norm.default}


def count(gm: fx.GraphModule, targets=CONV_TARGETS, modules=(torch.nn.Conv2d,)) -> int:
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in targets:
            n += 1
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), modules):
            n += 1
    return n


def convs(gm):
    return count(gm, CONV_TARGETS | {F.linear, torch.ops.aten.linear.default},
                 (torch.nn.Conv2d, torch.nn.Linear))


def bns(gm):
    return count(gm, BN_TARGETS, (torch.nn.modules.batchnorm._BatchNorm,))


def check_close(fused, original, x):
    with torch.no_grad():
        ref, out = original(x), fused(x)
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err


CASES = B.CASES

NOTHING_TO_FUSE = {"bn_conv_pad1_stays"}


@pytest.mark.parametrize("name", list(CASES))
def test_deploy(name):
    factory, shape, n_convs, n_bns = CASES[name]
    model = B.randomize(factory(), seed=zlib.crc32(name.encode()) % 1000)
    x = torch.randn(shape)
    gm = repfuse.deploy(model, (x,))
    check_close(gm, model, x)
    assert convs(gm) == n_convs
    if n_bns is not None:
        assert bns(gm) == n_bns
    report = gm.meta["repfuse_report"]
    if name not in NOTHING_TO_FUSE:
        assert report.after.total_ops < report.before.total_ops
    # the deployed model also runs on another batch size and spatial size
    if len(shape) == 4:
        x2 = torch.randn(3, shape[1], shape[2] + 2, shape[3] + 2)
        check_close(gm, model, x2)


def test_bn_conv_padded_is_declined_with_reason():
    model = B.randomize(B.BNConv(padding=1))
    gm = repfuse.deploy(model, (torch.randn(2, 4, 9, 9),))
    reasons = [d.reason for d in gm.meta["repfuse_report"].declined if d.rule == "affine"]
    assert any("border" in r for r in reasons), reasons


def test_bn_conv_padded_fuses_when_bn_shift_is_zero():
    model = B.randomize(B.BNConv(padding=1))
    with torch.no_grad():  # make the BN's response to zero exactly zero: mean 0, beta 0
        model.bn.running_mean.zero_()
        model.bn.bias.zero_()
    x = torch.randn(2, 4, 9, 9)
    gm = repfuse.deploy(model, (x,))
    check_close(gm, model, x)
    assert bns(gm) == 0


def test_deploy_leaves_training_model_untouched():
    model = B.randomize(B.RepVGGBlock(8, 8)).train()
    x = torch.randn(2, 8, 9, 9)
    repfuse.deploy(model, (x,))
    assert model.training and all(m.training for m in model.modules())


# --- module-call graphs (symbolic_trace) and aten graphs (torch.export) go through the same pass

SYMBOLIC = ["conv_bn", "bn_conv_pad0_fuses", "bn_conv_pad1_stays", "linear_bn1d", "repvgg", "repvgg_strided",
            "acnet", "mobileone_depthwise", "repghost", "dilated", "dbb_zero_pad"]


@pytest.mark.parametrize("name", SYMBOLIC)
def test_symbolic_trace_graph(name):
    factory, shape, n_convs, n_bns = CASES[name]
    model = B.randomize(factory(), seed=3)
    x = torch.randn(shape)
    gm = fx.symbolic_trace(model)
    assert any(n.op == "call_module" for n in gm.graph.nodes)
    with torch.no_grad():
        fuse_graph_module(gm, (x,))
    check_close(gm, model, x)
    assert convs(gm) == n_convs
    if n_bns is not None:
        assert bns(gm) == n_bns


@pytest.mark.parametrize("name", ["conv_bn", "linear_bn1d", "repvgg", "acnet", "mobileone_depthwise", "dbb_bn_and_pad"])
def test_aten_graph(name):
    factory, shape, n_convs, n_bns = CASES[name]
    model = B.randomize(factory(), seed=4)
    x = torch.randn(shape)
    gm = torch.export.export(model, (x,)).module()
    before = convs(gm)
    with torch.no_grad():
        fuse_graph_module(gm)
    check_close(gm, model, x)
    assert convs(gm) <= before and bns(gm) == 0
    assert convs(gm) == n_convs


def test_training_mode_batchnorm_is_left_alone():
    model = B.randomize(B.ConvBN())
    model.bn.train()
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        report = fuse_graph_module(gm, (torch.randn(2, 4, 9, 9),))
    assert not report.regions and bns(gm) == 1
    assert any("training" in d.reason and d.rule == "affine" for d in report.declined)


def test_params_requiring_grad_are_not_constants_with_grad_enabled():
    model = B.randomize(B.ConvBN())
    gm = fx.symbolic_trace(model)
    report = fuse_graph_module(gm, (torch.randn(2, 4, 9, 9),))  # grad enabled, params require grad
    assert not report.regions and bns(gm) == 1


def test_unknown_ops_pass_through():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = B.conv_bn(4, 4, 3, 1, 1)
            self.b = B.conv_bn(4, 4, 1)

        def forward(self, x):
            return torch.sigmoid(self.a(x)) * self.b(x) + torch.roll(x, 1, 2)

    model = B.randomize(Odd())
    x = torch.randn(2, 4, 8, 8)
    gm = repfuse.deploy(model, (x,))
    check_close(gm, model, x)
    assert convs(gm) == 2 and bns(gm) == 0
    ops = B.op_counts(gm)
    assert ops["sigmoid"] == 1 and ops["roll"] == 1 and ops["mul"] == 1


def test_cost_refusal_is_reported():
    model = B.randomize(B.ConcatBranches(k_b=1))
    gm = repfuse.deploy(model, (torch.randn(2, 4, 9, 9),))
    assert any("MACs" in d.reason and d.rule == "affine" for d in gm.meta["repfuse_report"].declined)


def test_report_table_is_readable():
    model = B.randomize(B.RepVGGBlock(8, 8))
    gm = repfuse.deploy(model, (torch.randn(2, 8, 9, 9),))
    text = gm.meta["repfuse_report"].table(explain=True)
    assert "conv + linear ops" in text and "regions fused: 1" in text
    d = gm.meta["repfuse_report"].to_dict()
    assert d["before"]["convs"] == 2 and d["after"]["convs"] == 1


@pytest.mark.parametrize("count_include_pad,fuses", [(True, True), (False, False)])
def test_avg_pool_branch_fuses_only_when_it_counts_padding(count_include_pad, fuses):
    class AvgBranch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = B.conv_bn(4, 4, 3, 1, 1)
            self.pool = torch.nn.AvgPool2d(3, 1, 1, count_include_pad=count_include_pad)

        def forward(self, x):
            return self.conv(x) + self.pool(x)

    model = B.randomize(AvgBranch())
    x = torch.randn(2, 4, 8, 8)
    gm = repfuse.deploy(model, (x,))
    check_close(gm, model, x)
    pools = B.op_counts(gm)["avg_pool2d"]
    assert (convs(gm), pools) == ((1, 0) if fuses else (1, 1))
    assert bns(gm) == 0


def test_refused_chain_is_cut_where_it_stops_paying_off():
    # depthwise 3x3-BN then pointwise 1x1-BN: one dense 3x3 would cost more, but each half folds its BN
    model = B.randomize(torch.nn.Sequential(B.conv_bn(16, 16, 3, 1, 1, groups=16), B.conv_bn(16, 16, 1)))
    x = torch.randn(2, 16, 8, 8)
    gm = repfuse.deploy(model, (x,))
    check_close(gm, model, x)
    assert convs(gm) == 2 and bns(gm) == 0
