"""repfuse.deploy's two captures: symbolic_trace with probed sizes (fast), and torch.export (the rest).

Each test compares the deployed model with the training form in torch at sizes other than the example's,
and says which capture it must have used (torch.export.export is watched)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import blocks as B
import repfuse
from repfuse import ShapeGuardError
from repfuse.backends import pytorch as backend
from repfuse.backends.trace import probe_size


@pytest.fixture
def exports(monkeypatch):
    """The calls deploy makes to torch.export.export."""
    calls = []
    real = torch.export.export

    def watched(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", watched)
    return calls


def close(gm, model, *inputs, rtol=1e-4):
    with torch.no_grad():
        want, got = model(*inputs), gm(*inputs)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= rtol * float(want.abs().max())


def counts(gm):
    ops = B.op_counts(gm)
    return sum(ops[k] for k in ("conv2d", "linear")), ops["batch_norm"]


def test_traceable_model_is_captured_without_torch_export(exports):
    model = B.randomize(nn.Sequential(B.RepVGGBlock(4, 8), B.RepVGGBlock(8, 8), nn.AdaptiveAvgPool2d(1))).eval()
    x = torch.randn(2, 4, 16, 16)
    gm = repfuse.deploy(model, (x,))
    assert exports == []
    assert counts(gm) == (2, 0)  # 2 blocks x 3 branches -> 2 convs, every BN folded
    for shape in [(2, 4, 16, 16), (3, 4, 16, 24), (1, 4, 9, 40), (5, 4, 97, 33)]:  # H and W apart: not tied
        close(gm, model, torch.randn(shape))
    with pytest.raises(ShapeGuardError, match="dim 1"):
        gm(torch.randn(2, 5, 16, 16))  # the channels are fixed


class Tokens(nn.Module):
    """Sizes used as values: [B, C, H, W] -> tokens [B, HW, C] -> linear + BN over C -> back to [B, C, H, W]."""

    def __init__(self):
        super().__init__()
        self.conv = B.conv_bn(3, 8, 3, 2, 1)
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        y = self.conv(x)
        n, c, h, w = y.shape
        t = self.fc(y.flatten(2).transpose(1, 2))  # [B, HW, C]
        t = self.bn(t.transpose(1, 2)).transpose(1, 2)
        return t.transpose(1, 2).reshape(n, c, h, w)


def test_sizes_the_graph_computes_stay_symbolic(exports):
    model = B.randomize(Tokens()).eval()
    gm = repfuse.deploy(model, (torch.randn(2, 3, 16, 16),))
    assert exports == []
    assert counts(gm)[1] == 0
    for shape in [(2, 3, 16, 16), (4, 3, 30, 18), (1, 3, 7, 64)]:  # no size of the example baked in
        close(gm, model, torch.randn(shape))


class FixedHead(nn.Module):
    """Flatten into a Linear: the model runs at the example's H and W only; the batch stays free."""

    def __init__(self):
        super().__init__()
        self.body = B.RepVGGBlock(3, 4)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


def test_dims_the_model_fixes_are_guarded(exports):
    model = B.randomize(FixedHead()).eval()
    gm = repfuse.deploy(model, (torch.randn(2, 3, 8, 8),))
    assert exports == []
    close(gm, model, torch.randn(6, 3, 8, 8))
    with pytest.raises(ShapeGuardError, match="fixed at 8"):
        gm(torch.randn(2, 3, 9, 8))


class Untraceable(nn.Module):
    """A border written in place: symbolic_trace cannot assign into a Proxy; torch.export can."""

    def __init__(self):
        super().__init__()
        self.a, self.b = B.conv_bn(4, 4, 3, 1, 1), B.conv_bn(4, 4, 1)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        y[:, :, 0] = 0.0
        return y


def test_untraceable_model_is_captured_with_torch_export(exports):
    model = B.randomize(Untraceable()).eval()
    gm = repfuse.deploy(model, (torch.randn(2, 4, 8, 8),))
    assert len(exports) == 1
    assert counts(gm) == (1, 0)
    close(gm, model, torch.randn(3, 4, 8, 12))


class Counting(nn.Module):
    """State changed in forward: the trace bakes the count it saw, so it does not reproduce the model."""

    def __init__(self):
        super().__init__()
        self.block = B.RepVGGBlock(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.block(x) * self.calls


def test_trace_that_is_not_the_model_is_not_used(exports):
    model = B.randomize(Counting()).eval()
    repfuse.deploy(model, (torch.randn(2, 4, 8, 8),))
    assert len(exports) == 1


@pytest.mark.parametrize("size", [1, 2, 3, 7, 32, 64, 224])
def test_probe_sizes_move_every_downsampled_size(size):
    # a dim after up to 64x downsampling (floor or ceil) must differ between the example and the probe
    for k in range(4):
        grown = probe_size(size, 2, k)
        assert (grown - size) % 2 == 1 and grown - size >= 65
        assert all(grown // s != size // s and -(-grown // s) != -(-size // s) for s in (2, 4, 8, 16, 32, 64))
    assert len({probe_size(size, 2, k) for k in range(4)}) == 4  # distinct dims never look tied
    assert probe_size(size, 0, 0) == size + 1  # a batch grows a little


def test_fast_capture_saves_and_loads(tmp_path):
    model = B.randomize(nn.Sequential(B.RepVGGBlock(3, 4), nn.ReLU())).eval()
    gm = repfuse.deploy(model, (torch.randn(2, 3, 8, 8),))
    torch.save(gm, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    close(loaded, model, torch.randn(3, 3, 10, 12))
    with pytest.raises(ShapeGuardError):
        loaded(torch.randn(3, 4, 10, 12))


def test_report_names_ops_alike_in_both_captures(monkeypatch):
    model = B.randomize(nn.Sequential(B.conv_bn(3, 4, 3, 1, 1), nn.ReLU(), nn.AvgPool2d(2))).eval()
    x = torch.randn(2, 3, 8, 8)
    fast = repfuse.deploy(model, (x,)).meta["repfuse_report"]
    monkeypatch.setattr(backend, "trace", lambda *args: None)
    exported = repfuse.deploy(model, (x,)).meta["repfuse_report"]
    for report in (fast, exported):
        assert report.before.ops["conv2d"] == 1 and report.before.ops["batch_norm"] == 1
        assert report.after.ops["batch_norm"] == 0


class AssertingNorm(nn.BatchNorm2d):
    """timm's norm layers assert the rank: a read of every conv output that must not stop merging."""

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected a 4-D input")
        torch._assert(x.dim() > 1, "expected channels")
        return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                              False, 0.0, self.eps)


def test_rank_reads_do_not_block_merging(exports):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Conv2d(4, 4, 1, bias=False)
            self.na, self.nb = AssertingNorm(4), AssertingNorm(4)

        def forward(self, x):
            return self.na(self.a(x)) + self.nb(self.b(x))

    model = B.randomize(Block()).eval()
    gm = repfuse.deploy(model, (torch.randn(2, 4, 8, 8),))
    assert exports == []
    assert counts(gm) == (1, 0)
    close(gm, model, torch.randn(3, 4, 11, 6))


def test_outputs_with_nan_still_take_the_fast_capture(exports):
    # a random deep network can overflow; NaN must compare equal to NaN when checking the trace
    model = B.randomize(nn.Sequential(B.RepVGGBlock(4, 4), nn.Hardtanh(-1.0, 0.0))).eval()
    class Log(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return torch.log(self.body(x))  # log of values <= 0: -inf and NaN

    wrapped = Log().eval()
    x = torch.randn(2, 4, 8, 8)
    gm = repfuse.deploy(wrapped, (x,))
    assert exports == []
    with torch.no_grad():
        assert torch.allclose(gm(x), wrapped(x), rtol=1e-4, atol=1e-5, equal_nan=True)
    assert counts(gm) == (1, 0)


def test_indexed_tracer_records_what_symbolic_trace_records():
    from torch import fx

    from repfuse.backends.trace import _Tracer

    class Shared(nn.Module):  # a weight read twice, by two names, and a buffer read in forward
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 3, 3, padding=1)
            self.b = self.a
            self.w = nn.Parameter(torch.randn(3, 1, 1))
            self.register_buffer("shift", torch.randn(3, 1, 1))

        def forward(self, x):
            return self.b(self.a(x)) * self.w + self.shift + torch.nn.functional.conv2d(x, self.a.weight, padding=1)

    model = Shared().eval()
    ours = fx.GraphModule(model, _Tracer().trace(model))
    assert ours.code == fx.symbolic_trace(model).code
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(ours(x), model(x))
