"""Differential fuzzing of repfuse: random training-form blocks over the exactness traps, and one runner per IR.

`make_block(seed)` builds a small `torch.nn.Module` (a `FuzzBlock`) from a seeded numpy RNG: parallel
branches summed or concatenated (convs with kernel 1/2/3/5, stride, symmetric / asymmetric / non-zero /
reflect / replicate / circular padding, dilation, groups and depthwise), BatchNorm with random running
statistics (affine on and off) before and after convs, biased convs before padded convs, per-channel
Mul/Add by constants, identity shortcuts, average pools with count_include_pad and ceil_mode, branches
whose output sizes agree only at the example size, shared modules and tied weights, concat then conv,
DBB's BN-and-pad (with the right and with a wrong fill), dynamic convolution, zeroed (dead) output
channels, Ghost concat(y, dwconv(y)) with the ghost rule on or off, non-affine blockers (ReLU, max pool,
sigmoid), 1-D convs and Linear (+BatchNorm1d) on [N, C], [B, T, C] and [N, H, W, C] inputs, and now
and then a forward that branches on an input size.  Every block carries a description (`block.desc`),
its layout, an example input and second input sizes (other batch, other H/W).

Runners (`run_fx`, `run_compile`, `run_onnx`, `run_tvm`) compare the rewritten model with the unfused
torch model in float64 (FX, torch.compile; FX also in fp16 for some blocks) or float32 with a tolerance
relative to the output scale (ONNX, TVM), at the example size and at a second size.  Each returns a
`Result`: ok / wrong / crash / skip (the *original* could not be exported: not repfuse's fault), whether
the rewrite fused anything, and a signature that groups failures into classes.

Replay one block:  python benchmarks/fuzz.py --ir fx --seed 1234 --blocks 1 -v
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import re
import traceback
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import blocks

warnings.filterwarnings("ignore")
for _name in ("torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
              "torch._subclasses.fake_tensor"):
    logging.getLogger(_name).setLevel(logging.ERROR)

IRS = ("fx", "onnx", "compile", "tvm")


class single_thread:
    """torch on one intra-op thread while fuzzing (tiny tensors: threads only add overhead, and the
    machines running this are shared); restores the previous setting."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)
REPFUSE_DIRS = tuple(os.sep + d + os.sep for d in ("passes", "patterns", "backends", "repfuse"))


# ====================================================================== modules the generator composes

@contextlib.contextmanager
def quiet_fds():
    """Silence C++ prints (the TorchScript exporter's graph dumps, TVM's warnings) at the fd level."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


def _pad_call(x, pads, mode, value):
    if mode == "constant":
        return F.pad(x, pads, mode="constant", value=value)
    return F.pad(x, pads, mode=mode)


class Conv(nn.Module):
    """An nn.Conv1d/2d, optionally after an explicit F.pad (asymmetric, any mode, any constant)."""

    def __init__(self, nd, cin, cout, k, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", pre_pad=None, pad_mode="constant", pad_value=0.0):
        super().__init__()
        cls = nn.Conv2d if nd == 2 else nn.Conv1d
        self.conv = cls(cin, cout, k, stride, padding, dilation=dilation, groups=groups, bias=bias,
                        padding_mode=padding_mode)
        self.pre_pad = list(pre_pad) if pre_pad else None
        self.pad_mode, self.pad_value = pad_mode, float(pad_value)

    def forward(self, x):
        if self.pre_pad:
            x = _pad_call(x, self.pre_pad, self.pad_mode, self.pad_value)
        return self.conv(x)


class ChannelAffine(nn.Module):
    """x * scale + shift with per-channel (or scalar) constants; `residual` adds x back (x*c + x)."""

    def __init__(self, c, nd, axis, scale, shift, residual=False, rng=None):
        super().__init__()
        self.axis, self.nd, self.residual = axis, nd, residual
        shape = [1] * (nd + 2) if axis == 1 else [c]
        if axis == 1:
            shape[1] = c
        self.has_scale, self.has_shift = scale != "none", shift
        n = 1 if scale == "scalar" else c
        sc = torch.tensor(rng.uniform(0.5, 1.5, n) * rng.choice([-1, 1], n), dtype=torch.float32)
        self.register_buffer("scale", sc.view(shape) if n > 1 else sc.view([1] * len(shape)))
        self.register_buffer("shift", torch.tensor(rng.normal(0, 0.5, c), dtype=torch.float32).view(shape))

    def forward(self, x):
        y = x
        if self.has_scale:
            y = y * self.scale
        if self.has_shift:
            y = y + self.shift
        return y + x if self.residual else y


class Pad(nn.Module):
    def __init__(self, pads, mode, value):
        super().__init__()
        self.pads, self.mode, self.value = list(pads), mode, float(value)

    def forward(self, x):
        return _pad_call(x, self.pads, self.mode, self.value)


class Blocker(nn.Module):
    def __init__(self, kind, nd=2):
        super().__init__()
        self.kind, self.nd = kind, nd

    def forward(self, x):
        if self.kind == "relu":
            return F.relu(x)
        if self.kind == "sigmoid":
            return torch.sigmoid(x)
        if self.kind == "gelu":
            return F.gelu(x)
        if self.nd == 2:
            return F.max_pool2d(x, 3, 1, 1)
        return F.max_pool1d(x, 3, 1, 1)


class Chain(nn.Module):
    def __init__(self, units):
        super().__init__()
        self.units = nn.ModuleList(units)

    def forward(self, x):
        for u in self.units:
            x = u(x)
        return x


class Branches(nn.Module):
    """Parallel chains on one input, summed or concatenated on `dim`; `identity` adds x itself."""

    def __init__(self, branches, how="sum", identity=False, dim=1):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.how, self.identity, self.dim = how, identity, dim

    def forward(self, x):
        ys = [b(x) for b in self.branches]
        if self.how == "cat":
            return torch.cat(ys, self.dim)
        y = ys[0]
        for z in ys[1:]:
            y = y + z
        return y + x if self.identity else y


class BNAndPad(blocks.BNAndPad):
    """DBB's BN-and-pad with the BN's zero response as the border fill (`right_fill`), or a wrong constant."""

    def __init__(self, c, pad, right_fill, rng):
        super().__init__(c, pad)
        self.right_fill = right_fill
        self.register_buffer("wrong", torch.tensor(rng.normal(0, 1, c), dtype=torch.float32))

    def fill(self) -> torch.Tensor:
        return super().fill() if self.right_fill else self.wrong


class SharedTwice(nn.Module):
    """One module read twice: m(x) + m(pre(x)) or m(m(x))."""

    def __init__(self, m, pre=None, nested=False):
        super().__init__()
        self.m, self.pre, self.nested = m, pre, nested

    def forward(self, x):
        if self.nested:
            return self.m(self.m(x))
        return self.m(x) + self.m(self.pre(x))


class DynamicConv(nn.Module):
    """sum_k gate_k(x) * conv_k(x), gate = softmax/sigmoid(Linear(mean(x))); per_channel gates must not
    aggregate.  Works on [N, C, *spatial] (convs) and on [N, C] (linears)."""

    def __init__(self, experts, cin, gate="softmax", per_channel=False, cout=None):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        k = len(experts)
        self.per_channel = per_channel
        self.fc = nn.Linear(cin, k * cout if per_channel else k)
        self.gate, self.k, self.cout = gate, k, cout

    def forward(self, x):
        ctx = x.mean(tuple(range(2, x.dim()))) if x.dim() > 2 else x
        logits = self.fc(ctx)
        if self.per_channel:
            logits = logits.view(x.shape[0], self.k, self.cout)
        g = torch.softmax(logits, 1) if self.gate == "softmax" else torch.sigmoid(logits)
        y = 0
        for i, e in enumerate(self.experts):
            gi = g[:, i]
            gi = gi.reshape(gi.shape + (1,) * (x.dim() - gi.dim()))
            y = y + gi * e(x)
        return y


class Ghost(nn.Module):
    """GhostNet: y = primary(x); cat(y, cheap(y)) with cheap a depthwise conv (+BN)."""

    def __init__(self, primary, cheap):
        super().__init__()
        self.primary, self.cheap = primary, cheap

    def forward(self, x):
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], 1)


class ShapeBranch(nn.Module):
    """A forward that branches on the last input size (a traced capture keeps one branch)."""

    def __init__(self, a, b, threshold):
        super().__init__()
        self.a, self.b, self.threshold = a, b, threshold

    def forward(self, x):
        if x.shape[-1] > self.threshold:
            return self.a(x)
        return self.b(x)


class Gate(nn.Module):
    """Per-sample gating, not affine in x: x * sigmoid(mean(x)) (one scalar per sample) or squeeze-excite
    x * sigmoid(conv1x1(mean over space)) (one scalar per sample and channel)."""

    def __init__(self, c, nd, kind):
        super().__init__()
        self.kind = kind
        self.fc = (nn.Conv2d if nd == 2 else nn.Conv1d)(c, c, 1) if kind == "se" else None

    def forward(self, x):
        if self.kind == "scalar":
            return x * torch.sigmoid(x.mean(tuple(range(1, x.dim())), keepdim=True))
        return x * torch.sigmoid(self.fc(x.mean(tuple(range(2, x.dim())), keepdim=True)))


class TokenLinear(nn.Module):
    """Attention-style: [N, C, *S] -> tokens [N, S, C] -> Linear -> back, reshaped from x.shape."""

    def __init__(self, c, cout, bias):
        super().__init__()
        self.fc = nn.Linear(c, cout, bias=bias)

    def forward(self, x):
        n, c = x.shape[0], x.shape[1]
        t = x.reshape(n, c, -1).transpose(1, 2)
        y = self.fc(t).transpose(1, 2)
        return y.reshape(n, y.shape[1], *x.shape[2:])


class Linear(nn.Module):
    def __init__(self, cin, cout, bias=True):
        super().__init__()
        self.fc = nn.Linear(cin, cout, bias=bias)

    def forward(self, x):
        return self.fc(x)


class BNLastDim(nn.Module):
    """BatchNorm over the channels of a channels-last tensor: [N, C] directly (BatchNorm1d), [B, T, C]
    transposed (BatchNorm1d), [N, H, W, C] permuted (BatchNorm2d)."""

    def __init__(self, c, affine=True, rank=2):
        super().__init__()
        self.bn = (nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d)(c, affine=affine)

    def forward(self, x):
        if x.dim() == 2:
            return self.bn(x)
        if x.dim() == 3:
            return self.bn(x.transpose(1, 2)).transpose(1, 2)
        return self.bn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class FuzzBlock(nn.Module):
    def __init__(self, body, seed, desc, layout, shape, second, enable=(), fp16=False, tags=()):
        super().__init__()
        self.body = body
        self.seed, self.desc, self.layout = seed, desc, layout
        self.shape, self.second = tuple(shape), [tuple(s) for s in second]
        self.enable, self.fp16, self.tags = list(enable), fp16, sorted(set(tags))
        self.init_inputs = self.compile_dynamic = False

    def forward(self, x):
        return self.body(x)

    def example(self, shape=None, dtype=torch.float64, which=0):
        g = torch.Generator().manual_seed(self.seed * 7 + which)
        return torch.randn(shape or self.shape, generator=g, dtype=torch.float64).to(dtype)

    def dynamic_dims(self):
        return {"nchw": [0, 2, 3], "ncw": [0, 2], "nc": [0], "ntc": [0, 1], "nhwc": [0, 1, 2]}[self.layout]

    def __repr__(self):
        flags = "".join([" [fp16 in fx]" if self.fp16 else "", " [onnx initializers as inputs]" if self.init_inputs else "",
                         " [compile dynamic=True]" if self.compile_dynamic else "",
                         f" [enable={self.enable}]" if self.enable else ""])
        return f"FuzzBlock(seed={self.seed}, {self.layout} {self.shape}: {self.desc}){flags}"


# ====================================================================== the generator

class _Gen:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.tags: set[str] = set()
        self.enable: list[str] = []
        self.rank = 4

    # -- helpers
    def p(self, prob):
        return bool(self.rng.random() < prob)

    def pick(self, items, weights=None):
        if weights is not None:
            w = np.asarray(weights, dtype=float)
            return items[int(self.rng.choice(len(items), p=w / w.sum()))]
        return items[int(self.rng.integers(len(items)))]

    @staticmethod
    def out_shape(mod, shape):
        with torch.no_grad():
            return tuple(mod(torch.zeros(shape)).shape)

    # -- conv geometry
    def conv(self, nd, cin, cout, stride=None, *, k=None, padding="any", groups=None, bias=None, dead=True):
        rng = self.rng
        if k is None:
            k = self.pick([1, 2, 3, 5], [0.35, 0.1, 0.4, 0.15])
        kk = k
        if nd == 2 and k in (3, 5) and self.p(0.15):
            kk = self.pick([(1, k), (k, 1)])
            self.tags.add("asym-kernel")
        stride = stride if stride is not None else self.pick([1, 2], [0.8, 0.2])
        dil = 2 if (k > 1 and self.p(0.15)) else 1
        if dil > 1:
            self.tags.add("dilation")
        if stride > 1:
            self.tags.add("stride")
        ks = kk if isinstance(kk, tuple) else (kk,) * nd
        half = [(kd - 1) * dil // 2 for kd in ks]
        same = tuple(half) if nd == 2 else half[0]
        padding_arg, pre, mode, value, pmode = 0, None, "constant", 0.0, "zeros"
        choice = self.pick(["same", "random", "none", "pre", "mode"], [0.5, 0.15, 0.15, 0.12, 0.08]) \
            if padding == "any" else padding
        if choice == "same":
            padding_arg = same
        elif choice == "random":
            padding_arg = int(rng.integers(0, max(half) + 2))
        elif choice == "pre":
            pre = [int(v) for v in rng.integers(0, 3, 2 * nd)]
            mode = self.pick(["constant", "constant", "reflect", "replicate", "circular"])
            value = 0.0 if mode != "constant" or self.p(0.5) else float(rng.normal(0, 1))
            self.tags.add(f"prepad-{mode}{'-nonzero' if value else ''}")
        elif choice == "mode":
            padding_arg = same
            pmode = self.pick(["reflect", "replicate", "circular"])
            if max(half) > 0:
                self.tags.add(f"padding_mode-{pmode}")
            else:
                pmode = "zeros"
        if groups is None:
            opts, w = [1], [0.6]
            if cout % cin == 0:
                opts.append(cin)
                w.append(0.25)
            g = math.gcd(cin, cout)
            if g > 1 and g != cin:
                opts.append(int(self.pick([d for d in range(2, g + 1) if g % d == 0])))
                w.append(0.15)
            groups = self.pick(opts, w)
        if groups > 1:
            self.tags.add("depthwise" if groups == cin else "groups")
        bias = self.p(0.5) if bias is None else bias
        m = Conv(nd, cin, cout, kk, stride, padding_arg, dil, groups, bias, pmode, pre, mode, value)
        if dead and cout > 1 and self.p(0.1):
            chans = sorted(set(int(c) for c in rng.integers(0, cout, 1 + int(rng.integers(0, 2)))))
            with torch.no_grad():
                m.conv.weight[chans] = 0
            self.tags.add("dead-channels")
        desc = f"conv{nd}d({cin}->{cout},k={kk},s={stride},p={padding_arg},d={dil},g={groups},bias={bias}"
        if pre:
            desc += f",pre_pad={pre}:{mode}{'=' + format(value, '.2f') if value else ''}"
        if pmode != "zeros":
            desc += f",{pmode}"
        return m, desc + ")"

    def bn(self, nd, c):
        affine = self.p(0.8)
        self.tags.add("bn" if affine else "bn-nonaffine")
        return (nn.BatchNorm2d if nd == 2 else nn.BatchNorm1d)(c, affine=affine), f"bn({c}{'' if affine else ',noaffine'})"

    def chan(self, nd, c, axis=1):
        scale = self.pick(["channel", "scalar", "none"], [0.6, 0.2, 0.2])
        shift = scale == "none" or self.p(0.5)
        residual = self.p(0.15)
        self.tags.add("channel-affine")
        m = ChannelAffine(c, nd, axis, scale, shift, residual, self.rng)
        return m, f"mul/add(scale={scale},shift={shift}{',+x' if residual else ''})"

    def avgpool(self, nd):
        k = self.pick([2, 3])
        s = self.pick([1, 2, k])
        p = int(self.rng.integers(0, k // 2 + 1))
        cip, ceil = self.p(0.5), self.p(0.3)
        self.tags.add(f"avgpool{'-cip' if cip else '-nocip'}{'-ceil' if ceil else ''}")
        cls = nn.AvgPool2d if nd == 2 else nn.AvgPool1d
        return cls(k, s, p, ceil_mode=ceil, count_include_pad=cip), f"avgpool(k={k},s={s},p={p},cip={cip},ceil={ceil})"

    def pad(self, nd):
        pads = [int(v) for v in self.rng.integers(0, 3, 2 * nd)]
        mode = self.pick(["constant", "constant", "reflect", "replicate", "circular"])
        value = float(self.rng.normal(0, 1)) if mode == "constant" and self.p(0.5) else 0.0
        self.tags.add(f"pad-{mode}{'-nonzero' if value else ''}")
        return Pad(pads, mode, value), f"pad({pads},{mode}{'=' + format(value, '.2f') if value else ''})"

    def blocker(self, nd):
        kind = self.pick(["relu", "maxpool", "sigmoid"])
        self.tags.add("blocker")
        return Blocker(kind, nd), kind

    # -- structured units over [N, C, *spatial]; each returns (module, desc, out_shape)
    def unit(self, nd, shape, depth=0, allow_big=True):
        kinds = ["conv", "bn", "chan", "avgpool", "pad", "blocker", "sum", "cat", "bnpad", "shared", "dyn",
                 "ghost", "bias-then-padded", "bn-then-padded", "shape-branch", "gate", "tokens"]
        weights = [3, 1.2, 0.8, 0.6, 0.5, 0.5, 3, 1, 0.7, 0.6, 0.6, 0.5, 0.8, 0.8, 0.08, 0.3, 0.3]
        if depth > 0 or not allow_big:
            weights = [w if k in ("conv", "bn", "chan", "avgpool", "pad", "blocker", "sum") else 0
                       for k, w in zip(kinds, weights)]
            if depth > 1:
                weights[kinds.index("sum")] = 0
        if nd != 2:
            for k in ("bnpad", "ghost"):
                weights[kinds.index(k)] = 0
        kind = self.pick(kinds, weights)
        method = getattr(self, "u_" + kind.replace("-", "_"))
        m, desc = method(nd, shape, depth)
        return m, desc, self.out_shape(m, shape)

    def u_conv(self, nd, shape, depth):
        return self.conv(nd, shape[1], self.pick([2, 3, 4, 6, 8]))

    def u_bn(self, nd, shape, depth):
        return self.bn(nd, shape[1])

    def u_chan(self, nd, shape, depth):
        return self.chan(nd, shape[1])

    def u_avgpool(self, nd, shape, depth):
        return self.avgpool(nd)

    def u_pad(self, nd, shape, depth):
        return self.pad(nd)

    def u_blocker(self, nd, shape, depth):
        return self.blocker(nd)

    def branch(self, nd, shape, cout, stride, depth):
        """A chain of 1-3 units from `shape` to `cout` channels with total stride `stride`."""
        units, descs, cur = [], [], shape
        n = int(self.pick([1, 2, 3], [0.45, 0.4, 0.15]))
        conv_at = int(self.rng.integers(0, n)) if (cout != shape[1] or stride > 1 or self.p(0.8)) else -1
        for i in range(n):
            if i == conv_at:
                m, d = self.conv(nd, cur[1], cout, stride)
            else:
                kind = self.pick(["bn", "chan", "avgpool", "pad", "sum", "blocker"], [3, 1, 0.6, 0.4, 0.5 if depth < 1 else 0, 0.2])
                if kind == "sum":
                    m, d, _ = self.unit(nd, cur, depth + 1, allow_big=False)
                elif kind == "avgpool" and stride == 1:
                    k = self.pick([2, 3])
                    p = (k - 1) // 2
                    cip = self.p(0.5)
                    m, d = (nn.AvgPool2d if nd == 2 else nn.AvgPool1d)(k, 1, p, count_include_pad=cip), \
                        f"avgpool(k={k},s=1,p={p},cip={cip})"
                    self.tags.add(f"avgpool{'-cip' if cip else '-nocip'}")
                else:
                    m, d = getattr(self, kind)(nd, cur[1]) if kind in ("bn", "chan") else getattr(self, kind)(nd)
            units.append(m)
            descs.append(d)
            try:
                cur = self.out_shape(m, cur)
            except Exception:
                return None
        if conv_at < 0 and (cur[1] != cout or stride > 1):
            return None
        return Chain(units), " -> ".join(descs), cur

    def u_sum(self, nd, shape, depth, how="sum"):
        stride = self.pick([1, 2], [0.75, 0.25])
        cout = shape[1] if (how == "sum" and self.p(0.6)) else self.pick([2, 4, 6, 8])
        n = int(self.pick([2, 3, 4], [0.5, 0.35, 0.15]))
        branches, descs, target = [], [], None
        for _ in range(n):
            for _try in range(8):
                c_b = cout if how == "sum" else self.pick([2, 3, 4])
                got = self.branch(nd, shape, c_b, stride, depth)
                if got is None:
                    continue
                m, d, out = got
                if out[2:] and min(out[2:]) < 1:
                    continue
                if target is None or out[2:] == target[2:] and (how == "cat" or out[1] == target[1]):
                    target = target or out
                    branches.append(m)
                    descs.append(d)
                    break
        if not branches:
            return self.conv(nd, shape[1], cout)
        identity = how == "sum" and target == shape and self.p(0.35)
        if identity:
            self.tags.add("identity")
        if how == "sum" and len(branches) > 1:
            self.tags.add("parallel-sum")
        word = "sum" if how == "sum" else "cat"
        body = f"{word}[" + " | ".join(descs) + (" | identity" if identity else "") + "]"
        m = Branches(branches, how, identity)
        if how == "cat" and self.p(0.6):
            self.tags.add("cat-then-conv")
            c_in = sum(self.out_shape(b, shape)[1] for b in branches)
            conv, d = self.conv(nd, c_in, self.pick([2, 4, 6]))
            return Chain([m, conv]), body + " -> " + d
        return m, body

    def u_cat(self, nd, shape, depth):
        self.tags.add("cat")
        return self.u_sum(nd, shape, depth, how="cat")

    def u_bnpad(self, nd, shape, depth):
        """DBB: 1x1 conv -> BN-and-pad -> kxk unpadded, optionally summed with a kxk padded conv."""
        cin, cout = shape[1], self.pick([2, 4, 6, 8])
        k = self.pick([3, 5])
        p = k // 2
        right = self.p(0.7)
        self.tags.add("bn-and-pad" if right else "bn-and-pad-wrong-fill")
        one = Conv(2, cin, cin, 1, bias=False)
        chain = Chain([one, BNAndPad(cin, p, right, self.rng), Conv(2, cin, cout, k, bias=False), nn.BatchNorm2d(cout)])
        desc = f"dbb[conv1x1({cin}) -> bn_and_pad(p={p},fill={'bn(0)' if right else 'wrong'}) -> conv{k}x{k}({cout},p=0) -> bn"
        if self.p(0.6):
            other = Chain([Conv(2, cin, cout, k, padding=p, bias=False), nn.BatchNorm2d(cout)])
            self.tags.add("parallel-sum")
            return Branches([chain, other]), desc + f" | conv{k}x{k}(p={p}) -> bn]"
        return chain, desc + "]"

    def u_shared(self, nd, shape, depth):
        c = shape[1]
        kind = self.pick(["twice", "nested", "tied"])
        self.tags.add("shared-" + kind)
        if kind == "nested":
            m, d = self.conv(nd, c, c, 1, padding="same", dead=False)
            return SharedTwice(m, nested=True), f"shared[m(m(x)), m={d}]"
        if kind == "twice":
            m, d = self.conv(nd, c, self.pick([2, 4, 6]), 1, padding="same", dead=False)
            pre, pd = self.bn(nd, c)
            return SharedTwice(m, pre), f"shared[m(x) + m({pd}(x)), m={d}]"
        a, d = self.conv(nd, c, self.pick([2, 4, 6]), 1, padding="same", groups=1, dead=False)
        b = Conv(nd, c, a.conv.out_channels, a.conv.kernel_size, 1, a.conv.padding, a.conv.dilation, 1, True)
        b.conv.weight = a.conv.weight  # tied
        bn_b = (nn.BatchNorm2d if nd == 2 else nn.BatchNorm1d)(a.conv.out_channels)
        return Branches([a, Chain([b, bn_b])]), f"tied[{d} | same weight + bias -> bn]"

    def u_dyn(self, nd, shape, depth):
        cin, cout = shape[1], self.pick([2, 4, 6, 8])
        k = self.pick([1, 3])
        n = int(self.pick([2, 3, 4]))
        stride = self.pick([1, 2], [0.8, 0.2])
        groups = cin if (cout % cin == 0 and self.p(0.2)) else 1
        bias = self.p(0.5)
        experts = [Conv(nd, cin, cout, k, stride, k // 2, 1, groups, bias) for _ in range(n)]
        gate = self.pick(["softmax", "sigmoid"])
        per_channel = self.p(0.15)
        self.tags.add("dynamic-conv" + ("-per-channel" if per_channel else ""))
        m = DynamicConv(experts, cin, gate, per_channel, cout)
        desc = f"dynconv[{n} x conv{nd}d({cin}->{cout},k={k},s={stride},g={groups},bias={bias}), {gate} gate{' per-channel' if per_channel else ''}]"
        if self.p(0.5):
            bn, d = self.bn(nd, cout)
            return Chain([m, bn]), desc + " -> " + d
        return m, desc

    def u_ghost(self, nd, shape, depth):
        cin, c1 = shape[1], self.pick([2, 3, 4])
        prim, d = self.conv(2, cin, c1, 1, k=1, padding="none", groups=1, dead=False)
        units = [prim]
        if self.p(0.7):
            units.append(nn.BatchNorm2d(c1))
        cheap = [Conv(2, c1, c1, 3, padding=1, groups=c1, bias=self.p(0.3))]
        if self.p(0.7):
            cheap.append(nn.BatchNorm2d(c1))
        if self.p(0.5):
            self.enable = ["ghost_concat"]
        self.tags.add("ghost" + ("-on" if self.enable else "-off"))
        return Ghost(Chain(units), Chain(cheap)), f"ghost[y={d}{'->bn' if len(units) > 1 else ''}; cat(y, dw3x3(y){'->bn' if len(cheap) > 1 else ''})]"

    def u_bias_then_padded(self, nd, shape, depth):
        cin, mid, cout = shape[1], self.pick([2, 4, 6]), self.pick([2, 4, 6])
        a, da = self.conv(nd, cin, mid, 1, k=1, padding="none", bias=True, dead=False)
        b, db = self.conv(nd, mid, cout, 1, k=self.pick([3, 5]), padding="same", dead=False)
        self.tags.add("bias-before-padded-conv")
        return Chain([a, b]), f"{da} -> {db}"

    def u_bn_then_padded(self, nd, shape, depth):
        cin, cout = shape[1], self.pick([2, 4, 6])
        bn, dbn = self.bn(nd, cin)
        b, db = self.conv(nd, cin, cout, 1, k=self.pick([3, 5]), padding=self.pick(["same", "none", "pre"]), dead=False)
        self.tags.add("bn-before-conv")
        return Chain([bn, b]), f"{dbn} -> {db}"

    def u_shape_branch(self, nd, shape, depth):
        c = shape[1]
        a, da = self.conv(nd, c, c, 1, k=1, padding="none", dead=False)
        b, db = self.conv(nd, c, c, 1, k=1, padding="none", dead=False)
        self.tags.add("shape-branch")
        return ShapeBranch(a, b, shape[-1]), f"if x.shape[-1] > {shape[-1]}: {da} else {db}"

    def u_gate(self, nd, shape, depth):
        kind = self.pick(["scalar", "se"])
        self.tags.add("gate-" + kind)
        return Gate(shape[1], nd, kind), f"gate({kind})"

    def u_tokens(self, nd, shape, depth):
        cout, bias = self.pick([2, 4, 6]), self.p(0.5)
        self.tags.add("tokens-linear")
        m = TokenLinear(shape[1], cout, bias)
        if self.p(0.5):
            bn, d = self.bn(nd, cout)
            return Chain([m, bn]), f"tokens-linear({shape[1]}->{cout},bias={bias}) -> {d}"
        return m, f"tokens-linear({shape[1]}->{cout},bias={bias})"

    # -- Linear layouts
    def linear_unit(self, layout, c, depth=0):
        kinds = ["linear", "bn", "chan", "sum", "blocker", "dyn", "shared", "cat"]
        weights = [3, 1.5, 1, 2, 0.4, 0.8 if layout == "nc" else 0, 0.5, 0.6]
        if depth:
            weights = [w if k in ("linear", "bn", "chan") else 0 for k, w in zip(kinds, weights)]
        kind = self.pick(kinds, weights)
        if kind == "linear":
            cout = self.pick([2, 3, 4, 6, 8, 12])
            bias = self.p(0.6)
            m = Linear(c, cout, bias)
            if cout > 1 and self.p(0.1):
                with torch.no_grad():
                    m.fc.weight[int(self.rng.integers(cout))] = 0
                self.tags.add("dead-channels")
            self.tags.add("linear")
            return m, f"linear({c}->{cout},bias={bias})", cout
        if kind == "bn":
            affine = self.p(0.8)
            self.tags.add("bn1d" + ("" if affine else "-nonaffine"))
            return BNLastDim(c, affine, self.rank), f"bn1d({c}{'' if affine else ',noaffine'})", c
        if kind == "chan":
            m, d = self.chan(0, c, axis=-1)
            return m, d, c
        if kind == "blocker":
            kind = self.pick(["relu", "gelu", "sigmoid"])
            self.tags.add("blocker")
            return Blocker(kind), kind, c
        if kind in ("sum", "cat"):
            n = int(self.pick([2, 3]))
            cout = c if (kind == "sum" and self.p(0.5)) else self.pick([2, 4, 6])
            chains, descs = [], []
            for _ in range(n):
                units, ds, cur = [], [], c
                steps = int(self.pick([1, 2]))
                lin_at = int(self.rng.integers(steps))
                for i in range(steps):
                    if i == lin_at:
                        u, d, cur = Linear(cur, cout, self.p(0.6)), f"linear({cur}->{cout})", cout
                        self.tags.add("linear")
                    else:
                        u, d, cur = self.linear_unit(layout, cur, depth + 1) if self.p(0.3) else \
                            (BNLastDim(cur, rank=self.rank), f"bn1d({cur})", cur)
                        if cur != c and i < lin_at:
                            u, d, cur = BNLastDim(c, rank=self.rank), f"bn1d({c})", c
                    units.append(u)
                    ds.append(d)
                chains.append(Chain(units))
                descs.append(" -> ".join(ds))
            ok = [ch for ch in chains]
            identity = kind == "sum" and cout == c and self.p(0.4)
            self.tags.add("parallel-sum" if kind == "sum" else "cat")
            body = f"{kind}[" + " | ".join(descs) + (" | identity" if identity else "") + "]"
            m = Branches(ok, kind, identity, dim=-1)
            total = cout if kind == "sum" else 0
            if kind == "cat":
                with torch.no_grad():
                    total = sum(int(ch(torch.zeros(*self.lin_shape[:-1], c)).shape[-1]) for ch in ok)
                if self.p(0.6):
                    co = self.pick([2, 4])
                    self.tags.add("cat-then-linear")
                    return Chain([m, Linear(total, co)]), body + f" -> linear({total}->{co})", co
            return m, body, total
        if kind == "dyn":
            cout = self.pick([2, 4, 6])
            n = int(self.pick([2, 3]))
            gate = self.pick(["softmax", "sigmoid"])
            self.tags.add("dynamic-linear")
            m = DynamicConv([Linear(c, cout, self.p(0.5)) for _ in range(n)], c, gate, False, cout)
            return m, f"dynlinear[{n} x linear({c}->{cout}), {gate} gate]", cout
        # shared
        m = Linear(c, c, self.p(0.5))
        self.tags.add("shared-nested")
        return SharedTwice(m, nested=True), f"shared[m(m(x)), m=linear({c}->{c})]", c


def _second_sizes(layout, shape):
    s = list(shape)
    if layout == "nchw":
        return [(s[0] + 1, s[1], s[2] + 1, s[3] + 2), (s[0] + 1, s[1], s[2] + 2, s[3] + 2), (1, s[1], s[2] + 3, s[3] + 1)]
    if layout == "ncw":
        return [(s[0] + 1, s[1], s[2] + 1), (s[0] + 1, s[1], s[2] + 2)]
    if layout == "nc":
        return [(s[0] + 2, s[1]), (1, s[1])]
    if layout == "ntc":
        return [(s[0] + 1, s[1] + 1, s[2]), (1, s[1] + 2, s[2])]
    return [(s[0] + 1, s[1] + 1, s[2] + 2, s[3]), (1, s[1] + 2, s[2] + 2, s[3])]


def _randomize(model: nn.Module, rng) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.tensor(rng.normal(0, 0.5, c)))
                m.running_var.copy_(torch.tensor(rng.uniform(0.25, 1.75, c)))
                if m.affine:
                    m.weight.copy_(torch.tensor(rng.uniform(0.5, 1.5, c)))
                    m.bias.copy_(torch.tensor(rng.normal(0, 0.5, c)))
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.tensor(rng.normal(0, 0.3, m.bias.shape)))


def make_block(seed: int, layout: str | None = None, max_tries: int = 20) -> FuzzBlock:
    """The block for `seed` (deterministic: same seed, same block, weights and inputs)."""
    for attempt in range(max_tries):
        sub = seed if attempt == 0 else seed * 1000003 + attempt
        with torch.random.fork_rng(), single_thread():
            torch.manual_seed(sub)
            block = _try_block(sub, seed, layout)
        if block is not None:
            return block
    raise RuntimeError(f"no valid block for seed {seed}")


def _try_block(sub: int, seed: int, layout: str | None):
    g = _Gen(sub)
    rng = g.rng
    lay = layout or g.pick(["nchw", "ncw", "nc", "ntc", "nhwc"], [0.68, 0.1, 0.1, 0.06, 0.06])
    units, descs = [], []
    n_units = int(g.pick([1, 2, 3, 4], [0.35, 0.35, 0.2, 0.1]))
    if lay in ("nchw", "ncw"):
        nd = 2 if lay == "nchw" else 1
        n = int(g.pick([1, 2]))
        c = int(g.pick([2, 3, 4, 6, 8]))
        spatial = [int(v) for v in rng.integers(5, 13, nd)]
        shape = (n, c, *spatial)
        cur = shape
        for _ in range(n_units):
            try:
                m, d, cur = g.unit(nd, cur)
            except Exception:
                return None
            if min(cur[2:]) < 1:
                return None
            units.append(m)
            descs.append(d)
        if nd == 1:
            g.tags.add("conv1d")
    else:
        n = int(g.pick([1, 2, 3]))
        c = int(g.pick([3, 4, 6, 8, 12]))
        shape = {"nc": (n, c), "ntc": (n, int(rng.integers(3, 8)), c),
                 "nhwc": (n, int(rng.integers(2, 6)), int(rng.integers(2, 6)), c)}[lay]
        g.tags.add("layout-" + lay)
        g.rank, g.lin_shape = len(shape), shape
        cur = c
        for _ in range(n_units):
            try:
                m, d, cur = g.linear_unit(lay, cur)
            except Exception:
                return None
            units.append(m)
            descs.append(d)
    body = units[0] if len(units) == 1 else Chain(units)
    fp16 = lay == "nchw" and g.p(0.1)
    block = FuzzBlock(body, seed, " => ".join(descs), lay, shape, _second_sizes(lay, shape), g.enable, fp16, g.tags)
    _randomize(block, rng)
    block.init_inputs = g.p(0.15)  # ONNX: initializers also listed as graph inputs (overridable defaults)
    block.compile_dynamic = g.p(0.25)  # torch.compile(..., dynamic=True)
    block.eval()
    for p in block.parameters():
        p.requires_grad_(False)
    try:  # the original must run at the example size, in float64 and float32
        with torch.no_grad():
            y = copy.deepcopy(block).double()(block.example())
            block(block.example(dtype=torch.float32))
        if not torch.isfinite(y).all() or y.numel() == 0:
            return None
    except Exception:
        return None
    return block


# ====================================================================== results

@dataclass
class Result:
    seed: int
    ir: str
    status: str  # ok | wrong | crash | skip
    fused: bool | None = None
    refused: bool = False  # the second size was refused loudly
    detail: str = ""
    signature: str = ""
    desc: str = ""
    tags: list = field(default_factory=list)
    err: float = 0.0

    def line(self) -> str:
        f = {True: "fused", False: "not-fused", None: "-"}[self.fused]
        return f"[{self.ir}] seed={self.seed} {self.status} ({f}) {self.signature} :: {self.detail[:300]}\n    block: {self.desc}"


def _where(exc: BaseException) -> str:
    """The innermost repfuse frame of a traceback: 'passes/fx.py:func'."""
    frames = traceback.extract_tb(exc.__traceback__)
    best = None
    for fr in frames:
        fn = fr.filename
        if "/work/" in fn or any(d in fn for d in REPFUSE_DIRS):
            if "site-packages" in fn or os.sep + "tests" + os.sep in fn or os.sep + "benchmarks" + os.sep in fn:
                continue
            best = f"{os.path.basename(os.path.dirname(fn))}/{os.path.basename(fn)}:{fr.name}"
    cause = exc.__cause__ or exc.__context__
    if best is None and cause is not None and cause is not exc:
        return _where(cause)
    return best or "-"


def _norm(msg: str) -> str:
    first = (msg.strip().splitlines() or [""])[0]
    first = re.sub(r"0x[0-9a-f]+", "#", first)
    first = re.sub(r"\d+", "#", first)
    first = re.sub(r"'[^']{20,}'", "'…'", first)
    return first[:120]


def _exc_sig(stage: str, exc: BaseException) -> str:
    inner = exc
    # dynamo wraps backend failures; show the original
    while getattr(inner, "inner_exception", None) is not None:
        inner = inner.inner_exception
    if type(inner).__name__ == "BackendCompilerFailed" and inner.__cause__ is not None:
        inner = inner.__cause__
    return f"crash:{stage}:{type(inner).__name__}@{_where(exc)}: {_norm(str(inner))}"


_SHAPE_WORDS = ("shape", "guard", "dimension", "expected input", "size mismatch", "got invalid dimensions",
                "must match the size", "sizes of tensors", "constraint", "symbolic", "specialized")


def _is_shape_refusal(exc: BaseException) -> bool:
    text = (type(exc).__name__ + " " + str(exc)).lower()
    return any(w in text for w in _SHAPE_WORDS)


def _scale(ref: np.ndarray) -> float:
    return float(np.abs(ref).max()) if ref.size else 0.0


def _compare(out, ref, base_err, dtype_tol):
    """(ok, err, tolerance): `out` against the float64 reference; base_err is the unfused model's own error
    in the same precision (ONNX / TVM / fp16), so float32 rounding is not taken for a wrong rewrite."""
    out = np.asarray(out, dtype=np.float64)
    if out.shape != ref.shape:
        return False, float("inf"), 0.0
    if not np.isfinite(out).all() and np.isfinite(ref).all():
        return False, float("inf"), 0.0
    err = float(np.abs(out - ref).max()) if ref.size else 0.0
    tol = max(dtype_tol * _scale(ref) + dtype_tol * 0.1, 8 * base_err)
    return err <= tol, err, tol


def _to_np(t):
    if isinstance(t, (tuple, list)):
        assert len(t) == 1, f"{len(t)} outputs"
        t = t[0]
    if isinstance(t, torch.Tensor):
        return t.detach().double().numpy()
    if hasattr(t, "numpy"):
        return np.asarray(t.numpy(), dtype=np.float64)
    return np.asarray(t, dtype=np.float64)


def _reference(block, shape, which):
    """float64 output of the unfused block at `shape`, or None when the original refuses that size."""
    model = copy.deepcopy(block).double()
    x = block.example(shape, torch.float64, which)
    try:
        with torch.no_grad():
            return x, model(x).numpy()
    except Exception:
        return x, None


def _seconds(block):
    """(x, ref) for every second size the original accepts."""
    out = []
    for i, shape in enumerate(block.second):
        x, ref = _reference(block, shape, i + 1)
        if ref is not None:
            out.append((x, ref))
    return out


def _second(block, keep_batch_one=False):
    """(x, ref) for the first second size the original accepts (with keep_batch_one, a size with
    batch 1 first when the example has batch 1: a dim of size 1 is specialized by export), or (None, None)."""
    cands = _seconds(block)
    if keep_batch_one and block.shape[0] == 1:
        cands.sort(key=lambda c: c[0].shape[0] != 1)
    return cands[0] if cands else (None, None)


# ---------------------------------------------------------------- op counting (fused or not)

_HEAVY_ATEN = ("convolution", "addmm", "mm", "bmm", "batch_norm", "_native_batch_norm_legit", "linear", "matmul")
_SKIP_ATEN = ("view", "_unsafe_view", "t", "transpose", "permute", "detach", "alias", "expand", "unsqueeze",
              "squeeze", "clone", "_to_copy", "reshape", "contiguous", "lift_fresh", "empty", "select",
              "slice", "copy_", "zeros", "ones", "new_empty", "empty_like", "_local_scalar_dense")


def _count_ops(fn, x):
    """(heavy ops, other ops, weight elements of heavy ops) run by fn(x), via a dispatch mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = [0, 0, 0]

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if any(name == h or name.startswith(h) for h in _HEAVY_ATEN):
                counts[0] += 1
                if len(args) > 1 and isinstance(args[1], torch.Tensor):
                    counts[2] += args[1].numel()
            elif name not in _SKIP_ATEN:
                counts[1] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Counter():
        fn(x)
    return tuple(counts)


def _fewer(before, after) -> bool:
    return any(a < b for a, b in zip(after, before)) and not after[0] > before[0]


# ====================================================================== runners

def run_fx(block: FuzzBlock, fp16: bool | None = None) -> Result:
    import repfuse

    fp16 = block.fp16 if fp16 is None else fp16
    r = Result(block.seed, "fx", "ok", desc=block.desc + (" [fp16]" if fp16 else ""), tags=block.tags)
    dtype = torch.float16 if fp16 else torch.float64
    model = copy.deepcopy(block).to(dtype)
    x64 = block.example()
    ref = copy.deepcopy(block).double()(x64).detach().numpy()
    x = x64.to(dtype)
    tol = 1e-2 if fp16 else 1e-6
    try:
        with torch.no_grad():
            base = model(x).double().numpy()
    except Exception as e:
        return _skip(r, "original fails in " + str(dtype), e)
    base_err = float(np.abs(base - ref).max()) if fp16 else 0.0
    try:
        gm = repfuse.deploy(model, (x,), enable=block.enable)
    except Exception as e:
        if type(e).__name__ == "TraceError":
            return _skip(r, "capture of the original fails", e)
        return _crash(r, "deploy", e)
    try:
        with torch.no_grad():
            out = _to_np(gm(x))
        r.fused = _fewer(_count_ops(model, x), _count_ops(gm, x))
    except Exception as e:
        return _crash(r, "run", e)
    ok, err, t = _compare(out, ref, base_err, tol)
    if not ok:
        return _wrong(r, "example size", err, t, out.shape, ref.shape)
    refusals = []
    for x2, ref2 in _seconds(block):
        try:
            with torch.no_grad():
                base2 = model(x2.to(dtype)).double().numpy()
                base_err2 = float(np.abs(base2 - ref2).max()) if fp16 else 0.0
        except Exception:
            continue
        try:
            with torch.no_grad():
                out2 = _to_np(gm(x2.to(dtype)))
        except Exception as e:
            if _is_shape_refusal(e):
                refusals.append(f"{tuple(x2.shape)}: " + _norm(str(e)))
                continue
            return _crash(r, "run-second-size", e)
        ok, err, t = _compare(out2, ref2, base_err2, tol)
        if not ok:
            return _wrong(r, f"second size {tuple(x2.shape)}", err, t, out2.shape, ref2.shape)
        r.detail = "second size checked " + str(tuple(x2.shape))
        return r
    if refusals:
        r.refused, r.detail = True, "second sizes refused: " + "; ".join(refusals)
    return r


def run_compile(block: FuzzBlock, reset: bool = True) -> Result:
    from repfuse.backends.pytorch import compiled_graphs

    r = Result(block.seed, "compile", "ok", desc=block.desc + (" [dynamic=True]" if block.compile_dynamic else ""),
               tags=block.tags)
    if reset:
        torch._dynamo.reset()
    model = copy.deepcopy(block).double()
    x = block.example()
    with torch.no_grad():
        ref = model(x).numpy()
    before = {id(g) for g in compiled_graphs()}
    options = {"inner": "eager"}
    if block.enable:
        options["enable"] = list(block.enable)
    try:
        cm = torch.compile(model, backend="repfuse", options=options, dynamic=True if block.compile_dynamic else None)
        with torch.no_grad():
            out = _to_np(cm(x))
    except Exception as e:
        if _original_compiles(model, x):
            return _crash(r, "compile", e)
        return _skip(r, "torch.compile of the original fails", e)
    new = [g for g in compiled_graphs() if id(g) not in before]
    r.fused = any(g.changed for g in new)
    ok, err, t = _compare(out, ref, 0.0, 1e-6)
    if not ok:
        return _wrong(r, "example size", err, t, out.shape, ref.shape)
    x2, ref2 = _second(block)
    if x2 is not None:
        try:
            with torch.no_grad():
                out2 = _to_np(cm(x2))
        except Exception as e:
            if _original_compiles(model, x, x2):
                return _crash(r, "compile-second-size", e)
            return _skip(r, "torch.compile of the original fails at the second size", e)
        ok, err, t = _compare(out2, ref2, 0.0, 1e-6)
        if not ok:
            return _wrong(r, f"second size {tuple(x2.shape)}", err, t, out2.shape, ref2.shape)
    return r


def _original_compiles(model, *xs) -> bool:
    torch._dynamo.reset()
    try:
        cm = torch.compile(copy.deepcopy(model), backend="eager")
        with torch.no_grad():
            for x in xs:
                cm(x)
        return True
    except Exception:
        return False
    finally:
        torch._dynamo.reset()


def onnx_export(block: FuzzBlock, dynamic: bool = True, init_inputs: bool | None = None) -> bytes:
    model = copy.deepcopy(block).float()
    x = block.example(dtype=torch.float32)
    f = io.BytesIO()
    axes = {"x": {i: f"d{i}" for i in block.dynamic_dims()}} if dynamic else None
    with torch.no_grad(), warnings.catch_warnings(), quiet_fds():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), f, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes=axes,
                          keep_initializers_as_inputs=block.init_inputs if init_inputs is None else init_inputs)
    return f.getvalue()


_ONNX_HEAVY = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization")


def _onnx_counts(proto):
    nodes = [n.op_type for n in proto.graph.node]
    heavy = sum(n in _ONNX_HEAVY for n in nodes)
    return heavy, sum(n in ("Mul", "Add", "Sub", "Div", "Pad", "AveragePool", "Concat", "ScatterND") for n in nodes)


def _ort(proto_bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    ort.set_default_logger_severity(4)
    return ort.InferenceSession(proto_bytes, so, providers=["CPUExecutionProvider"])


def run_onnx(block: FuzzBlock) -> Result:
    import onnx

    import repfuse

    r = Result(block.seed, "onnx", "ok", desc=block.desc + (" [initializers as inputs]" if block.init_inputs else ""),
               tags=block.tags)
    x64 = block.example()
    ref = copy.deepcopy(block).double()(x64).detach().numpy()
    try:
        data = onnx_export(block)
        proto = onnx.load_from_string(data)
        s0 = _ort(data)
        base = s0.run(None, {"x": x64.float().numpy()})[0]
    except Exception as e:
        return _skip(r, "export / onnxruntime of the original fails", e)
    base_err = float(np.abs(base.astype(np.float64) - ref).max())
    try:
        fused = repfuse.optimize_onnx(proto, enable=block.enable)
    except Exception as e:
        return _crash(r, "optimize_onnx", e)
    r.fused = _fewer(_onnx_counts(proto), _onnx_counts(fused))
    try:
        s1 = _ort(fused.SerializeToString())
        out = s1.run(None, {s1.get_inputs()[0].name: x64.float().numpy()})[0]
    except Exception as e:
        return _crash(r, "onnxruntime", e)
    ok, err, t = _compare(out, ref, base_err, 1e-4)
    if not ok:
        return _wrong(r, "example size", err, t, np.shape(out), ref.shape)
    if block.init_inputs:
        bad = _override_check(proto, s0, s1, x64.float().numpy())
        if bad:
            r.status, r.signature, r.detail = "wrong", "wrong:initializer-input-override:" + bad[0], bad[1]
            return r
    refusals = []
    for x2, ref2 in _seconds(block):
        try:
            base2 = s0.run(None, {"x": x2.float().numpy()})[0]
            ok0, base_err2, _ = _compare(base2, ref2, 0.0, 1e-4)
        except Exception:
            ok0 = False
        if not ok0:  # the exported original is not right at this size: nothing to hold the fused one to
            continue
        try:
            out2 = s1.run(None, {s1.get_inputs()[0].name: x2.float().numpy()})[0]
        except Exception as e:
            if _is_shape_refusal(e):
                refusals.append(f"{tuple(x2.shape)}: " + _norm(str(e)))
                continue
            return _crash(r, "onnxruntime-second-size", e)
        ok, err, t = _compare(out2, ref2, base_err2, 1e-4)
        if not ok:
            return _wrong(r, f"second size {tuple(x2.shape)}", err, t, np.shape(out2), ref2.shape)
        return r
    if refusals:
        r.refused, r.detail = True, "second sizes refused: " + "; ".join(refusals)
    return r


def _override_check(proto, s0, s1, x):
    """Initializers that are also graph inputs are defaults the caller may override: feed a changed
    value for each float one (up to 3) to the original and the fused model; they must agree."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name in inits]
    fused_inputs = {i.name for i in s1.get_inputs()} | {i.name for i in s1.get_overridable_initializers()}
    checked = 0
    for name in names:
        value = numpy_helper.to_array(inits[name])
        if value.dtype != np.float32 or value.ndim == 0 or value.size == 0:
            continue
        new = (value * 1.25 + 0.1).astype(np.float32)
        try:
            want = s0.run(None, {"x": x, name: new})[0]
        except Exception:
            continue
        if name not in fused_inputs:
            return "removed", f"initializer input {name!r} is gone from the fused model (an override would fail)"
        got = s1.run(None, {s1.get_inputs()[0].name: x, name: new})[0]
        ok, err, t = _compare(got, want.astype(np.float64), 0.0, 1e-4)
        if not ok:
            return "ignored", f"override of initializer input {name!r}: max|err| {err:.3g} > {t:.3g} (folded as a constant?)"
        checked += 1
        if checked == 3:
            break
    return None


# ---------------------------------------------------------------- TVM (many blocks per build)

class _Multi(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, *xs):
        return tuple(b(x) for b, x in zip(self.blocks, xs))


def _relax_counts(mod):
    """Per output of main: (heavy ops, other ops) among the calls the output depends on."""
    from tvm import relax

    func = mod["main"]
    defs = {}
    for blk in func.body.blocks:
        for b in blk.bindings:
            defs[b.var] = b.value
    heavy_names = ("relax.nn.conv2d", "relax.nn.conv1d", "relax.matmul", "relax.nn.batch_norm", "relax.linear")

    def deps(expr, seen, acc):
        stack = [expr]
        while stack:
            e = stack.pop()
            if isinstance(e, relax.Var):
                if e in seen or e not in defs:
                    continue
                seen.add(e)
                stack.append(defs[e])
            elif isinstance(e, relax.Call):
                if hasattr(e.op, "name"):
                    n = e.op.name
                    if n in heavy_names:
                        acc[0] += 1
                    elif not any(s in n for s in ("reshape", "permute", "squeeze", "expand")):
                        acc[1] += 1
                stack.extend(e.args)
            elif isinstance(e, relax.Tuple):
                stack.extend(e.fields)
            elif isinstance(e, relax.TupleGetItem):
                stack.append(e.tuple_value)
        return acc

    out = func.body.body
    while isinstance(out, relax.Var) and out in defs and not isinstance(defs[out], relax.Call):
        out = defs[out]
    fields = list(out.fields) if isinstance(out, relax.Tuple) else [out]
    return [tuple(deps(f, set(), [0, 0])) for f in fields]


def _tvm_build(mod):
    import tvm
    from tvm import relax

    with quiet_fds():
        ex = tvm.compile(mod, target="llvm")
    return relax.VirtualMachine(ex, tvm.cpu())


def _tvm_call(vm, xs):
    import tvm

    out = vm["main"](*[tvm.runtime.tensor(x.float().numpy()) for x in xs])
    return [np.asarray(o.numpy(), dtype=np.float64) for o in out]


def _relax_module(blocks, dynamic=True):
    from tvm.relax.frontend.torch import from_exported_program

    multi = _Multi([copy.deepcopy(b).float() for b in blocks]).eval()
    xs = tuple(b.example(dtype=torch.float32) for b in blocks)
    shapes = None
    if dynamic:
        auto = torch.export.Dim.AUTO
        shapes = (tuple({i: auto for i in b.dynamic_dims()} for b in blocks),)  # forward(*xs): one tuple
    with torch.no_grad():
        ep = torch.export.export(multi, xs, dynamic_shapes=shapes)
        return from_exported_program(ep, keep_params_as_input=False)


def run_tvm(blocks: list[FuzzBlock]) -> list[Result]:
    """Blocks built into one module (one export, one pass, one build before and one after); on trouble
    each block is run alone so the failure names its seed.  Blocks that need different rules
    (ghost on / off) go into different modules."""
    results = {}
    groups: dict[tuple, list] = {}
    for b in blocks:
        groups.setdefault(tuple(b.enable), []).append(b)
    for group in groups.values():
        for r in _run_tvm_group(group):
            results[r.seed] = r
    return [results[b.seed] for b in blocks]


def _run_tvm_group(blocks):
    if len(blocks) == 1:
        return [_run_tvm_one(blocks[0])]
    try:
        got = _tvm_batch(blocks)
    except Exception:
        got = None
    if got is None or any(r.status != "ok" for r in got):  # attribute alone (the batch may hide a skip)
        half = len(blocks) // 2
        return _run_tvm_group(blocks[:half]) + _run_tvm_group(blocks[half:])
    return got


def _tvm_batch(blocks):
    from repfuse.backends.tvm import RepFuse

    mod = _relax_module(blocks)
    fused = RepFuse(enable=blocks[0].enable)(mod)
    return _tvm_compare(blocks, mod, fused)


def _run_tvm_one(block):
    from repfuse.backends.tvm import RepFuse

    r = Result(block.seed, "tvm", "ok", desc=block.desc, tags=block.tags)
    try:
        mod = _relax_module([block])
        dynamic = True
    except Exception:
        try:
            mod = _relax_module([block], dynamic=False)
            dynamic = False
        except Exception as e:
            return _skip(r, "torch.export / Relax import of the original fails", e)
    try:
        fused = RepFuse(enable=block.enable)(mod)
    except Exception as e:
        return _crash(r, "RepFuse", e)
    try:
        res = _tvm_compare([block], mod, fused)
    except Exception as e:
        try:
            vm0 = _tvm_build(mod)
            _tvm_call(vm0, [block.example()])
        except Exception as e0:
            return _skip(r, "build / run of the original fails", e0)
        return _crash(r, "build/run fused", e)
    res[0].detail += "" if dynamic else " (static shapes)"
    return res[0]


def _static_dims(mod, i):
    """{axis: size} of the dims of main's i-th input that the module fixed (not symbolic)."""
    param = mod["main"].params[i]
    sinfo = param.ty if hasattr(param, "ty") else param.struct_info  # TVM 0.27 names it ty
    return {a: int(d) for a, d in enumerate(sinfo.shape.values) if type(d).__name__ == "IntImm"}


def _tvm_compare(blocks, mod, fused):
    """Build the fused module, run it at the example and at a second size of every block, and compare
    with torch in float64.  The unfused module is built only when some block is off by more than the
    float32 tolerance (its own error then widens the tolerance)."""
    vm1 = _tvm_build(fused)
    vm0 = None
    before, after = _relax_counts(mod), _relax_counts(fused)
    results = [Result(b.seed, "tvm", "ok", desc=b.desc, tags=b.tags) for b in blocks]
    xs = [b.example() for b in blocks]
    refs = [copy.deepcopy(b).double()(x).detach().numpy() for b, x in zip(blocks, xs)]
    # second sizes: per block, the first size that torch accepts and that fits the dims the import fixed
    seconds = []
    for i, b in enumerate(blocks):
        fixed = _static_dims(mod, i)
        fits = [(x2, ref2) for x2, ref2 in _seconds(b)
                if all(x2.shape[a] == n for a, n in fixed.items()) and tuple(x2.shape) != tuple(xs[i].shape)]
        seconds.append(fits[0] if fits else (None, None))
    xs2 = [s[0] if s[0] is not None else x for s, x in zip(seconds, xs)]
    refs2 = [s[1] if s[1] is not None else r for s, r in zip(seconds, refs)]
    out = _tvm_call(vm1, xs)
    try:
        out2 = _tvm_call(vm1, xs2)
    except Exception as e:
        out2 = None
        for r in results:
            if _is_shape_refusal(e):
                r.refused, r.detail = True, "second size refused: " + _norm(str(e))
            else:
                _crash(r, "run-second-size", e)
    base = base2 = None
    for i, r in enumerate(results):
        r.fused = _fewer(before[i], after[i]) if len(before) == len(after) == len(blocks) else None
        for which, o, ref in (("example size", out, refs), (f"second size {tuple(xs2[i].shape)}", out2, refs2)):
            if o is None or r.status != "ok":
                continue
            ok, err, t = _compare(o[i], ref[i], 0.0, 1e-4)
            if not ok:  # float32 rounding of the unfused build sets the bar
                if vm0 is None:
                    vm0 = _tvm_build(mod)
                    base = _tvm_call(vm0, xs)
                    try:
                        base2 = _tvm_call(vm0, xs2)
                    except Exception:
                        base2 = None
                b = base if o is out else base2
                if b is None:
                    continue
                ok0, base_err, _ = _compare(b[i], ref[i], 0.0, 1e-4)
                if not ok0 and not np.isfinite(base_err):
                    continue  # the unfused build is not right either: not the rewrite's doing
                ok, err, t = _compare(o[i], ref[i], base_err, 1e-4)
                if not ok:
                    _wrong(r, which, err, t, o[i].shape, ref[i].shape)
    return results


# ---------------------------------------------------------------- result helpers

def _skip(r, why, e):
    r.status, r.detail = "skip", f"{why}: {type(e).__name__}: {_norm(str(e))}"
    r.signature = "skip"
    return r


def _crash(r, stage, e):
    r.status = "crash"
    r.signature = _exc_sig(stage, e)
    r.detail = "".join(traceback.format_exception_only(type(e), e)).strip()[-2000:]
    r.detail += "\n" + "".join(traceback.format_tb(e.__traceback__)[-4:])
    return r


def _wrong(r, where, err, tol, out_shape, ref_shape):
    r.status = "wrong"
    r.err = err
    shapes = "" if tuple(out_shape) == tuple(ref_shape) else f" shape {tuple(out_shape)} vs {tuple(ref_shape)}"
    r.signature = f"wrong:{'second' if where.startswith('second') else 'example'}{':shape' if shapes else ''}"
    r.detail = f"{where}: max|err| {err:.3g} > tol {tol:.3g}{shapes}"
    return r


RUNNERS = {"fx": run_fx, "compile": run_compile, "onnx": run_onnx}


def run(ir: str, seeds, tvm_batch: int = 12) -> list[Result]:
    """Results for `seeds` on one IR (TVM: blocks built `tvm_batch` at a time)."""
    with single_thread():
        blocks = [make_block(s) for s in seeds]
        if ir == "tvm":
            out = []
            for i in range(0, len(blocks), tvm_batch):
                out += run_tvm(blocks[i:i + tvm_batch])
            return out
        runner = RUNNERS[ir]
        return [runner(b) for b in blocks]
