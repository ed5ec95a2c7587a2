"""The algebra against torch: every accepted rule equals the unfused ops; refusals are the unsafe cases."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repfuse.patterns import affine as A
from repfuse.patterns.cost import op_cost

SIZES = (15, 16, 19)  # odd and even inputs exercise stride/padding edge cases; all fit a 7x7 kernel dilated by 2


def run(op: A.AffineConv, x: torch.Tensor) -> torch.Tensor:
    """Apply a canonical op with torch (float64)."""
    w, b = torch.from_numpy(op.weight), torch.from_numpy(op.bias)
    if op.rank == 0:  # [N, C] as a length-1 sequence, so grouped (per-channel) ops run too
        return F.conv1d(x[..., None], w[..., None], b, groups=op.groups)[..., 0]
    flat = [p for pair in reversed(op.pads) for p in pair]
    conv = {1: F.conv1d, 2: F.conv2d}[op.rank]
    return conv(F.pad(x, flat), w, b, op.stride, 0, op.dilation, op.groups)


def close(a, b):
    assert a.shape == b.shape
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= 1e-9 * scale


def random_op(rng, cin, cout, k, stride, pad, dil, groups):
    w = rng.standard_normal((cout, cin // groups, k, k))
    return A.conv(w, rng.standard_normal(cout), stride, pad, dil, groups)


channels = st.sampled_from([1, 2, 4, 6])
kernels = st.integers(1, 7)
strides = st.integers(1, 2)
dils = st.integers(1, 2)


@st.composite
def conv_pair(draw, same_out=True):
    cin = draw(channels)
    cout = draw(channels)
    ops = []
    for _ in range(2):
        g = draw(st.sampled_from([d for d in (1, 2, cin) if cin % d == 0 and cout % d == 0]))
        k = draw(kernels)
        pad = draw(st.integers(0, 3))
        ops.append(dict(k=k, pad=pad, dil=draw(dils), groups=g))
    return cin, cout, draw(strides), ops


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_pair(), st.integers(0, 2**31 - 1))
def test_add_is_exact_or_refused_for_a_reason(pair, seed):
    cin, cout, stride, specs = pair
    rng = np.random.default_rng(seed)
    a, b = (random_op(rng, cin, cout, s["k"], stride, s["pad"], s["dil"], s["groups"]) for s in specs)
    reason = A.check_add(a, b)
    xs = [torch.randn(2, cin, h, h, dtype=torch.float64) for h in SIZES]
    if reason is None:
        fused = A.add(a, b)
        assert fused.groups == math.gcd(a.groups, b.groups)
        for x in xs:
            close(run(fused, x), run(a, x) + run(b, x))
    else:
        # the only refusal for equal channels and strides is an output-size mismatch
        assert "output sizes differ" in reason
        def out(op, h):
            (pb, pe), k, d, s = op.pads[0], op.kernel[0], op.dilation[0], op.stride[0]
            return (h + pb + pe - d * (k - 1) - 1) // s + 1

        assert any(out(a, h) != out(b, h) for h in range(13, 40))


@st.composite
def conv_chain(draw):
    c0, c1, c2 = draw(channels), draw(channels), draw(channels)
    specs = []
    for cin, cout in ((c0, c1), (c1, c2)):
        g = draw(st.sampled_from([d for d in (1, 2, cin) if cin % d == 0 and cout % d == 0]))
        specs.append(dict(cin=cin, cout=cout, k=draw(kernels), stride=draw(strides), pad=draw(st.integers(0, 2)),
                          dil=draw(dils), groups=g))
    return specs, draw(st.booleans())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_chain(), st.integers(0, 2**31 - 1))
def test_compose_is_exact_when_accepted(chain, seed):
    specs, zero_bias = chain
    rng = np.random.default_rng(seed)
    a, b = (random_op(rng, s["cin"], s["cout"], s["k"], s["stride"], s["pad"], s["dil"], s["groups"]) for s in specs)
    if zero_bias:
        a = A.AffineConv(a.weight, np.zeros_like(a.bias), a.stride, a.pads, a.dilation, a.groups)
    reason = A.check_compose(b, a)
    expected_ok = (not b.has_padding()) or (a.is_pointwise() and not np.any(a.bias))
    assert (reason is None) == expected_ok, reason
    if reason is None:
        fused = A.compose(b, a)
        for h in (25, 28, 31):
            x = torch.randn(2, specs[0]["cin"], h, h, dtype=torch.float64)
            mid = run(a, x)
            if min(mid.shape[2:]) < 1 + b.dilation[0] * (b.kernel[0] - 1) - 2 * b.pads[0][0]:
                continue  # the unfused chain itself cannot run on this size
            close(run(fused, x), run(b, mid))


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_batchnorm_and_per_channel_match_torch(rank):
    rng = np.random.default_rng(rank)
    c = 5
    mean, var = rng.standard_normal(c), rng.random(c) + 0.2
    gamma, beta = rng.random(c) + 0.5, rng.standard_normal(c)
    op = A.batchnorm(mean, var, gamma, beta, 1e-5, rank)
    shape = (3, c) + (6,) * rank
    x = torch.randn(shape, dtype=torch.float64)
    t = lambda v: torch.from_numpy(v)  # noqa: E731
    ref = F.batch_norm(x, t(mean), t(var), t(gamma), t(beta), False, 0.0, 1e-5)
    if rank == 0:
        got = x * t(op.weight.reshape(c)) + t(op.bias)
    else:
        got = run(op, x)
    close(got, ref)


@pytest.mark.parametrize("k,s,p,cip,ceil", [(3, 1, 1, True, False), (3, 2, 0, True, False), (2, 2, 0, False, False),
                                            (3, 1, 0, True, True)])
def test_avg_pool_matches_torch(k, s, p, cip, ceil):
    op = A.avg_pool(4, 2, k, s, p, count_include_pad=cip, ceil_mode=ceil)
    x = torch.randn(2, 4, 10, 10, dtype=torch.float64)
    close(run(op, x), F.avg_pool2d(x, k, s, p, ceil_mode=ceil, count_include_pad=cip))


@pytest.mark.parametrize("kwargs,input_size", [
    (dict(padding=1, count_include_pad=False), None),  # border windows divide by fewer taps
    (dict(stride=2, ceil_mode=True), None),  # partial window, size unknown
    (dict(stride=2, ceil_mode=True), (10, 10)),  # (10 - 3) % 2 != 0: partial window
])
def test_avg_pool_refuses_inexact(kwargs, input_size):
    with pytest.raises(A.Declined):
        A.avg_pool(4, 2, 3, input_size=input_size, **kwargs)


def test_biased_pointwise_before_padded_conv_is_refused_and_would_be_wrong():
    rng = np.random.default_rng(0)
    bn = A.per_channel(rng.random(3) + 0.5, rng.standard_normal(3), 2)  # BN with non-zero shift
    conv = random_op(rng, 3, 4, 3, 1, 1, 1, 1)
    assert "bias" in A.check_compose(conv, bn)
    forced = A._compose_general(conv, bn)  # what a careless fold would emit
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    diff = (run(forced, x) - run(conv, run(bn, x))).abs()
    assert diff[..., 1:-1, 1:-1].max() < 1e-9 and diff.max() > 1e-3  # equal inside, wrong at the border


def test_pad_with_response_matches_constant_padding():
    rng = np.random.default_rng(1)
    a = A.compose(A.per_channel(rng.random(3) + 0.5, rng.standard_normal(3), 2), random_op(rng, 2, 3, 1, 1, 0, 1, 1))
    pads = ((1, 1), (2, 2))
    assert A.check_pad_with(a, pads, a.bias) is None
    assert A.check_pad_with(a, pads, a.bias + 0.5) is not None
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    y = run(a, x)
    ref = torch.empty(1, 3, 7, 9, dtype=torch.float64)
    ref[:] = torch.from_numpy(a.bias).view(1, 3, 1, 1)
    ref[:, :, 1:-1, 2:-2] = y
    close(run(A.pad_with(a, pads), x), ref)


def test_concat_matches_torch_cat():
    rng = np.random.default_rng(2)
    a = random_op(rng, 4, 3, 3, 1, 1, 1, 1)
    b = random_op(rng, 4, 2, 1, 1, 0, 1, 1)
    c = random_op(rng, 4, 4, 3, 1, 2, 2, 2)
    assert A.check_concat([a, b, c]) is None
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    close(run(A.concat([a, b, c]), x), torch.cat([run(a, x), run(b, x), run(c, x)], 1))


def test_linear_compose():
    rng = np.random.default_rng(3)
    fc = A.linear(rng.standard_normal((5, 7)), rng.standard_normal(5))
    bn = A.batchnorm(rng.standard_normal(5), rng.random(5) + 0.1, rng.random(5), rng.standard_normal(5), 1e-5, 0)
    x = torch.randn(4, 7, dtype=torch.float64)
    close(run(A.compose(bn, fc), x), run(bn, run(fc, x)))


def test_cost_model_refuses_dense_1x1_plus_depthwise_3x3():
    rng = np.random.default_rng(4)
    dense1 = random_op(rng, 32, 32, 1, 1, 1, 1, 1)  # 1x1 padded 1 so that sizes agree
    dw3 = random_op(rng, 32, 32, 3, 1, 1, 1, 32)
    fused = A.add(dense1, dw3)
    assert fused.groups == 1 and fused.kernel == (3, 3)
    assert op_cost(fused, fused.stride) > op_cost(dense1, (1, 1)) + op_cost(dw3, (1, 1))
