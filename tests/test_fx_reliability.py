"""What users bring to the PyTorch entry points that nobody here wrote: size-dependent forwards,
symbolic sizes, per-channel ops on [N, C], dynamic Linear, declines inside opt-in rules, and the
standard torch.compile arguments.  Each case compares with the unfused model run by torch and
asserts what the rewrite did (or must not have done)."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blocks as B
import repfuse
from repfuse.backends import pytorch as backend
from repfuse import ShapeGuardError


def close(out, ref, rtol=1e-5):
    outs, refs = (out, ref) if isinstance(ref, tuple) else ((out,), (ref,))
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape
        assert (o - r).abs().max().item() <= rtol * max(1.0, r.abs().max().item())


def run_both(gm, model, *inputs):
    with torch.no_grad():
        for x in inputs:
            close(gm(x), model(x))


def bn_randomized(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-1, 1, generator=g)
    return model.eval()


# ---------------------------------------------------------------- shapes: right at every size, or refused

class BranchOnWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = B.conv_bn(3, 4, 3, 1, 1)

    def forward(self, x):
        y = self.body(x)
        return y * 2 if x.shape[-1] > 16 else y


def test_forward_that_branches_on_a_size_is_guarded():
    model = B.randomize(BranchOnWidth())
    torch.manual_seed(0)
    gm = repfuse.deploy(model, (torch.randn(2, 3, 20, 20),))
    assert B.op_counts(gm)["batch_norm"] == 0
    run_both(gm, model, torch.randn(3, 3, 24, 18), torch.randn(1, 3, 17, 40))
    with pytest.raises(ShapeGuardError, match="dim 3 is 8"):
        gm(torch.randn(2, 3, 20, 8))  # the other branch: refused, never silently the traced one


def test_example_batch_of_one_fixes_the_batch_loudly():
    model = B.randomize(B.conv_bn(3, 4, 3, 1, 1))
    gm = repfuse.deploy(model, (torch.randn(1, 3, 8, 8),))
    run_both(gm, model, torch.randn(1, 3, 8, 8), torch.randn(1, 3, 5, 11))
    with pytest.raises(ShapeGuardError, match="dim 0 is 2.*fixed at 1"):
        gm(torch.randn(2, 3, 8, 8))


def test_deployed_model_pickles_with_its_guard():
    model = B.randomize(BranchOnWidth())
    gm = repfuse.deploy(model, (torch.randn(2, 3, 20, 20),))
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    run_both(loaded, model, torch.randn(2, 3, 24, 24))
    with pytest.raises(ShapeGuardError):
        loaded(torch.randn(2, 3, 20, 8))


class TokenChain(nn.Module):
    """A scalar affine chain on [N, T, C]: dim 1 is tokens, not channels; T varies at run time."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(x * 2.0 + 1.0) * 0.5 - 3.0


def test_scalar_chain_on_tokens_serves_every_token_count():
    model = TokenChain().eval()
    gm = repfuse.deploy(model, (torch.randn(2, 5, 6),))
    run_both(gm, model, torch.randn(2, 5, 6), torch.randn(3, 9, 6))


class ReshapeFromShape(nn.Module):
    """Attention-style block: sizes read from x.shape drive a reshape (symbolic sizes in the graph)."""

    def __init__(self):
        super().__init__()
        self.qkv = B.conv_bn(8, 24, 1)
        self.proj = B.conv_bn(8, 8, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(n, 3, c, h * w).unbind(1)
        attn = torch.softmax(q.transpose(1, 2) @ k / c ** 0.5, -1)  # [N, HW, HW]
        return self.proj((v @ attn.transpose(1, 2)).reshape(n, c, h, w)) + x


def test_symbolic_sizes_in_the_graph():
    model = B.randomize(ReshapeFromShape())
    gm = repfuse.deploy(model, (torch.randn(2, 8, 6, 6),))
    assert B.op_counts(gm)["batch_norm"] == 0
    run_both(gm, model, torch.randn(2, 8, 6, 6), torch.randn(3, 8, 5, 7))


def test_deploy_leaves_other_compiled_models_alone():
    calls = []

    def counting(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(nn.Linear(4, 4), backend=counting)
    x = torch.randn(2, 4)
    compiled(x)
    repfuse.deploy(B.randomize(B.conv_bn(3, 4, 3, 1, 1)), (torch.randn(2, 3, 8, 8),))
    compiled(x)
    assert len(calls) == 1  # the cache survived: deploy did not reset dynamo


# ---------------------------------------------------------------- per-channel ops on [N, C]

class LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x))


class BNPlusInput(LinearBN):
    def forward(self, x):
        y = self.fc(x)
        return self.bn(y) + y


class TwoBNs(LinearBN):
    def __init__(self):
        super().__init__()
        self.bn2 = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn2(self.bn(x[:, :6]))


class ScaledResidual(LinearBN):
    def __init__(self):
        super().__init__()
        self.register_buffer("c", torch.linspace(-1, 2, 6))

    def forward(self, x):
        y = self.fc(x)
        return y * self.c + y


class BNHead(LinearBN):
    """RepViT/EfficientViT-style BN-Linear classifier head."""

    def forward(self, x):
        return self.fc(F.batch_norm(x, self.bn2_mean, self.bn2_var, self.bn2_w, self.bn2_b, False, 0.1, 1e-5))

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        for name, low, high in (("mean", -1, 1), ("var", 0.5, 2), ("w", 0.5, 1.5), ("b", -1, 1)):
            self.register_buffer(f"bn2_{name}", torch.empty(8).uniform_(low, high, generator=g))


PER_CHANNEL = {"linear-bn": (LinearBN, 0), "bn-plus-input": (BNPlusInput, None), "two-bns": (TwoBNs, None),
               "scaled-residual": (ScaledResidual, None), "bn-linear-head": (BNHead, 0)}


@pytest.mark.parametrize("name", list(PER_CHANNEL))
def test_per_channel_ops_on_flat_features(name):
    cls, bns_after = PER_CHANNEL[name]
    model = bn_randomized(cls())
    gm = repfuse.deploy(model, (torch.randn(4, 8),))
    run_both(gm, model, torch.randn(4, 8), torch.randn(7, 8))
    for _, p in gm.named_parameters():  # F.linear has no groups: no grouped weight may reach it
        assert p.dim() <= 2
    ops = B.op_counts(gm)
    if bns_after is not None:
        assert ops["batch_norm"] == bns_after and ops["linear"] == 1


def test_per_channel_ops_on_flat_features_through_torch_compile():
    rec = []

    def inner(gm, example_inputs):
        rec.append(gm)
        return gm.forward

    torch._dynamo.reset()
    for cls in (TwoBNs, ScaledResidual, BNPlusInput):
        model = bn_randomized(cls())
        compiled = torch.compile(model, backend="repfuse", options={"inner": inner})
        with torch.no_grad():
            for x in (torch.randn(4, 8), torch.randn(4, 8)):
                close(compiled(x), model(x))
    torch._dynamo.reset()


class DynamicLinear(nn.Module):
    """sum_k pi_k(x) * Linear_k(x): CondConv on a [N, C] input."""

    def __init__(self, k=3):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(8, 5) for _ in range(k))
        self.gate = nn.Linear(8, k)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        pi = torch.softmax(self.gate(x), 1)
        return self.bn(sum(pi[:, k:k + 1] * e(x) for k, e in enumerate(self.experts)))


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_linear_is_declined_and_exact(batch):
    model = bn_randomized(DynamicLinear())
    gm = repfuse.deploy(model, (torch.randn(batch, 8),))
    inputs = [torch.randn(batch, 8)] + ([torch.randn(5, 8)] if batch > 1 else [])
    run_both(gm, model, *inputs)
    assert B.op_counts(gm)["linear"] == 4  # gate + 3 experts: per-sample weights would cost more
    assert any("dynamic linear" in d.reason and d.rule == "dynamic_conv" for d in gm.meta["repfuse_report"].declined)


# ---------------------------------------------------------------- declines never escape a rule

class GhostWithBlockers(nn.Module):
    def __init__(self, blocker):
        super().__init__()
        self.primary = B.conv_bn(4, 4, 1)
        self.cheap = B.conv_bn(4, 4, 3, 1, 1, groups=4)
        self.blocker = blocker
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.primary(self.blocker(x))
        return self.out(torch.cat([y, self.cheap(y)], 1))


@pytest.mark.parametrize("blocker", [nn.ReflectionPad2d(1), nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                                     nn.ReplicationPad2d(1), nn.CircularPad2d(1)],
                         ids=["reflect", "avgpool-exclude-pad", "replicate", "circular"])
def test_ghost_concat_with_declined_neighbours(blocker):
    model = B.randomize(GhostWithBlockers(blocker))
    x = torch.randn(2, 4, 8, 8)
    gm = repfuse.deploy(model, (x,), enable=["ghost_concat"])
    run_both(gm, model, x)
    ops = B.op_counts(gm)
    assert ops["cat"] == 0 and ops["batch_norm"] == 0  # ghost_concat still fired next to the blocker


# ---------------------------------------------------------------- torch.compile arguments

@pytest.fixture
def rep_block():
    torch._dynamo.reset()
    yield B.randomize(B.RepVGGBlock(8, 8))
    torch._dynamo.reset()


def test_compile_with_dynamic_shapes(rep_block):
    compiled = torch.compile(rep_block, backend="repfuse", dynamic=True, options={"inner": "eager"})
    with torch.no_grad():
        for shape in ((2, 8, 9, 9), (3, 8, 11, 7)):
            x = torch.randn(shape)
            close(compiled(x), rep_block(x), 1e-4)


def test_compile_accepts_a_mode(rep_block):
    compiled = torch.compile(rep_block, backend="repfuse", mode="max-autotune-no-cudagraphs")
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        close(compiled(x), rep_block(x), 1e-4)
    assert any(g.changed for g in backend.compiled_graphs())


def test_unknown_backend_option_is_one_clear_line(rep_block):
    with pytest.raises(Exception) as info:
        torch.compile(rep_block, backend="repfuse", options={"bogus": 1})(torch.randn(1, 8, 9, 9))
    assert "unknown options ['bogus']" in str(info.value)


# ---------------------------------------------------------------- user mistakes: one clear line

@pytest.mark.parametrize("call, error, text", [
    (lambda: repfuse.deploy(lambda x: x * 2, (torch.randn(2, 3),)), TypeError, "takes a torch.nn.Module"),
    (lambda: repfuse.deploy(nn.Linear(3, 4), 5), TypeError, "example_inputs must be"),
    (lambda: repfuse.deploy(nn.Linear(3, 4), (torch.randn(2, 5),)), repfuse.TraceError, "cannot trace Linear"),
    (lambda: repfuse.deploy(nn.Linear(3, 4), (torch.randn(2, 3),), disable=["bogus"]), ValueError, "unknown rule"),
], ids=["function", "not-a-tuple", "mismatched-input", "unknown-rule"])
def test_deploy_mistakes_are_one_line(call, error, text):
    with pytest.raises(error) as info:
        call()
    assert text in str(info.value) and len(str(info.value).splitlines()) == 1


# ---------------------------------------------------------------- dtype of fused weights across rounds

class LinearBranches(nn.Module):
    """Fuzzer seed 100204: round 1 writes x*s + t as Mul/Add steps; round 2 fuses a region rooted at
    one of them, whose weights must take the model's dtype (float64 here), not a float32 default."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 3)
        self.bn = nn.BatchNorm1d(12)
        self.register_buffer("s", torch.linspace(0.5, 1.5, 12))
        self.register_buffer("t", torch.linspace(-1, 1, 12))

    def forward(self, x):
        y = self.a(x)
        return self.head((y * self.s + self.t + y) + self.bn(self.b(x)) + self.c(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_weights_keep_the_model_dtype(dtype):
    model = bn_randomized(LinearBranches()).to(dtype)
    x = torch.randn(4, 12, dtype=dtype)
    gm = repfuse.deploy(model, (x,))
    with torch.no_grad():
        out = gm(x)
        close(out, model(x))
    assert out.dtype == dtype and all(p.dtype == dtype for p in gm.parameters())
    assert B.op_counts(gm)["batch_norm"] == 0


class FixedSizeHead(torch.nn.Module):
    """A stem and stride-2 convs to a 7x7 map, AvgPool2d(7, 7), view, Linear: torch.export's solver
    cannot capture it with dynamic sizes (it raises instead of specializing)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(8))
        self.stages = torch.nn.Sequential(*[torch.nn.Conv2d(8, 8, 3, 2, 1) for _ in range(3)])
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(self.stem(x), 3, 2, 1)
        x = torch.nn.functional.avg_pool2d(self.stages(x), 7, 7)
        return self.fc(x.view(x.size(0), -1))


def test_deploy_falls_back_to_the_example_sizes_and_leaves_the_inputs_alone(caplog, monkeypatch):
    monkeypatch.setattr(backend, "trace", lambda *args: None)  # the torch.export capture
    model = B.randomize(FixedSizeHead()).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="repfuse"):
        gm = repfuse.deploy(model, (x,))
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-5)
    assert gm.meta["repfuse_report"].after.ops.get("batch_norm", 0) == 0
    assert any("captured at the example's sizes" in r.getMessage() for r in caplog.records)
    torch.export.export(model, (x,))  # the caller's tensor carries no dynamic-dim marks afterwards
