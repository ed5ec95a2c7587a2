"""The seed-paper rules on the FX path: dead channels, dynamic-conv aggregation, rule switches.

Every case compares against the unfused torch model on random inputs and checks the
structure (conv shapes, conv counts); the property tests sweep conv geometry.
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

import repfuse
from repfuse.backends.pytorch import fuse_graph_module
from repfuse.patterns.rules import enabled

from blocks import op_counts
from rewrite_blocks import DeadChannels, DynamicConv, DynamicNet, Ghost, ResidualDead, randomize_bn

warnings.filterwarnings("ignore")


def close(out, ref, rtol=1e-4):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= rtol * max(np.abs(ref).max(), 1e-6), np.abs(out - ref).max()


def conv_weights(gm) -> list[tuple]:
    return [tuple(p.shape) for _, p in gm.named_parameters() if p.dim() == 4]


def rule(gm, name):
    return next(r for r in gm.meta["repfuse_report"].rules if r.name == name)


def deployed(model, shape, seed=0, **options):
    torch.manual_seed(seed)
    x = torch.randn(*shape)
    with torch.no_grad():
        y = model(x)
    gm = repfuse.deploy(model, (x,), **options)
    with torch.no_grad():
        close(gm(x), y)
    return gm


# ---------------------------------------------------------------- dead channels

@pytest.mark.parametrize("k, padding, producer_out", [(1, 0, 6), (3, 1, 7)], ids=["unpadded", "padded"])
def test_constant_channel_goes_only_where_the_consumer_reads_no_padding(k, padding, producer_out):
    gm = deployed(DeadChannels(0.5, k, padding), (2, 3, 10, 10))
    producer, consumer = conv_weights(gm)
    assert producer == (producer_out, 3, 3, 3) and consumer[1] == producer_out
    assert rule(gm, "dead_channels").applied == 8 - producer_out
    if padding:
        assert "padded conv" in rule(gm, "dead_channels").detail


@pytest.mark.parametrize("both, kept", [(False, 8), (True, 7)], ids=["one-branch-dead", "both-dead"])
def test_residual_add_removes_a_channel_only_when_every_branch_is_constant(both, kept):
    gm = deployed(ResidualDead(both), (2, 3, 10, 10))
    stem, a, b, head = conv_weights(gm)
    assert (a[0], b[0], head[1]) == (kept, kept, kept) and stem[0] == 8


def test_dead_channels_can_be_switched_off():
    gm = deployed(DeadChannels(0.5, 1, 0), (2, 3, 10, 10), disable=["dead_channels"])
    assert conv_weights(gm)[0][0] == 8
    assert not rule(gm, "dead_channels").enabled and rule(gm, "dead_channels").applied == 0


def test_unknown_rule_names_are_refused():
    with pytest.raises(ValueError, match="unknown rule 'bogus'"):
        enabled(disable=["bogus"])
    with pytest.raises(ValueError, match="unknown rule"):
        repfuse.deploy(DeadChannels(), (torch.randn(1, 3, 8, 8),), enable=["bogus"])


class _DeadThenConsumer(nn.Module):
    def __init__(self, dead, values, k, padding, stride, act):
        super().__init__()
        self.producer = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
        self.consumer = nn.Conv2d(6, 5, k, stride, padding)
        self.act = act
        randomize_bn(self)
        with torch.no_grad():
            for c, v in zip(dead, values):
                self.producer[0].weight[c] = 0
                self.producer[1].running_mean[c] = 0
                self.producer[1].running_var[c] = 1 - self.producer[1].eps
                self.producer[1].weight[c] = 1
                self.producer[1].bias[c] = v

    def forward(self, x):
        return self.consumer(self.act(self.producer(x)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dead=st.lists(st.integers(0, 5), min_size=1, max_size=4, unique=True),
       values=st.lists(st.sampled_from([0.0, 0.0, 0.7, -0.4]), min_size=4, max_size=4),
       k=st.sampled_from([1, 3]), padding=st.sampled_from([0, 1]), stride=st.sampled_from([1, 2]),
       act=st.sampled_from(["relu", "relu6", "sigmoid", "none"]))
def test_dead_channel_property(dead, values, k, padding, stride, act):
    fn = {"relu": F.relu, "relu6": F.relu6, "sigmoid": torch.sigmoid, "none": lambda t: t}[act]
    model = _DeadThenConsumer(dead, values, k, padding, stride, fn)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        y = model(x)
        gm = fx.symbolic_trace(model)
        fuse_graph_module(gm, (x,))
        close(gm(x), y)
    after = [np.asarray(v) for v in values[:len(dead)]]
    constants = [float(fn(torch.tensor(v))) for v in after]
    # zero constants always go; non-zero ones only into an unpadded consumer (and one channel stays)
    expected = sum(1 for c in constants if c == 0 or padding == 0)
    expected = min(expected, 5)
    convs = conv_weights(gm)
    if act == "none" and padding == 0:  # nothing between them: `affine` composed the two convs into one
        assert [c[:2] for c in convs] == [(5, 3)]
        return
    producer = [p for p in convs if p[1] == 3][0]
    assert producer[0] == 6 - expected


# ---------------------------------------------------------------- dynamic convolution

@pytest.mark.parametrize("batch", [1, 4])
def test_dynamic_convs_aggregate_to_one_conv_per_layer(batch):
    gm = deployed(DynamicNet(K=4), (batch, 3, 12, 12))
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.conv2d]
    assert len(convs) == 3  # stem + one per dynamic layer (was 1 + 2 x 4)
    assert rule(gm, "dynamic_conv").applied == 2


def test_dynamic_conv_graph_serves_other_batch_sizes():
    model = DynamicNet(K=3)
    gm = deployed(model, (2, 3, 12, 12))
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        close(gm(x), model(x))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]), dilation=st.sampled_from([1, 2]),
       depthwise=st.booleans(), cin=st.sampled_from([2, 4]), K=st.integers(2, 4), batch=st.sampled_from([1, 3]),
       padding=st.sampled_from(["half", 0]))
def test_dynamic_conv_property(k, stride, dilation, depthwise, cin, K, batch, padding):
    torch.manual_seed(k * 100 + K)
    cout = cin if depthwise else 3
    model = DynamicConv(cin, cout, k, stride, groups=cin if depthwise else 1, K=K)
    for conv in model.convs:
        conv.dilation = (dilation, dilation)
        conv.padding = (dilation * (k // 2),) * 2 if padding == "half" else (0, 0)
    x = torch.randn(batch, cin, 11, 11)
    with torch.no_grad():
        y = model(x)
        gm = fx.symbolic_trace(model)
        fuse_graph_module(gm, (x,))
        close(gm(x), y)
    convs = [n for n in gm.graph.nodes if n.target is torch.conv2d]
    assert len(convs) == 1


def test_dynamic_conv_without_sum_to_one_attention():
    """The aggregation needs no softmax: any per-sample scalars work (sigmoid gates here)."""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            g = torch.sigmoid(self.fc(x.mean((2, 3))))
            return sum(g[:, i].view(-1, 1, 1, 1) * c(x) for i, c in enumerate(self.convs)) + x

    gm = deployed(Gated(), (3, 4, 8, 8))
    assert op_counts(gm)["conv2d"] == 1


# ---------------------------------------------------------------- Ghost concat

@pytest.mark.parametrize("enable", [False, True], ids=["default-off", "enabled"])
def test_ghost_concat_fires_only_where_enabled(enable):
    gm = deployed(Ghost(), (2, 8, 9, 9), enable=["ghost_concat"] if enable else [])
    cats = op_counts(gm)["cat"]
    assert cats == (0 if enable else 1)
    assert rule(gm, "ghost_concat").applied == int(enable)
    if enable:  # the cheap depthwise conv now has two outputs per channel
        assert (12, 1, 3, 3) in conv_weights(gm)


def test_ghost_concat_declines_a_relu_on_the_cheap_half_only():
    class Signed(Ghost):
        def forward(self, x):  # the intrinsic half has no ReLU: relu(G(y)) would clip it
            y = self.primary(x)
            return self.consumer(torch.cat([y, F.relu(self.cheap(y))], 1))

    gm = deployed(Signed(), (2, 8, 9, 9), enable=["ghost_concat"])
    assert op_counts(gm)["cat"] == 1
    assert any("intrinsic half" in d.reason and d.rule == "ghost_concat" for d in gm.meta["repfuse_report"].declined)


class _PerChannelGate(nn.Module):
    """SE-style gates [N, C, 1, 1] are not per-sample scalars: the sum must stay K convs."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(2))
        self.fc = nn.Linear(4, 8)

    def forward(self, x):
        g = torch.sigmoid(self.fc(x.mean((2, 3)))).reshape(-1, 2, 4, 1, 1)
        return g[:, 0] * self.convs[0](x) + g[:, 1] * self.convs[1](x)


class _DifferentInputs(nn.Module):
    """Weighted convs of two different tensors are not one dynamic conv."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(2))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        pi = torch.softmax(self.fc(x.mean((2, 3))), 1)
        return pi[:, 0].view(-1, 1, 1, 1) * self.convs[0](x) + pi[:, 1].view(-1, 1, 1, 1) * self.convs[1](F.relu(x))


@pytest.mark.parametrize("model", [_PerChannelGate, _DifferentInputs], ids=["per-channel-gate", "different-inputs"])
def test_dynamic_conv_must_not_fire(model):
    gm = deployed(model(), (3, 4, 8, 8))
    assert op_counts(gm)["conv2d"] == 2
    assert rule(gm, "dynamic_conv").applied == 0
