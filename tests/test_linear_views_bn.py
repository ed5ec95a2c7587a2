"""A BatchNorm behind a view of a linear's output folds into the linear's columns, on every IR.

The linear's output channels are the BatchNorm's channels when a transpose (or a reshape of the leading
dims) keeps the channel axis whole: MatMul [B, N, C] -> Transpose -> BatchNormalization over C -> Transpose
(torch's `linear(x).transpose(1, 2)` then BatchNorm1d), MatMul [B*N, C] -> Reshape [B, N, C] -> ..., and
ONNX's Gemm with transA=1 (a linear over the rows of A) followed by a BatchNorm.  The fused linear is
written in front of the same views, so the region's root keeps its shape.

Must not fire: a BatchNorm over the tokens, a reshape that splits the channel axis, weights that are not
constants, a Gemm bias over rows, and a BatchNorm or row scale before a transA Gemm (its channel axis is
A's axis 0; the layout model reads A's axis 1): the BatchNorm stays and the numbers match.

References: onnxruntime on the unfused ONNX model, torch eager for FX, torch eager for Relax (run on TVM's VM).
Every comparison is relative 1e-5 of the output's largest magnitude, on seeded random inputs and BatchNorm
statistics far from 0 / 1.
"""

import io
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blocks as B  # noqa: E402

import repfuse  # noqa: E402

warnings.filterwarnings("ignore")
RTOL = 1e-5


def assert_close(out, ref):
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= RTOL * max(1.0, float(np.abs(ref).max()))


# ---------------------------------------------------------------- ONNX graphs written by hand

def onnx_cases():
    from test_onnx_golden import BN

    bn8, bn16 = BN.replace("[4]", "[8]"), BN.replace("[4]", "[16]")
    fire = {
        # Gemm transA=1 (A is [K, M]), alpha and beta, then a BatchNorm over the output columns
        "gemm_transA": ((6, 5), f"""
            g (float[6, 5] x, float[6, 8] w, float[8] c, {bn8.format('bn')}) => (float[5, 8] y) {{
              h = Gemm <transA = 1, alpha = 0.5, beta = 2.0> (x, w, c)
              y = BatchNormalization <epsilon = 0.001> (h, bn_scale, bn_bias, bn_mean, bn_var)
            }}"""),
        "gemm_transA_transB": ((6, 5), f"""
            g (float[6, 5] x, float[8, 6] w, float[1, 8] c, {bn8.format('bn')}) => (float[5, 8] y) {{
              h = Gemm <transA = 1, transB = 1, alpha = 1.5> (x, w, c)
              y = BatchNormalization (h, bn_scale, bn_bias, bn_mean, bn_var)
            }}"""),
        "gemm_transA_scale_shift": ((6, 5), """
            g (float[6, 5] x, float[6, 8] w, float[8] s, float[8] t) => (float[5, 8] y) {
              h = Gemm <transA = 1> (x, w)
              m = Mul (h, s)
              y = Add (m, t)
            }"""),
        # linear(x).transpose(1, 2) -> BatchNorm1d -> transpose back -> linear
        "matmul_transpose_bn_transpose": ((3, 5, 8), f"""
            g (float[B, 5, 8] x, float[8, 16] w, float[16] b, {bn16.format('bn')}, float[16, 8] w2)
              => (float[B, 5, 8] y) {{
              m = MatMul (x, w)
              h = Add (m, b)
              t = Transpose <perm = [0, 2, 1]> (h)
              n = BatchNormalization (t, bn_scale, bn_bias, bn_mean, bn_var)
              u = Transpose <perm = [0, 2, 1]> (n)
              y = MatMul (u, w2)
            }}"""),
        # the BatchNorm is the region's root: the fused linear goes back in front of the Transpose
        "matmul_transpose_bn": ((3, 5, 8), f"""
            g (float[B, 5, 8] x, float[8, 16] w, {bn16.format('bn')}) => (float[B, 16, 5] y) {{
              m = MatMul (x, w)
              t = Transpose <perm = [0, 2, 1]> (m)
              n = BatchNormalization (t, bn_scale, bn_bias, bn_mean, bn_var)
              y = Relu (n)
            }}"""),
        # MatMul on [B*N, C], then Reshape [B, N, C]: the reshape only regroups the leading dims
        "matmul_reshape_transpose_bn": ((15, 8), f"""
            g (float[15, 8] x, float[8, 16] w, float[16] b, {bn16.format('bn')}, int64[3] shape)
              => (float[3, 16, 5] y) {{
              m = MatMul (x, w)
              h = Add (m, b)
              r = Reshape (h, shape)
              t = Transpose <perm = [0, 2, 1]> (r)
              y = BatchNormalization (t, bn_scale, bn_bias, bn_mean, bn_var)
            }}"""),
        # the same with a dynamic number of rows: the Reshape's -1 stays the batch
        "matmul_reshape_transpose_bn_dynamic": ((15, 8), f"""
            g (float[R, 8] x, float[8, 16] w, {bn16.format('bn')}, int64[3] shape) => (float[B, 16, 5] y) {{
              m = MatMul (x, w)
              r = Reshape (m, shape)
              t = Transpose <perm = [0, 2, 1]> (r)
              y = BatchNormalization (t, bn_scale, bn_bias, bn_mean, bn_var)
            }}"""),
        "matmul_reshape_transpose_bn_back": ((15, 8), f"""
            g (float[15, 8] x, float[8, 16] w, {bn16.format('bn')}, int64[3] shape, int64[2] flat, float[16, 8] w2)
              => (float[15, 8] y) {{
              m = MatMul (x, w)
              r = Reshape (m, shape)
              t = Transpose <perm = [0, 2, 1]> (r)
              n = BatchNormalization (t, bn_scale, bn_bias, bn_mean, bn_var)
              u = Transpose <perm = [0, 2, 1]> (n)
              f = Reshape (u, flat)
              y = MatMul (f, w2)
            }}"""),
        # 4-D tokens [B, H, W, C] -> NCHW -> BatchNorm2d -> NHWC
        "matmul_permute_bn2d": ((2, 3, 4, 8), f"""
            g (float[2, 3, 4, 8] x, float[8, 16] w, {bn16.format('bn')}) => (float[2, 3, 4, 16] y) {{
              m = MatMul (x, w)
              t = Transpose <perm = [0, 3, 1, 2]> (m)
              n = BatchNormalization (t, bn_scale, bn_bias, bn_mean, bn_var)
              y = Transpose <perm = [0, 2, 3, 1]> (n)
            }}"""),
    }
    stay = {
        # BatchNorm over axis 1 of A [K, M]: the tokens of the transposed Gemm, not its channels
        "bn_before_gemm_transA": ((6, 5), "transpose moves the channel axis", f"""
            g (float[6, 5] x, {BN.replace('[4]', '[5]').format('bn')}, float[6, 8] w, float[8] c) => (float[5, 8] y) {{
              n = BatchNormalization (x, bn_scale, bn_bias, bn_mean, bn_var)
              y = Gemm <transA = 1> (n, w, c)
            }}"""),
        # a per-row scale of A is a per-channel op of A^T, which A's layout (channels on axis 1) does not read
        "row_scale_before_gemm_transA": ((6, 5), "constant operand is not per-channel", """
            g (float[6, 5] x, float[6, 1] s, float[6, 8] w, float[8] c) => (float[5, 8] y) {
              n = Mul (x, s)
              y = Gemm <transA = 1> (n, w, c)
            }"""),
        # C broadcast over the output rows is no per-output bias
        "gemm_transA_row_bias": ((6, 5), "Gemm bias is not per-output", f"""
            g (float[6, 5] x, float[6, 5] w, float[5, 1] c, {BN.replace('[4]', '[5]').format('bn')}) => (float[5, 5] y) {{
              h = Gemm <transA = 1> (x, w, c)
              y = BatchNormalization (h, bn_scale, bn_bias, bn_mean, bn_var)
            }}"""),
        # BatchNorm over the token axis after a transpose that puts the tokens on axis 1
        "bn_over_tokens": ((3, 5, 8), "transpose moves the channel axis", f"""
            g (float[3, 5, 8] x, float[8, 16] w, {BN.replace('[4]', '[5]').format('bn')}) => (float[16, 5, 3] y) {{
              m = MatMul (x, w)
              t = Transpose <perm = [2, 1, 0]> (m)
              y = BatchNormalization (t, bn_scale, bn_bias, bn_mean, bn_var)
            }}"""),
        # a reshape that splits the channel axis: [B, N, 8] -> [B, 2N, 4]
        "reshape_splits_channels": ((3, 5, 8), "splits or merges the channel axis", f"""
            g (float[3, 5, 8] x, float[8, 8] w, int64[3] shape, {BN.format('bn')}) => (float[3, 4, 10] y) {{
              m = MatMul (x, w)
              r = Reshape (m, shape)
              t = Transpose <perm = [0, 2, 1]> (r)
              y = BatchNormalization (t, bn_scale, bn_bias, bn_mean, bn_var)
            }}"""),
        # weights that are graph inputs are no constants
        "gemm_transA_weight_input": ((6, 5), "Gemm weight is not a constant", f"""
            g (float[6, 5] x, float[6, 8] w, float[8] c, {bn8.format('bn')}) => (float[5, 8] y) {{
              h = Gemm <transA = 1> (x, w, c)
              y = BatchNormalization (h, bn_scale, bn_bias, bn_mean, bn_var)
            }}"""),
        "gemm_transA_bias_input": ((6, 5), "Gemm bias is not a constant", f"""
            g (float[6, 5] x, float[6, 8] w, float[8] c, {bn8.format('bn')}) => (float[5, 8] y) {{
              h = Gemm <transA = 1> (x, w, c)
              y = BatchNormalization (h, bn_scale, bn_bias, bn_mean, bn_var)
            }}"""),
        "matmul_weight_input": ((3, 5, 8), "MatMul weight is not a constant", f"""
            g (float[3, 5, 8] x, float[8, 16] w, {bn16.format('bn')}) => (float[3, 16, 5] y) {{
              m = MatMul (x, w)
              t = Transpose <perm = [0, 2, 1]> (m)
              y = BatchNormalization (t, bn_scale, bn_bias, bn_mean, bn_var)
            }}"""),
    }
    runtime_inputs = {"gemm_transA_weight_input": ("w",), "gemm_transA_bias_input": ("c",),
                      "matmul_weight_input": ("w",)}
    return fire, stay, runtime_inputs


FIRE, STAY, RUNTIME = onnx_cases()
INTS = {"shape": {"matmul_reshape_transpose_bn": [3, 5, 16], "matmul_reshape_transpose_bn_back": [-1, 5, 16],
                  "matmul_reshape_transpose_bn_dynamic": [-1, 5, 16], "reshape_splits_channels": [3, 10, 4]},
        "flat": {"matmul_reshape_transpose_bn_back": [-1, 16]}}


def onnx_model(name, shape, text, runtime=()):
    import onnx
    from numpy.random import default_rng
    from onnx import numpy_helper
    from test_onnx_golden import build

    ints = {k: v[name] for k, v in INTS.items() if name in v}
    model = build(text, inputs=("x",) + tuple(runtime) + tuple(ints))
    kept = [v for v in model.graph.input if v.name not in ints]
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in ints.items())
    del model.graph.input[:]
    model.graph.input.extend(kept)
    onnx.checker.check_model(model)
    rng = default_rng(3)
    return model, {v.name: rng.standard_normal(shape if v.name == "x" else [d.dim_value for d in
                                                                            v.type.tensor_type.shape.dim])
                   .astype(np.float32) for v in kept}


def run_onnx(model, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def onnx_ops(model):
    return Counter(n.op_type for n in model.graph.node)


def optimize_onnx(model, simplify=False):
    from repfuse.backends import onnx as pipeline

    fused, report = pipeline.optimize(model, simplify_first=simplify)
    return pipeline.to_proto(fused), report


@pytest.mark.parametrize("name", sorted(FIRE))
def test_onnx_fires(name):
    pytest.importorskip("onnxruntime")
    from test_onnx_golden import shapes_agree

    shape, text = FIRE[name]
    model, feeds = onnx_model(name, shape, text)
    fused, report = optimize_onnx(model)
    assert_close(run_onnx(fused, feeds), run_onnx(model, feeds))
    shapes_agree(fused)  # what the writer declares (Transpose, Reshape) is what ONNX infers
    before, after = onnx_ops(model), onnx_ops(fused)
    assert after["BatchNormalization"] == after["Mul"] == 0, after
    assert after["MatMul"] + after["Gemm"] <= before["MatMul"] + before["Gemm"], (before, after)
    assert after["Transpose"] <= before["Transpose"] and after["Reshape"] <= before["Reshape"], (before, after)
    if "Gemm" in before:  # the transposed Gemm stays one Gemm reading A transposed
        [gemm] = [n for n in fused.graph.node if n.op_type == "Gemm"]
        assert {a.name: a.i for a in gemm.attribute}.get("transA") == 1 and after["Transpose"] == 0
    if name == "matmul_transpose_bn":  # the linear in front of the Transpose: the root keeps its shape
        assert [n.op_type for n in fused.graph.node] == ["MatMul", "Add", "Transpose", "Relu"]
    assert len(report.regions) == 1


@pytest.mark.parametrize("name", sorted(STAY))
def test_onnx_stays(name):
    pytest.importorskip("onnxruntime")
    shape, reason, text = STAY[name]
    model, feeds = onnx_model(name, shape, text, RUNTIME.get(name, ()))
    fused, report = optimize_onnx(model)
    assert_close(run_onnx(fused, feeds), run_onnx(model, feeds))
    assert onnx_ops(fused) == onnx_ops(model)
    assert any(d.rule == "affine" and reason in d.reason for d in report.declined), report.declined


# ---------------------------------------------------------------- torch modules: ONNX export, FX, Relax

class LinearBN(nn.Module):
    """Tokens [B, N, C]: linear, then BatchNorm1d over C through transpose(1, 2), then (optionally) the
    transpose back and a second linear; `view` picks the form (LeViT- and EfficientFormer-style)."""

    def __init__(self, view="transpose_back"):
        super().__init__()
        self.view = view
        self.fc, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        channels = {"split": 8, "tokens": 5}.get(view, 16)
        self.bn = (nn.BatchNorm2d if view == "permute4d" else nn.BatchNorm1d)(channels)

    def forward(self, x):
        y = self.fc(x)
        if self.view == "transpose_back":  # linear -> transpose -> BN -> transpose -> linear
            return self.fc2(self.bn(y.transpose(1, 2)).transpose(1, 2))
        if self.view == "root":  # the BN is the last affine op: the fused linear stays before the transpose
            return torch.relu(self.bn(y.transpose(1, 2)))
        if self.view == "permute4d":  # [B, H, W, C] -> BatchNorm2d -> back
            return self.bn(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if self.view == "split":  # reshape splits C = 16 into 2 x 8: BN over the halves, not over C
            b, n, c = y.shape
            return self.bn(y.reshape(b, n * 2, c // 2).transpose(1, 2))
        if self.view == "tokens":  # [C, N, B]: BatchNorm1d normalizes the tokens
            return self.bn(y.permute(2, 1, 0)).permute(2, 1, 0)
        raise ValueError(self.view)


class BNThenLinear(nn.Module):
    """Channels-first [B, C, N]: BatchNorm1d, then transpose to tokens and a linear (the BN folds into the
    linear's input columns; the transpose stays in front)."""

    def __init__(self):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(8), nn.Linear(8, 16)

    def forward(self, x):
        return self.fc(self.bn(x).transpose(1, 2))


class DynamicWeight(nn.Module):
    """The linear's weight is an input: nothing is a constant."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x, w):
        return self.bn(torch.nn.functional.linear(x, w).transpose(1, 2))


SHAPES = {"permute4d": (2, 3, 4, 8)}
FOLDS = ("transpose_back", "root", "permute4d")
STAYS = ("split", "tokens")


def module(view, seed=0):
    torch.manual_seed(seed)
    if view == "bn_then_linear":
        return B.randomize(BNThenLinear()).eval(), torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(1))
    model = B.randomize(LinearBN(view)).eval()
    x = torch.randn(*SHAPES.get(view, (3, 5, 8)), generator=torch.Generator().manual_seed(seed + 1))
    return model, x


EXPORTS = [(view, False) for view in FOLDS + STAYS] + [("transpose_back", True), ("split", True)]  # dynamo: slow


@pytest.mark.parametrize("view, dynamo", EXPORTS, ids=[f"{v}-{'dynamo' if d else 'torchscript'}" for v, d in EXPORTS])
def test_onnx_export(view, dynamo):
    pytest.importorskip("onnxruntime")
    import onnx

    if dynamo:
        pytest.importorskip("onnxscript")
    model, x = module(view)
    with torch.no_grad():
        ref = model(x).numpy()
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=dynamo, input_names=["x"])
    exported = onnx.load_from_string(buffer.getvalue())
    fused, report = optimize_onnx(exported)
    feeds = {exported.graph.input[0].name: x.numpy()}
    out = run_onnx(fused, feeds)
    assert_close(out, ref)
    assert_close(out, run_onnx(exported, feeds))
    before, after = onnx_ops(exported), onnx_ops(fused)
    assert after["MatMul"] + after["Gemm"] <= before["MatMul"] + before["Gemm"]
    assert after["BatchNormalization"] == (view in STAYS), after
    if view == "split":
        assert any("splits or merges the channel axis" in d.reason for d in report.declined)


def test_onnx_export_through_onnxsim():
    """With onnxsim first (the default pipeline) the MatMul may become Reshape + Gemm + Reshape: still one linear."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxsim")
    import onnx

    model, x = module("transpose_back")
    with torch.no_grad():
        ref = model(x).numpy()
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
    fused, _ = optimize_onnx(onnx.load_from_string(buffer.getvalue()), simplify=True)
    assert_close(run_onnx(fused, {"x": x.numpy()}), ref)
    ops = onnx_ops(fused)
    assert ops["BatchNormalization"] == ops["Transpose"] == 0 and ops["MatMul"] + ops["Gemm"] == 1, ops


def fx_ops(gm):
    from repfuse.passes.fx import op_kind

    return Counter(op_kind(n, gm) for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module"))


@pytest.mark.parametrize("view", FOLDS + STAYS + ("bn_then_linear",))
def test_fx(view):
    model, x = module(view)
    gm = repfuse.deploy(model, (x,))
    for sample in (x, torch.randn(4, *x.shape[1:]) if view != "tokens" else x):  # the batch dim is dynamic
        with torch.no_grad():
            assert_close(gm(sample).numpy(), model(sample).numpy())
    ops = fx_ops(gm)
    norms = sum(c for k, c in ops.items() if "batch_norm" in k)
    linears = sum(c for k, c in ops.items() if k in ("linear", "addmm", "mm", "matmul"))
    assert norms == (view in STAYS) and linears <= (2 if view == "transpose_back" else 1), ops
    assert "conv1d" not in ops and "conv2d" not in ops and ("mul" not in ops or view in STAYS), ops
    if view == "transpose_back":
        assert linears == 1 and "transpose" not in ops and "permute" not in ops, ops
    reasons = [d.reason for d in gm.meta["repfuse_report"].declined]
    if view == "split":
        assert any("splits or merges the channel axis" in r for r in reasons), reasons
    if view == "tokens":
        assert any("transpose moves the channel axis" in r for r in reasons), reasons


def test_fx_weight_not_constant():
    torch.manual_seed(0)
    model, x, w = B.randomize(DynamicWeight()).eval(), torch.randn(3, 5, 8), torch.randn(16, 8)
    gm = repfuse.deploy(model, (x, w))
    with torch.no_grad():
        assert_close(gm(x, w).numpy(), model(x, w).numpy())
    assert sum(c for k, c in fx_ops(gm).items() if "batch_norm" in k) == 1


@pytest.mark.parametrize("view", FOLDS + STAYS + ("bn_then_linear",))
def test_relax(view):
    """bn_then_linear stays: TVM's frontend writes the linear of the transposed value as a matmul with the weight
    broadcast over the batch ([3, 8, 16]), which is no linear over the channels; it must stay exact."""
    tvm = pytest.importorskip("tvm")
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from repfuse.backends.tvm import RepFuse

    model, x = module(view)
    with torch.no_grad():
        ref = model(x).numpy()
        mod = from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=False)
    fuse = RepFuse()
    fused = fuse(mod)
    vm = relax.VirtualMachine(tvm.compile(fused, target="llvm"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    assert_close((out if hasattr(out, "numpy") else out[0]).numpy(), ref)

    def count(m):
        ops = Counter()
        relax.analysis.post_order_visit(m["main"], lambda e: ops.update([e.op.name]) if isinstance(e, relax.Call)
                                        and isinstance(e.op, tvm.ir.Op) else None)
        return ops

    before, after = count(mod), count(fused)
    assert after["relax.nn.batch_norm"] == (view in STAYS + ("bn_then_linear",)), after
    assert after["relax.matmul"] <= before["relax.matmul"] and after["relax.multiply"] == 0, (before, after)
    assert after["relax.permute_dims"] <= before["relax.permute_dims"], (before, after)
    if view == "split":
        assert any("splits or merges the channel axis" in d.reason for d in fuse.last_declines)


# ---------------------------------------------------------------- the planner alone (no IR)

def fake_view(nodes, layouts, outputs):
    from test_rules_fake_view import FakeView

    class View(FakeView):
        def readers(self, v):
            if v in self.outputs:
                return None
            return [u for u, d in self.nodes.items() if v in (getattr(d, "input", None),) + tuple(getattr(d, "inputs", ()))]

    return View(nodes, layouts, outputs)


def apply_numpy(op, x):
    """An AffineConv on x whose channel axis is ndim - 1 - op.rank (pointwise ops only, as the planner writes)."""
    axis = x.ndim - 1 - op.rank
    w = op.weight.reshape(op.weight.shape[0], -1)  # [O, I] (dense: these tests use groups 1 or per-channel)
    if op.groups != 1:
        w = np.diag(w.reshape(-1))
    y = np.moveaxis(np.moveaxis(x, axis, -1) @ w.T + op.bias, -1, axis)
    return y


def evaluate_term(term, env):
    from repfuse.patterns import plan as P

    if isinstance(term, P.Apply):
        return apply_numpy(term.op, evaluate_term(term.input, env))
    if isinstance(term, P.Permute):
        return np.transpose(evaluate_term(term.input, env), term.perm)
    return env[term]


def planner_cases():
    from repfuse.patterns import affine
    from repfuse.patterns.planner import Affine, Layout, Permute

    rng = np.random.default_rng(0)
    lin = affine.linear(rng.standard_normal((6, 4)), rng.standard_normal(6))  # [O, I]
    bn = lambda c, rank: affine.batchnorm(rng.standard_normal(c), rng.random(c) + .5, rng.random(c) + .5,  # noqa: E731
                                          rng.standard_normal(c), 1e-5, rank)
    return {
        # tokens [2, 3, 4] -> linear -> [2, 3, 6] -> transpose -> [2, 6, 3] -> BatchNorm1d: views after the linear
        "after": ({"h": Affine("x", lin), "t": Permute("h", (0, 2, 1)), "y": Affine("t", bn(6, 1))},
                  {"x": Layout(4, 0), "h": Layout(6, 0), "t": Layout(6, 1), "y": Layout(6, 1)}, (2, 3, 4)),
        # [2, 4, 3] -> BatchNorm1d -> transpose -> [2, 3, 4] -> linear: the transpose before the linear
        "before": ({"n": Affine("x", bn(4, 1)), "t": Permute("n", (0, 2, 1)), "y": Affine("t", lin)},
                   {"x": Layout(4, 1), "n": Layout(4, 1), "t": Layout(4, 0), "y": Layout(6, 0)}, (2, 4, 3)),
        # ONNX's Gemm with transA=1 on A [4, 3], then a per-column BatchNorm
        "gemm_transA": ({"h": Permute("x", (1, 0), lin), "y": Affine("h", bn(6, 0))},
                        {"x": Layout(3, 0), "h": Layout(6, 0), "y": Layout(6, 0)}, (4, 3)),
    }


@pytest.mark.parametrize("name", ["after", "before", "gemm_transA"])
def test_planner_writes_views_around_the_fused_op(name):
    from repfuse.patterns import plan as P
    from repfuse.patterns.planner import Permute, fuse_regions

    nodes, layouts, shape = planner_cases()[name]
    view = fake_view(nodes, layouts, outputs=("y",))
    [edit] = fuse_regions(view).edits
    outer = {"after": P.Permute, "before": P.Apply, "gemm_transA": P.Apply}[name]
    assert isinstance(edit.term, outer) and edit.value == "y" and set(edit.erase) == set(nodes)
    env = {"x": np.random.default_rng(1).standard_normal(shape)}
    for v, d in nodes.items():  # the unfused graph, op by op
        x = np.transpose(env[d.input], d.perm) if isinstance(d, Permute) else env[d.input]
        env[v] = x if isinstance(d, Permute) and d.op is None else apply_numpy(d.op, x)
    assert_close(evaluate_term(edit.term, env), env["y"])


def test_planner_declines_a_transpose_that_moves_the_channel_axis():
    from repfuse.patterns import affine
    from repfuse.patterns.planner import Affine, Layout, Permute, fuse_regions

    lin = affine.linear(np.ones((6, 4)))
    nodes = {"h": Affine("x", lin), "t": Permute("h", (2, 1, 0)),  # [2, 3, 6] -> [6, 3, 2]: tokens on axis 1
             "y": Affine("t", affine.batchnorm(np.zeros(3), np.ones(3), None, None, 0.0, 1))}
    layouts = {"x": Layout(4, 0), "h": Layout(6, 0), "t": Layout(3, 1), "y": Layout(3, 1)}
    plan = fuse_regions(fake_view(nodes, layouts, outputs=("y",)))
    assert plan.edits == [] and "transpose moves the channel axis" in plan.declines["t"]
    conv = affine.conv(np.ones((4, 4, 3, 3)), None, 1, 1)  # a 3x3 kernel reads neighbours: it cannot cross
    nodes = {"h": Affine("x", conv), "t": Permute("h", (0, 2, 3, 1)), "y": Affine("t", affine.linear(np.ones((2, 4))))}
    layouts = {"x": Layout(4, 2), "h": Layout(4, 2), "t": Layout(4, 0), "y": Layout(2, 0)}
    plan = fuse_regions(fake_view(nodes, layouts, outputs=("y",)))
    assert plan.edits == [] and "neighbouring positions" in plan.declines["t"]
