"""Golden tests for the ONNX adapter: each rule on a small graph written in onnx.parser text.

Every Before graph is optimized (without onnxsim) and compared with its Expected graph
structurally (op sequence, attributes, wiring, a float constant's dims, an integer constant's
values) and numerically against Before in onnxruntime on random inputs (BatchNorm statistics far
from 0/1).  In both texts every graph input but `x` becomes a random float initializer.  The
must-not-fire cases assert the graph is unchanged and the decline's rule, node and reason.
"""

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from repfuse.backends import onnx as pipeline
from repfuse.patterns.plan import Decline

HEADER = '<ir_version: 9, opset_import: ["" : {opset}]>\n'
BN = "float[4] {0}_scale, float[4] {0}_bias, float[4] {0}_mean, float[4] {0}_var"


def build(text: str, opset: int = 17, seed: int = 0, inputs: tuple = ("x",)) -> onnx.ModelProto:
    """The model of `text`; graph inputs not in `inputs` become initializers (BatchNorm-like by name suffix)."""
    model = onnx.parser.parse_model(HEADER.format(opset=opset) + text)
    rng = np.random.default_rng(seed)
    kept = []
    for v in model.graph.input:
        if v.name in inputs:
            kept.append(v)
            continue
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        a = {"var": rng.random(dims) * 3 + 0.2, "scale": rng.random(dims) + 0.5,
             "mean": rng.standard_normal(dims) * 2}.get(v.name.rsplit("_", 1)[-1], rng.standard_normal(dims))
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(a, np.float32), v.name))
    del model.graph.input[:]
    model.graph.input.extend(kept)
    onnx.checker.check_model(model)
    return model


def structure(graph: onnx.GraphProto, outer: dict | None = None, scope: str = "") -> tuple:
    """Node by node (op type, attributes, inputs), then the outputs with their declared dims; an input is a
    graph input's position, an earlier node's output, a float constant's dims or an integer constant's values."""
    names = dict(outer or {})
    for t in graph.initializer:
        a = numpy_helper.to_array(t)
        names[t.name] = ("ints", tuple(a.reshape(-1).tolist())) if a.dtype.kind in "iu" else ("float", a.shape)
    names.update({v.name: f"{scope}input{i}" for i, v in enumerate(graph.input) if v.name not in names})
    rows = []
    for j, node in enumerate(graph.node):
        attrs = {}
        for a in node.attribute:
            value = onnx.helper.get_attribute_value(a)
            attrs[a.name] = structure(value, names, f"{scope}{j}/") if a.type == onnx.AttributeProto.GRAPH else \
                tuple(value) if isinstance(value, list) else value
        rows.append((node.op_type, attrs, tuple(names.get(i, i) for i in node.input)))
        names.update({o: f"{scope}node{j}.{k}" for k, o in enumerate(node.output)})
    return tuple(rows), tuple((names[o.name], dims(o)) for o in graph.output)


def dims(v: onnx.ValueInfoProto) -> tuple:
    return tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)


def shapes_agree(model: onnx.ModelProto) -> None:
    """Every shape the writer declared is what ONNX's shape inference gives where it knows the dim (a size, or
    a symbol of the graph's inputs)."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    inferred = {v.name: dims(v) for v in onnx.shape_inference.infer_shapes(bare).graph.value_info}
    symbols = {d for v in model.graph.input for d in dims(v) if isinstance(d, str)}
    for v in model.graph.value_info:
        if v.name in inferred and v.type.tensor_type.HasField("shape"):
            got, want = dims(v), inferred[v.name]
            assert len(got) == len(want) and all(g == w for g, w in zip(got, want)
                                                 if isinstance(w, int) and w or w in symbols), (v.name, got, want)


def optimize(model: onnx.ModelProto, enable=()):
    fused, report = pipeline.optimize(model, simplify_first=False, rules=pipeline.rule_set(enable=enable))
    return pipeline.to_proto(fused), report


def same_numbers(model, fused, shape, seed=1):
    feeds = {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}
    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)

    for got, ref in zip(run(fused), run(model)):
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1.0)


def rule_row(report, name):
    return next(r for r in report.rules if r.name == name)


# ---------------------------------------------------------------- Before -> Expected, per rule

CASES = {
    # constant_folding: a weight computed from parameters only becomes one initializer
    "constant_folding": ("constant_folding", (2, 4, 8, 8), """
        g (float[N,4,8,8] x, float[3,3,4,4] wt, float[1] k) => (float[N,4,8,8] y) {
          w = Transpose <perm=[2,3,0,1]> (wt)
          ws = Mul (w, k)
          y = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, ws)
        }""", """
        g (float[N,4,8,8] x, float[4,4,3,3] w) => (float[N,4,8,8] y) {
          y = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, w)
        }"""),
    # affine: Conv + BatchNorm -> one Conv with bias
    "conv_bn": ("affine", (2, 4, 8, 8), f"""
        g (float[N,4,8,8] x, float[4,4,3,3] w, {BN.format('bn')}) => (float[N,4,8,8] y) {{
          c = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, w)
          y = BatchNormalization <epsilon=0.001> (c, bn_scale, bn_bias, bn_mean, bn_var)
        }}""", """
        g (float[N,4,8,8] x, float[4,4,3,3] w, float[4] b) => (float[N,4,8,8] y) {
          y = Conv <kernel_shape=[3,3], strides=[1,1], dilations=[1,1], pads=[1,1,1,1], group=1> (x, w, b)
        }"""),
    # affine: RepVGG's 3x3 + 1x1 + identity branches, each with its BatchNorm -> one 3x3 Conv
    "repvgg": ("affine", (2, 4, 8, 8), f"""
        g (float[N,4,8,8] x, float[4,4,3,3] w3, {BN.format('b3')}, float[4,4,1,1] w1, {BN.format('b1')},
           {BN.format('id')}) => (float[N,4,8,8] y) {{
          c3 = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, w3)
          n3 = BatchNormalization (c3, b3_scale, b3_bias, b3_mean, b3_var)
          c1 = Conv <kernel_shape=[1,1]> (x, w1)
          n1 = BatchNormalization (c1, b1_scale, b1_bias, b1_mean, b1_var)
          ni = BatchNormalization (x, id_scale, id_bias, id_mean, id_var)
          s = Add (n3, n1)
          t = Add (s, ni)
          y = Relu (t)
        }}""", """
        g (float[N,4,8,8] x, float[4,4,3,3] w, float[4] b) => (float[N,4,8,8] y) {
          t = Conv <kernel_shape=[3,3], strides=[1,1], dilations=[1,1], pads=[1,1,1,1], group=1> (x, w, b)
          y = Relu (t)
        }"""),
    # affine: a zero Pad (asymmetric) folds into the Conv's pads
    "pad_fold": ("affine", (2, 4, 8, 8), """
        g (float[N,4,8,8] x, float[6,4,3,3] w, float[6] b) => (float[N,6,9,9] y)
        <int64[8] pads = {0, 0, 1, 2, 0, 0, 2, 1}> {
          p = Pad (x, pads)
          y = Conv <kernel_shape=[3,3]> (p, w, b)
        }""", """
        g (float[N,4,8,8] x, float[6,4,3,3] w, float[6] b) => (float[N,6,9,9] y) {
          y = Conv <kernel_shape=[3,3], strides=[1,1], dilations=[1,1], pads=[1,2,2,1], group=1> (x, w, b)
        }"""),
    # affine: an average pool (no padding) folds into the Conv before it
    "pool_fold": ("affine", (2, 4, 8, 8), """
        g (float[N,4,8,8] x, float[4,4,1,1] w) => (float[N,4,4,4] y) {
          c = Conv <kernel_shape=[1,1]> (x, w)
          y = AveragePool <kernel_shape=[2,2], strides=[2,2]> (c)
        }""", """
        g (float[N,4,8,8] x, float[4,4,2,2] w, float[4] b) => (float[N,4,4,4] y) {
          y = Conv <kernel_shape=[2,2], strides=[2,2], dilations=[1,1], pads=[0,0,0,0], group=1> (x, w, b)
        }"""),
    # affine: three per-channel ops alone -> a per-channel scale and shift ([C, 1, 1] constants), never a conv
    "scale_shift": ("affine", (2, 4, 8, 8), f"""
        g (float[N,4,8,8] x, {BN.format('bn')}, float[1,4,1,1] c, float[4,1,1] d) => (float[N,4,8,8] y) {{
          n = BatchNormalization (x, bn_scale, bn_bias, bn_mean, bn_var)
          m = Mul (n, c)
          a = Add (m, d)
          y = Relu (a)
        }}""", """
        g (float[N,4,8,8] x, float[4,1,1] s, float[4,1,1] t) => (float[N,4,8,8] y) {
          m = Mul (x, s)
          a = Add (m, t)
          y = Relu (a)
        }"""),
    # affine: Gemm + BatchNorm on [N, C] -> one Gemm (W as [O, I])
    "gemm_bn": ("affine", (3, 6), f"""
        g (float[N,6] x, float[6,4] w, float[4] b, {BN.format('bn')}) => (float[N,4] y) {{
          l = Gemm (x, w, b)
          y = BatchNormalization (l, bn_scale, bn_bias, bn_mean, bn_var)
        }}""", """
        g (float[N,6] x, float[4,6] w, float[4] b) => (float[N,4] y) {
          y = Gemm <transB=1> (x, w, b)
        }"""),
    # affine: a linear over tokens [B, T, C] (MatMul + Add, channels last) absorbs a per-channel scale
    "tokens": ("affine", (2, 5, 6), """
        g (float[B,T,6] x, float[6,4] w, float[4] b, float[4] c) => (float[B,T,4] y) {
          l = MatMul (x, w)
          a = Add (l, b)
          y = Mul (a, c)
        }""", """
        g (float[B,T,6] x, float[6,4] w, float[4] b) => (float[B,T,4] y) {
          l = MatMul (x, w)
          y = Add (l, b)
        }"""),
    # affine: Linear -> flatten -> BatchNorm1d -> unflatten -> Linear on tokens is one linear (Regroup)
    "tokens_regroup": ("affine", (2, 5, 6), f"""
        g (float[B,5,6] x, float[6,4] w1, float[4] b1, {BN.format('bn')}, float[4,3] w2, float[4] c, float[3] b2)
          => (float[B,5,3] y) <int64[2] flat = {{-1, 4}}, int64[3] tokens = {{-1, 5, 4}}> {{
          l1 = MatMul (x, w1)
          a1 = Add (l1, b1)
          r1 = Reshape (a1, flat)
          n = BatchNormalization (r1, bn_scale, bn_bias, bn_mean, bn_var)
          r2 = Reshape (n, tokens)
          m = Mul (r2, c)
          l2 = MatMul (m, w2)
          y = Add (l2, b2)
        }}""", """
        g (float[B,5,6] x, float[6,3] w, float[3] b) => (float[B,5,3] y) {
          l = MatMul (x, w)
          y = Add (l, b)
        }"""),
    # ... and when the region ends flattened, the fused linear's output is reshaped like its root
    "tokens_flattened": ("affine", (2, 5, 6), f"""
        g (float[B,5,6] x, float[6,4] w1, float[4] b1, {BN.format('bn')}) => (float[M,4] y)
        <int64[2] flat = {{-1, 4}}> {{
          l1 = MatMul (x, w1)
          a1 = Add (l1, b1)
          r1 = Reshape (a1, flat)
          y = BatchNormalization (r1, bn_scale, bn_bias, bn_mean, bn_var)
        }}""", """
        g (float[B,5,6] x, float[6,4] w, float[4] b) => (float[M,4] y) <int64[2] shape = {-1, 4}> {
          l = MatMul (x, w)
          a = Add (l, b)
          y = Reshape (a, shape)
        }"""),
    # dead_channels: output channel 1 of the first conv is all zeros: it goes from both convs
    "dead_channels": ("dead_channels", (2, 3, 8, 8), """
        g (float[N,3,8,8] x, float[8,3,3,3] w1, float[8] b1, float[6,8,1,1] w2, float[6] b2) => (float[N,6,8,8] y) {
          c = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, w1, b1)
          r = Relu (c)
          y = Conv <kernel_shape=[1,1]> (r, w2, b2)
        }""", """
        g (float[N,3,8,8] x, float[7,3,3,3] w1, float[7] b1, float[6,7,1,1] w2, float[6] b2) => (float[N,6,8,8] y) {
          c = Conv <kernel_shape=[3,3], strides=[1,1], dilations=[1,1], pads=[1,1,1,1], group=1> (x, w1, b1)
          r = Relu (c)
          y = Conv <kernel_shape=[1,1], strides=[1,1], dilations=[1,1], pads=[0,0,0,0], group=1> (r, w2, b2)
        }"""),
    # dead_channels on tokens: a MatMul's weight is [I, O] and its output channels are the last axis
    "dead_channels_tokens": ("dead_channels", (2, 3, 6), """
        g (float[B,T,6] x, float[6,8] w1, float[8] b1, float[8,4] w2, float[4] b2) => (float[B,T,4] y) {
          l = MatMul (x, w1)
          a = Add (l, b1)
          r = Relu (a)
          l2 = MatMul (r, w2)
          y = Add (l2, b2)
        }""", """
        g (float[B,T,6] x, float[6,7] w1, float[7] b1, float[7,4] w2, float[4] b2) => (float[B,T,4] y) {
          l = MatMul (x, w1)
          a = Add (l, b1)
          r = Relu (a)
          l2 = MatMul (r, w2)
          y = Add (l2, b2)
        }"""),
    # ghost_concat: concat(y, depthwise(y)) read by a dense conv -> one depthwise conv with two outputs per
    # channel, the reader's input channels permuted
    "ghost_concat": ("ghost_concat", (2, 3, 8, 8), """
        g (float[N,3,8,8] x, float[4,3,1,1] w1, float[4] b1, float[4,1,3,3] wd, float[4] bd, float[6,8,1,1] w2)
          => (float[N,6,8,8] y) {
          c = Conv <kernel_shape=[1,1]> (x, w1, b1)
          r = Relu (c)
          d = Conv <kernel_shape=[3,3], pads=[1,1,1,1], group=4> (r, wd, bd)
          cat = Concat <axis=1> (r, d)
          y = Conv <kernel_shape=[1,1]> (cat, w2)
        }""", """
        g (float[N,3,8,8] x, float[4,3,1,1] w1, float[4] b1, float[8,1,3,3] wg, float[8] bg, float[6,8,1,1] w2,
           float[6] b2) => (float[N,6,8,8] y) {
          c = Conv <kernel_shape=[1,1]> (x, w1, b1)
          r = Relu (c)
          gh = Conv <kernel_shape=[3,3], strides=[1,1], dilations=[1,1], pads=[1,1,1,1], group=4> (r, wg, bg)
          y = Conv <kernel_shape=[1,1], strides=[1,1], dilations=[1,1], pads=[0,0,0,0], group=1> (gh, w2, b2)
        }"""),
}

# dynamic_conv: sum_k pi_k * conv_k(x), then a BatchNorm -> one conv with per-sample kernels (static batch:
# the batch as groups)
ATTENTION = """
          g = GlobalAveragePool (x)
          f = Flatten (g)
          l = Gemm <transB=1> (f, wg)
          p = Softmax <axis=1> (l)
          p0 = Slice (p, zero, one, one)
          p1 = Slice (p, one, two, one)
          s0 = Reshape (p0, col)
          s1 = Reshape (p1, col)"""
DYNAMIC = """
        g (float[{n},4,8,8] x, float[2,4] wg, float[4,4,3,3] wa, float[4] ba, float[4,4,3,3] wb, float[4] bb,
           {bn}) => (float[{n},4,8,8] y)
        <int64[1] zero = {{0}}, int64[1] one = {{1}}, int64[1] two = {{2}}, int64[4] col = {{-1, 1, 1, 1}}> {{{att}
          ya = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, wa, ba)
          yb = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, wb, bb)
          ma = Mul (ya, s0)
          mb = Mul (s1, yb)
          sum = Add (ma, mb)
          y = BatchNormalization (sum, bn_scale, bn_bias, bn_mean, bn_var)
        }}"""
CASES["dynamic_conv"] = ("dynamic_conv", (2, 4, 8, 8), DYNAMIC.format(n=2, bn=BN.format("bn"), att=ATTENTION), """
        g (float[2,4,8,8] x, float[2,4] wg, float[2,144] wk, float[2,4] bk, float[1,4] bs) => (float[2,4,8,8] y)
        <int64[1] zero = {0}, int64[1] one = {1}, int64[1] two = {2}, int64[4] col = {-1, 1, 1, 1},
         int64[2] column = {-1, 1}, int64[4] kernel = {-1, 4, 3, 3}, int64[1] flat = {-1},
         int64[4] merge = {1, -1, 0, 0}, int64[4] split = {2, 4, 0, 0}> {""" + ATTENTION + """
          r0 = Reshape (s0, column)
          r1 = Reshape (s1, column)
          pi = Concat <axis=1> (r0, r1)
          xm = Reshape (x, merge)
          wn = MatMul (pi, wk)
          w = Reshape (wn, kernel)
          bn = MatMul (pi, bk)
          bsum = Add (bn, bs)
          b = Reshape (bsum, flat)
          c = Conv <kernel_shape=[3,3], strides=[1,1], pads=[1,1,1,1], dilations=[1,1], group=2> (xm, w, b)
          y = Reshape (c, split)
        }""")
# dynamic batch: ONNX's group is an attribute, so a Scan runs one sample at a time
CASES["dynamic_conv_scan"] = ("dynamic_conv", (3, 4, 8, 8), DYNAMIC.format(n="N", bn=BN.format("bn"), att=ATTENTION),
                              """
        g (float[N,4,8,8] x, float[2,4] wg, float[2,144] wk, float[2,4] bk, float[1,4] bs) => (float[N,4,8,8] y)
        <int64[1] zero = {0}, int64[1] one = {1}, int64[1] two = {2}, int64[4] col = {-1, 1, 1, 1},
         int64[2] column = {-1, 1}, int64[4] kernel = {-1, 4, 3, 3}, int64[1] flat = {-1}, int64[1] axis0 = {0}> {""" + ATTENTION + """
          r0 = Reshape (s0, column)
          r1 = Reshape (s1, column)
          pi = Concat <axis=1> (r0, r1)
          y = Scan <body = body (float[4,8,8] xi, float[2] pii) => (float[4,8,8] yi) {
              wn = MatMul (pii, wk)
              w = Reshape (wn, kernel)
              bn = MatMul (pii, bk)
              bsum = Add (bn, bs)
              b = Reshape (bsum, flat)
              xu = Unsqueeze (xi, axis0)
              c = Conv <kernel_shape=[3,3], strides=[1,1], pads=[1,1,1,1], dilations=[1,1], group=1> (xu, w, b)
              yi = Squeeze (c, axis0)
            }, num_scan_inputs=2> (x, pi)
        }""")


def _dead_channel(model: onnx.ModelProto, weight_axis: int) -> None:
    """Zero output channel 1 of w1 / b1 (what network slimming leaves)."""
    for t in model.graph.initializer:
        if t.name in ("w1", "b1"):
            a = numpy_helper.to_array(t).copy()
            a[(slice(None),) * (weight_axis if t.name == "w1" else 0) + (1,)] = 0
            t.CopyFrom(numpy_helper.from_array(a, t.name))


@pytest.mark.parametrize("case", list(CASES))
def test_golden(case):
    rule, shape, before, expected = CASES[case]
    model = build(before)
    if rule == "dead_channels":
        _dead_channel(model, weight_axis=1 if "tokens" in case else 0)  # MatMul: [I, O]; Conv: [O, I, ...]
    fused, report = optimize(model, enable=["ghost_concat"] if rule == "ghost_concat" else ())
    assert structure(fused.graph) == structure(build(expected).graph)
    shapes_agree(fused)
    assert rule_row(report, rule).applied >= 1
    same_numbers(model, fused, shape)
    if case == "dynamic_conv_scan":
        same_numbers(model, fused, (1,) + shape[1:])


def test_ghost_concat_is_off_by_default():
    fused, report = optimize(build(CASES["ghost_concat"][2]))
    assert "Concat" in [n.op_type for n in fused.graph.node]
    assert not rule_row(report, "ghost_concat").enabled


# ---------------------------------------------------------------- must not fire

NOT_FIRING = {  # case: (opset, Before, the decline)
    # a padded conv after a biased 1x1 conv: its border would read the bias instead of zeros
    "padded_after_bias": (17, """
        g (float[N,4,8,8] x, float[4,4,1,1] w1, float[4] b1, float[4,4,3,3] w3) => (float[N,4,8,8] y) {
          [c1] c = Conv <kernel_shape=[1,1]> (x, w1, b1)
          [c3] y = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (c, w3)
        }""", Decline("affine", "Conv c3",
                      "the second op pads with zeros where the first op's bias would be (border differs)")),
    "bn_training_mode": (15, f"""
        g (float[N,4,8,8] x, float[4,4,3,3] w, {BN.format('bn')}) => (float[N,4,8,8] y) {{
          [conv] c = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, w)
          [bn] y, mean, var = BatchNormalization <training_mode=1> (c, bn_scale, bn_bias, bn_mean, bn_var)
        }}""", Decline("affine", "BatchNormalization bn", "BatchNorm in training mode uses batch statistics")),
    "reflect_pad": (17, """
        g (float[N,4,8,8] x, float[4,4,3,3] w) => (float[N,4,8,8] y) <int64[8] pads = {0, 0, 1, 1, 0, 0, 1, 1}> {
          [pad] p = Pad <mode="reflect"> (x, pads)
          [conv] y = Conv <kernel_shape=[3,3]> (p, w)
        }""", Decline("affine", "Pad pad", "reflect padding")),
    "circular_pad": (19, """
        g (float[N,4,8,8] x, float[4,4,3,3] w) => (float[N,4,8,8] y) <int64[8] pads = {0, 0, 1, 1, 0, 0, 1, 1}> {
          [pad] p = Pad <mode="wrap"> (x, pads)
          [conv] y = Conv <kernel_shape=[3,3]> (p, w)
        }""", Decline("affine", "Pad pad", "wrap padding")),
    "pool_without_counted_padding": (17, """
        g (float[N,4,8,8] x, float[4,4,1,1] w) => (float[N,4,8,8] y) {
          [conv] c = Conv <kernel_shape=[1,1]> (x, w)
          [pool] y = AveragePool <kernel_shape=[3,3], pads=[1,1,1,1], count_include_pad=0> (c)
        }""", Decline("affine", "AveragePool pool",
                      "avg pool with padding and count_include_pad=False divides border windows by fewer taps")),
    "overridable_weight": (17, f"""
        g (float[N,4,8,8] x, float[4,4,3,3] w, {BN.format('bn')}) => (float[N,4,8,8] y) {{
          [conv] c = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, w)
          [bn] y = BatchNormalization (c, bn_scale, bn_bias, bn_mean, bn_var)
        }}""", Decline("affine", "Conv conv", "conv weight is a graph input (overridable default)")),
}


@pytest.mark.parametrize("case", list(NOT_FIRING))
def test_must_not_fire(case):
    opset, text, decline = NOT_FIRING[case]
    model = build(text, opset)
    if case == "overridable_weight":  # w stays an initializer and is also listed as an input
        model.graph.input.append(onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 4, 3, 3]))
    fused, report = optimize(model)
    assert structure(fused.graph) == structure(model.graph)
    assert decline in report.declined, report.declined
    same_numbers(model, fused, (2, 4, 8, 8))
