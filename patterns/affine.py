"""The affine-convolution algebra every repfuse rewrite is built on.

Canonical form (N-D, channels first)::

    A(x) = conv(zero_pad(x, pads), W, stride, dilation, groups) + b
    W: [O, I/g, k_1 .. k_n]   b: [O]   pads: ((begin, end), ...) per spatial dim

Linear layers are the same value with n = 0 spatial dims.  Reading the op as
"output index i reads input offsets  i*s - pad_begin + dilation*t  (t < k)"
gives the three rules:

* ``add(A, B)``  for A(x) + B(x): both read the same input with the same
  stride and give the same output size; the fused kernel covers the union of
  both offset sets on one grid, groups become gcd(g_A, g_B).  Zero padding is
  positional, so the sum is exact.
* ``compose(B, A)``  for B(A(x)): exact when B is pointwise and unpadded
  (its taps only ever read real outputs of A), when A is pure zero padding,
  when A is pointwise and unpadded and B reads no padding or A has no bias,
  and when B reads no padding at all.  A padded B after a biased A is the
  trap: B's border sees zeros where the fused op would see A's bias.
* ``concat(A_1 .. A_n)``  stacks output channels after aligning kernels.

A transposed conv (``ConvTranspose``, the adjoint of a conv) is no AffineConv and
nothing composes *into* it; only a per-channel op after it folds, by scaling its
output channels (``then_per_channel``), exactly for any geometry.

A pointwise op (1x1 kernel, stride 1, no padding) acts on every position alike,
so it is the same map at any rank (``at_rank``): it commutes with a transpose or
reshape that keeps the channel axis whole, which is how the planner carries a
linear across ``transpose(1, 2)`` to the BatchNorm1d behind it.

Every check returns a reason string (or None when the rule applies) so users
can see why a region was left alone; the builders assume the check passed.
All arithmetic is float64 numpy; adapters cast back to the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Sequence

import numpy as np

__all__ = [
    "AffineConv", "Declined",
    "conv", "linear", "per_channel", "batchnorm", "identity", "zero_pad",
    "avg_pool", "scale", "channel_vector", "elementwise",
    "check_add", "add", "align", "check_compose", "compose", "check_concat", "concat",
    "check_pad_with", "pad_with", "describe", "at_rank",
    "ConvTranspose", "conv_transpose", "check_then_per_channel", "then_per_channel",
]


class Declined(Exception):
    """A rule or constructor does not apply exactly; the message says why."""


Pads = tuple[tuple[int, int], ...]


@dataclass(frozen=True, eq=False)
class AffineConv:
    """conv(zero_pad(x, pads), weight, stride, dilation, groups) + bias."""

    weight: np.ndarray  # [O, I/g, *kernel]
    bias: np.ndarray  # [O]
    stride: tuple[int, ...]
    pads: Pads
    dilation: tuple[int, ...]
    groups: int = 1

    @property
    def rank(self) -> int:
        """Number of spatial dims (0 for a linear layer)."""
        return len(self.stride)

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    def signature(self) -> tuple:
        """Everything but the numbers: two plans with equal signatures emit the same op."""
        return (self.weight.shape, self.stride, self.pads, self.dilation, self.groups)

    def is_pointwise(self) -> bool:
        """1x1 kernel, stride 1, no padding: out[i] depends on in[i] only."""
        return (all(k == 1 for k in self.kernel) and all(s == 1 for s in self.stride)
                and not self.has_padding())

    def has_padding(self) -> bool:
        return any(b or e for b, e in self.pads)

    def per_channel(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(scale, shift) when this op is y_c = scale_c * x_c + shift_c, else None."""
        c = self.out_channels
        if self.is_pointwise() and self.groups == c and self.in_channels == c:
            return self.weight.reshape(c), self.bias
        return None

    def macs_per_output(self) -> int:
        """Multiply-accumulates per output position (all channels)."""
        return self.out_channels * self.weight.shape[1] * int(np.prod(self.kernel, dtype=np.int64))

    # Offsets, in input coordinates, that output 0 reads along spatial dim d.
    def _first(self, d: int) -> int:
        return -self.pads[d][0]

    def _last(self, d: int) -> int:
        return -self.pads[d][0] + self.dilation[d] * (self.kernel[d] - 1)

    def _size_offset(self, d: int) -> int:
        """Output size is floor((H - 1 + offset) / stride) + 1 for input size H."""
        return self.pads[d][1] - self._last(d)


# ---------------------------------------------------------------- constructors

def as_tuple(v, rank: int) -> tuple[int, ...]:
    if isinstance(v, (int, np.integer)):
        return (int(v),) * rank
    t = tuple(int(x) for x in v)
    if len(t) == 1 and rank > 1:
        t = t * rank
    if len(t) != rank:
        raise ValueError(f"expected {rank} values, got {t}")
    return t


def _pads(padding, rank: int) -> Pads:
    """Accept an int, one int per dim (symmetric) or one (begin, end) pair per dim."""
    if isinstance(padding, (int, np.integer)):
        return ((int(padding), int(padding)),) * rank
    padding = list(padding)
    if all(isinstance(p, (tuple, list)) for p in padding):
        return tuple((int(b), int(e)) for b, e in padding)
    sym = as_tuple(padding, rank)
    return tuple((p, p) for p in sym)


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def conv(weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1) -> AffineConv:
    """An existing convolution; ``padding`` as int, per-dim ints or (begin, end) pairs."""
    w = _f64(weight)
    rank = w.ndim - 2
    b = np.zeros(w.shape[0]) if bias is None else _f64(bias).reshape(w.shape[0])
    pads = _pads(padding, rank)
    if any(p < 0 for pair in pads for p in pair):
        raise Declined("negative padding crops the input")
    return AffineConv(w, b, as_tuple(stride, rank), pads, as_tuple(dilation, rank), int(groups))


def linear(weight, bias=None) -> AffineConv:
    """y = x @ W.T + b on [N, I] input: a conv with no spatial dims."""
    w = _f64(weight)  # [O, I]
    b = np.zeros(w.shape[0]) if bias is None else _f64(bias).reshape(w.shape[0])
    return AffineConv(w, b, (), (), (), 1)


def at_rank(op: AffineConv, rank: int) -> AffineConv:
    """A pointwise op (1x1 kernel, stride 1, no padding) written for `rank` spatial dims.  It acts on every
    position alike, so the same weights serve any layout: a linear on tokens [B, N, C] is a 1x1 conv on the
    transposed [B, C, N], and a BatchNorm1d there is a per-channel linear on the tokens."""
    assert op.is_pointwise(), "only a pointwise op is the same map at every rank"
    w = op.weight.reshape(op.weight.shape[:2] + (1,) * rank)  # [O, I/g, 1 x rank]
    return AffineConv(w, op.bias, (1,) * rank, ((0, 0),) * rank, (1,) * rank, op.groups)


def per_channel(scale, shift, rank: int) -> AffineConv:
    """y_c = scale_c * x_c + shift_c as a depthwise 1x1."""
    s = _f64(scale).reshape(-1)
    t = np.broadcast_to(_f64(shift).reshape(-1), s.shape).copy()
    c = s.shape[0]
    w = s.reshape((c, 1) + (1,) * rank)  # [C, 1, 1..]
    return AffineConv(w, t, (1,) * rank, ((0, 0),) * rank, (1,) * rank, c)


def batchnorm(mean, var, gamma, beta, eps: float, rank: int) -> AffineConv:
    """Inference BatchNorm: scale = gamma / sqrt(var + eps), shift = beta - mean * scale."""
    mean, var = _f64(mean), _f64(var)
    gamma = np.ones_like(mean) if gamma is None else _f64(gamma)
    beta = np.zeros_like(mean) if beta is None else _f64(beta)
    s = gamma / np.sqrt(var + eps)
    return per_channel(s, beta - mean * s, rank)


def identity(channels: int, rank: int) -> AffineConv:
    return per_channel(np.ones(channels), np.zeros(channels), rank)


def zero_pad(channels: int, pads: Pads) -> AffineConv:
    ident = identity(channels, len(pads))
    return AffineConv(ident.weight, ident.bias, ident.stride, tuple(pads), ident.dilation, channels)


def avg_pool(channels: int, rank: int, kernel, stride=None, padding=0, *, count_include_pad: bool = True,
             ceil_mode: bool = False, divisor: int | None = None,
             input_size: Sequence[int] | None = None) -> AffineConv:
    """Average pooling as a depthwise conv with weights 1/divisor.

    Exact only when the divisor never changes across windows: no padding, or
    padding that is counted (count_include_pad), or a fixed divisor; and no
    ceil_mode window hanging past the input (checked when input_size is known).
    """
    k = as_tuple(kernel, rank)
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else as_tuple(stride, rank)
    pads = _pads(padding, rank)
    padded = any(b or e for b, e in pads)
    if padded and not count_include_pad and divisor is None:
        raise Declined("avg pool with padding and count_include_pad=False divides border windows by fewer taps")
    if ceil_mode:
        if input_size is None:
            if any(si != 1 for si in s):
                raise Declined("avg pool with ceil_mode and unknown input size may have partial windows")
        else:
            for h, kk, ss, (b, e) in zip(input_size, k, s, pads):
                if not isinstance(h, int) or (h + b + e - kk) % ss:
                    raise Declined("avg pool with ceil_mode has a partial last window")
    div = float(divisor) if divisor else float(np.prod(k))
    w = np.full((channels, 1) + k, 1.0 / div)  # [C, 1, *k]
    return AffineConv(w, np.zeros(channels), s, pads, (1,) * rank, channels)


def channel_vector(c, value_ndim: int, channels: int, rank: int | None = None) -> np.ndarray:
    """The per-channel values of a constant broadcast over a tensor with `value_ndim` dims whose channel
    axis is followed by `rank` dims (default: channels at axis 1), or Declined when it varies along any
    other axis (or would broadcast the tensor to a larger shape)."""
    c = np.asarray(c)
    if c.size == 1:
        return np.full(channels, float(c.reshape(())))
    axis = 1 if rank is None else value_ndim - 1 - rank
    shape = (1,) * (value_ndim - c.ndim) + c.shape
    if c.ndim > value_ndim or any(n != 1 and not (i == axis and n == channels) for i, n in enumerate(shape)):
        raise Declined("constant operand is not per-channel")
    return c.reshape(-1).astype(np.float64)


def elementwise(kind: str, vector: np.ndarray, constant_first: bool, rank: int) -> AffineConv | None:
    """x + c, x - c, c - x, x * c, c * x, x / c with a per-channel c; None for c / x (not affine)."""
    ones, zeros = np.ones_like(vector), np.zeros_like(vector)
    if kind == "add":
        return per_channel(ones, vector, rank)
    if kind == "sub":
        return per_channel(-ones, vector, rank) if constant_first else per_channel(ones, -vector, rank)
    if kind == "mul":
        return per_channel(vector, zeros, rank)
    if kind == "div" and not constant_first:
        return per_channel(1.0 / vector, zeros, rank)
    return None


def scale(op: AffineConv, factor: float) -> AffineConv:
    return AffineConv(op.weight * factor, op.bias * factor, op.stride, op.pads, op.dilation, op.groups)


# ---------------------------------------------------------------- group helpers

def regroup(weight: np.ndarray, groups: int, new_groups: int) -> np.ndarray:
    """Rewrite a weight with `groups` as one with `new_groups` (a divisor), block-diagonally.

    [O, I/groups, *k] -> [O, I/new_groups, *k]
    """
    if new_groups == groups:
        return weight
    assert groups % new_groups == 0
    r = groups // new_groups  # old groups per new group
    o_per, i_per = weight.shape[0] // groups, weight.shape[1]
    k = weight.shape[2:]
    out = np.zeros((new_groups, r, o_per, r, i_per) + k)
    src = weight.reshape((new_groups, r, o_per, i_per) + k)
    for j in range(r):
        out[:, j, :, j] = src[:, j]
    return out.reshape((weight.shape[0], r * i_per) + k)  # [O, I/new_groups, *k]


# ---------------------------------------------------------------- add

def check_add(a: AffineConv, b: AffineConv) -> str | None:
    if a.rank != b.rank:
        return f"spatial ranks differ ({a.rank} vs {b.rank})"
    if a.in_channels != b.in_channels or a.out_channels != b.out_channels:
        return (f"channel counts differ ({a.in_channels}->{a.out_channels} vs "
                f"{b.in_channels}->{b.out_channels})")
    if a.stride != b.stride:
        return f"strides differ ({a.stride} vs {b.stride})"
    for d in range(a.rank):
        if a._size_offset(d) != b._size_offset(d):
            return f"output sizes differ along spatial dim {d} (padding does not line up)"
    return None


def _grid(spans: list[tuple[int, int, int, int]]) -> tuple[int, int, int]:
    """Common grid for ops given as (first offset, dilation, kernel, shift): returns (first, step, size)."""
    first = min(f for f, _, _, _ in spans)
    last = max(f + dil * (k - 1) for f, dil, k, _ in spans)
    steps = [dil for _, dil, k, _ in spans if k > 1] + [f - first for f, _, _, _ in spans]
    step = reduce(math.gcd, steps, 0) or 1
    return first, step, (last - first) // step + 1


def _aligned(ops: Sequence[AffineConv], groups: int) -> tuple[list[np.ndarray], Pads, tuple[int, ...]]:
    """Place every op's kernel on one common offset grid (and common groups).

    Returns the padded weights, the fused pads and the fused dilation.
    """
    rank = ops[0].rank
    firsts, steps, sizes, pads = [], [], [], []
    for d in range(rank):
        first, step, size = _grid([(op._first(d), op.dilation[d], op.kernel[d], 0) for op in ops])
        firsts.append(first)
        steps.append(step)
        sizes.append(size)
        last = first + step * (size - 1)
        pads.append((-first, ops[0]._size_offset(d) + last))
    out = []
    for op in ops:
        w = regroup(op.weight, op.groups, groups)
        big = np.zeros(w.shape[:2] + tuple(sizes))
        index = [slice(None), slice(None)]
        for d in range(rank):
            start = (op._first(d) - firsts[d]) // steps[d]
            step = op.dilation[d] // steps[d] if op.kernel[d] > 1 else 1
            index.append(slice(start, start + step * (op.kernel[d] - 1) + 1, step))
        big[tuple(index)] = w
        out.append(big)
    return out, tuple(pads), tuple(steps)


def align(ops: Sequence[AffineConv]) -> list[AffineConv]:
    """The same ops written on one geometry (kernel grid, pads, dilation, gcd of groups), so their
    weights can be summed or stacked; `check_add` must hold pairwise."""
    g = reduce(math.gcd, (op.groups for op in ops))
    ws, pads, dil = _aligned(ops, g)
    return [AffineConv(w, op.bias, op.stride, pads, dil, g) for w, op in zip(ws, ops)]


def add(a: AffineConv, b: AffineConv) -> AffineConv:
    g = math.gcd(a.groups, b.groups)
    (wa, wb), pads, dil = _aligned([a, b], g)
    return AffineConv(wa + wb, a.bias + b.bias, a.stride, pads, dil, g)


# ---------------------------------------------------------------- concat

def check_concat(ops: Sequence[AffineConv]) -> str | None:
    first = ops[0]
    for op in ops[1:]:
        if op.rank != first.rank:
            return "spatial ranks differ"
        if op.in_channels != first.in_channels:
            return "branches read different channel counts"
        if op.stride != first.stride:
            return f"strides differ ({first.stride} vs {op.stride})"
        if any(op._size_offset(d) != first._size_offset(d) for d in range(op.rank)):
            return "output sizes differ (padding does not line up)"
    return None


def concat(ops: Sequence[AffineConv]) -> AffineConv:
    """Stack output channels.  A grouped op keeps its groups only when it stands
    alone: after concatenation output block j would no longer read input group j."""
    g = ops[0].groups if len(ops) == 1 else 1
    ws, pads, dil = _aligned(ops, g)
    w = np.concatenate(ws, axis=0)
    return AffineConv(w, np.concatenate([op.bias for op in ops]), ops[0].stride, pads, dil, g)


# ---------------------------------------------------------------- compose

def _is_pure_padding(op: AffineConv) -> bool:
    """Identity weights, no bias, stride 1: the op only zero-pads its input."""
    c = op.out_channels
    return (all(k == 1 for k in op.kernel) and all(s == 1 for s in op.stride) and op.groups == c
            and op.in_channels == c and bool(np.all(op.weight == 1)) and not np.any(op.bias))


def check_compose(b: AffineConv, a: AffineConv) -> str | None:
    """Can b(a(x)) be one op?  None when exact, else the reason it is not."""
    if a.rank != b.rank:
        return f"spatial ranks differ ({a.rank} vs {b.rank})"
    if a.out_channels != b.in_channels:
        return f"channel mismatch ({a.out_channels} outputs feed {b.in_channels} inputs)"
    if not b.has_padding():
        return None  # b only reads outputs a really computed
    if _is_pure_padding(a):
        return None  # zero padding twice is still zero padding
    if a.is_pointwise() and not np.any(a.bias):
        return None  # a maps the zero border to zero
    if a.is_pointwise():
        return "the second op pads with zeros where the first op's bias would be (border differs)"
    return "the second op reads zero padding of an output the first op computes (border differs)"


def _channel_product(wb: np.ndarray, gb: int, wa: np.ndarray, ga: int) -> tuple[np.ndarray, int]:
    """Channel product of a pointwise slice of b ([O, C/gb]) with a's weight ([C, I/ga, *k])."""
    g = math.gcd(ga, gb)
    wb = regroup(wb, gb, g)
    wa = regroup(wa, ga, g)
    o, c_per = wb.shape[0], wb.shape[1]
    k = wa.shape[2:]
    out = np.matmul(wb.reshape(g, o // g, c_per),  # [g, O/g, C/g]
                    wa.reshape(g, c_per, -1))  # [g, C/g, I/g * prod(k)]
    return out.reshape((o, wa.shape[1]) + k), g  # [O, I/g, *k]


def compose(b: AffineConv, a: AffineConv) -> AffineConv:
    """b(a(x)) as one op; call check_compose first."""
    pc_b, pc_a = b.per_channel(), a.per_channel()
    if pc_b is not None:  # scale a's output channels
        s, t = pc_b
        w = a.weight * s.reshape((-1,) + (1,) * (a.weight.ndim - 1))
        return AffineConv(w, s * a.bias + t, a.stride, a.pads, a.dilation, a.groups)
    if _is_pure_padding(a):
        pads = tuple((pa[0] + pb[0], pa[1] + pb[1]) for pa, pb in zip(a.pads, b.pads))
        return AffineConv(b.weight, b.bias, b.stride, pads, b.dilation, b.groups)
    if pc_a is not None and not a.has_padding():  # scale b's input channels
        s, t = pc_a
        idx = _input_index(b)
        w = b.weight * s[idx].reshape(idx.shape + (1,) * b.rank)
        bias = b.bias + _through_taps(b, t)
        return AffineConv(w, bias, b.stride, b.pads, b.dilation, b.groups)
    return _compose_general(b, a)


def _compose_general(b: AffineConv, a: AffineConv) -> AffineConv:
    rank = a.rank
    # b's tap u reads a's output u*dil_b (b has no padding, or a is pointwise and
    # unpadded so a's grid is the input grid); in input coordinates that is
    # first_a + u*dil_b*stride_a + t*dil_a for a's tap t.
    b_pads = b.pads if a.is_pointwise() else ((0, 0),) * rank
    step, size, pads, firsts = [], [], [], []
    for d in range(rank):
        tap_b = b.dilation[d] * a.stride[d]
        first = a._first(d) - b_pads[d][0] * a.stride[d]
        last = first + tap_b * (b.kernel[d] - 1) + a.dilation[d] * (a.kernel[d] - 1)
        g = math.gcd(tap_b if b.kernel[d] > 1 else 0, a.dilation[d] if a.kernel[d] > 1 else 0) or 1
        step.append(g)
        size.append((last - first) // g + 1)
        firsts.append(first)
        if a.is_pointwise():
            pads.append(b.pads[d])
        else:
            pads.append(a.pads[d])
    w = None
    groups = 1
    for u in np.ndindex(*b.kernel):
        part, groups = _channel_product(b.weight[(slice(None), slice(None)) + u], b.groups, a.weight, a.groups)
        if w is None:
            w = np.zeros(part.shape[:2] + tuple(size))
        index = [slice(None), slice(None)]
        for d in range(rank):
            start = (u[d] * b.dilation[d] * a.stride[d]) // step[d]
            st = a.dilation[d] // step[d] if a.kernel[d] > 1 else 1
            index.append(slice(start, start + st * (a.kernel[d] - 1) + 1, st))
        w[tuple(index)] += part
    stride = tuple(sa * sb for sa, sb in zip(a.stride, b.stride))
    return AffineConv(w, b.bias + _through_taps(b, a.bias), stride, tuple(pads), tuple(step), groups)


def _input_index(b: AffineConv) -> np.ndarray:
    """[O, C/g]: the global input channel that b.weight[o, j] reads."""
    c_per = b.weight.shape[1]
    o_per = b.out_channels // b.groups
    return (np.arange(b.out_channels) // o_per)[:, None] * c_per + np.arange(c_per)[None, :]


def _through_taps(b: AffineConv, vec: np.ndarray) -> np.ndarray:
    """[O]: b applied (weights only) to a constant input whose channel c holds vec[c]."""
    summed = b.weight.reshape(b.out_channels, b.weight.shape[1], -1).sum(2)  # [O, C/g]
    return (summed * vec[_input_index(b)]).sum(1)


# ---------------------------------------------------------------- padding with a constant

def check_pad_with(a: AffineConv, pads: Pads, values: np.ndarray, rtol: float = 1e-5) -> str | None:
    """pad_v(a(x)) is a(x) with more zero padding iff v is what a gives a zero input.

    `rtol` is the precision v was computed in: a model in fp16 computes its fill
    value in fp16, so it matches the float64 response only to fp16 rounding.
    """
    if a.rank != len(pads):
        return "padding rank differs from the op's"
    if not a.is_pointwise():
        return "padding value can only be matched for a pointwise, unpadded op"
    v = np.broadcast_to(_f64(values).reshape(-1), a.bias.shape)
    tol = rtol * max(1.0, float(np.abs(a.bias).max(initial=0.0)))
    if not np.allclose(v, a.bias, rtol=rtol, atol=tol):
        return "pad value differs from the op's response to a zero input"
    return None


def pad_with(a: AffineConv, pads: Pads) -> AffineConv:
    return AffineConv(a.weight, a.bias, a.stride, tuple(pads), a.dilation, a.groups)


# ---------------------------------------------------------------- transposed convolution

@dataclass(frozen=True, eq=False)
class ConvTranspose:
    """conv_transpose(x, weight, stride, pads, output_padding, dilation, groups) + bias: input position i
    scatters its kernel to outputs i*stride - pad_begin + dilation*t; output_padding adds outputs at the end."""

    weight: np.ndarray  # [I, O/g, *kernel]
    bias: np.ndarray  # [O]
    stride: tuple[int, ...]
    pads: Pads
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int = 1

    @property
    def rank(self) -> int:
        return len(self.stride)

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    def signature(self) -> tuple:
        return (self.weight.shape, self.stride, self.pads, self.output_padding, self.dilation, self.groups, "T")


def conv_transpose(weight, bias=None, stride=1, padding=0, output_padding=0, dilation=1,
                   groups: int = 1) -> ConvTranspose:
    """An existing transposed convolution; ``padding`` as for `conv`."""
    w = _f64(weight)  # [I, O/g, *k]
    rank, out = w.ndim - 2, w.shape[1] * int(groups)
    b = np.zeros(out) if bias is None else _f64(bias).reshape(out)
    return ConvTranspose(w, b, as_tuple(stride, rank), _pads(padding, rank), as_tuple(output_padding, rank),
                         as_tuple(dilation, rank), int(groups))


def check_then_per_channel(t: ConvTranspose, b: AffineConv) -> str | None:
    """Can b(t(x)) be one transposed conv?  Only when b scales and shifts t's output channels."""
    if b.per_channel() is None:
        return "only per-channel ops fold into a transposed conv"
    if b.rank != t.rank or b.out_channels != t.out_channels:
        return (f"per-channel op over {b.out_channels} channels and {b.rank} spatial dims after a transposed "
                f"conv with {t.out_channels} and {t.rank}")
    return None


def then_per_channel(t: ConvTranspose, b: AffineConv) -> ConvTranspose:
    """b(t(x)) with b per-channel (y_o = s_o y_o + c_o): W'[i, j] = s_o W[i, j] for the output channel
    o = group(i) * O/g + j that W[i, j] writes, b' = s b + c; call check_then_per_channel first."""
    s, c = b.per_channel()
    g, rank = t.groups, t.rank
    w = t.weight.reshape((g, -1) + t.weight.shape[1:])  # [g, I/g, O/g, *k]
    w = w * s.reshape((g, 1, -1) + (1,) * rank)  # s as [g, 1, O/g, 1 x rank]
    return ConvTranspose(w.reshape(t.weight.shape), s * t.bias + c, t.stride, t.pads, t.output_padding,  # [I, O/g, *k]
                         t.dilation, g)


def describe(op: AffineConv) -> str:
    """One line for reports: "conv 64->64 k3x3 s1 g1", "linear 128->10"."""
    if op.rank == 0:
        return f"linear {op.in_channels}->{op.out_channels}"
    k = "x".join(map(str, op.kernel))
    s = "x".join(map(str, op.stride))
    extra = "" if all(d == 1 for d in op.dilation) else f" d{'x'.join(map(str, op.dilation))}"
    return f"conv {op.in_channels}->{op.out_channels} k{k} s{s} g{op.groups}{extra}"
