"""DBB's BN-and-pad border writes whose positions are computed from shapes at run time.

The torch ONNX exporters with dynamic shapes write them as ScatterNDs with indices from Shape / Range / Add
(TorchScript) or as Transpose + ScatterND (dynamo's slice_scatter); torch.compile sees setitems whose fill
is computed in forward.  Each fuses to the deploy form's convs with no BatchNorm left, and the numbers match
the unfused model at two sizes.  A write that is not exactly the border at every size (part of it, at the
wrong offset, with an extent that follows a dim) or a fill that is not the BN's zero response stays.
"""

import contextlib
import io
import operator
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repfuse.backends import onnx as pipeline
from repfuse.backends import pytorch as backend
from repfuse.patterns.affine import Declined
from repfuse.patterns.borders import band, scatter_write
from repfuse.patterns.shapes import Algebra, Lin, Sym

import blocks as B  # noqa: F401 (puts examples/ on sys.path)
from zoo.common import randomize

DIMS = {"batch": {0: "n"}, "hw": {0: "n", 2: "h", 3: "w"}}


def export(model, x, exporter: str, dims: str) -> onnx.ModelProto:
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            return torch.onnx.export(model, (x,), dynamo=True, input_names=["x"], dynamic_shapes=(DIMS[dims],),
                                     verbose=False).model_proto
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["x"], dynamic_axes={"x": DIMS[dims]})
        return onnx.load_from_string(buf.getvalue())


def run(proto: onnx.ModelProto, x: np.ndarray):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def fuse(proto: onnx.ModelProto):
    model, report = pipeline.optimize(proto)
    fused = pipeline.to_proto(model)
    return fused, [n.op_type for n in fused.graph.node], report


def assert_same_numbers(model, exported, fused, shapes) -> int:
    """fused == exported wherever the exported model runs.  The TorchScript exporter bakes the example's sizes
    into the fill's Expand, so its model runs at the example size only; where it does not, a fused model that
    runs must equal the PyTorch model.  Returns at how many sizes the fused model ran."""
    ran = 0
    for i, shape in enumerate(shapes):
        x = np.random.default_rng(i).standard_normal(shape, dtype=np.float32)
        try:
            expected = run(exported, x)
        except Exception:
            expected = None
        try:
            got = run(fused, x)
        except Exception:
            assert expected is None, f"the fused model refuses {shape}, which the exported one takes"
            continue
        if expected is None:
            with torch.no_grad():
                expected = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        ran += 1
    return ran


# ---------------------------------------------------------------- the judgement, on symbolic sizes

H = Lin(2, {"d2": 1})  # a padded dim: h + 2 for an input dim h >= 0


def test_band_holds_at_every_size_or_declines():
    alg = Algebra()
    assert band(alg, Lin(0), H, H) == slice(None)
    assert band(alg, Lin(0), Lin(1), H) == slice(0, 1)
    assert band(alg, H - 1, Lin(1), H) == slice(-1, None)
    for offset, extent in [(Lin(1), Lin(1)), (Lin(0), H - 10), (H - 3, Lin(1))]:  # the border at one h only
        with pytest.raises(Declined):
            band(alg, offset, extent, H)


def index_sym(alg, components, shape):
    """indices [*shape, m] whose component j is components[j] (a Lin of the positions #0..)."""
    table = np.empty((1,) * len(shape) + (len(components),), object)
    table[..., :] = components
    return Sym(tuple(shape) + (Lin(len(components)),), table)


def test_scatter_write_reads_a_box_and_declines_what_is_not_one():
    alg, data = Algebra(), Sym((Lin(0, {"d0": 1}), Lin(3), H, H), None)
    fill = np.empty((1, 3, 1, 1), object)
    fill[0, :, 0, 0] = [Lin(0.5), Lin(-1.0), Lin(2.0)]
    updates = Sym((data.shape[0], Lin(3), Lin(1), H), fill)
    n, c, w = (Lin(0, {f"#{i}": 1}) for i in (0, 1, 3))
    rows = index_sym(alg, [n, c, H - 1, w], (data.shape[0], Lin(3), Lin(1), H))  # the last row, every column
    box, values = scatter_write(alg, data, rows, updates, 1)
    assert [band(alg, o, e, d) for (o, e), d in zip(box, data.shape)] == [slice(None)] * 2 + [slice(-1, None),
                                                                                               slice(None)]
    assert values.tolist() == [0.5, -1.0, 2.0]
    twice = index_sym(alg, [n, c, Lin(0), Lin(0)], (data.shape[0], Lin(3), Lin(1), H))  # w not walked
    with pytest.raises(Declined, match="more than once"):
        scatter_write(alg, data, twice, updates, 1)
    outside = index_sym(alg, [n, c, H, w], (data.shape[0], Lin(3), Lin(1), H))
    with pytest.raises(Declined, match="outside"):
        scatter_write(alg, data, outside, updates, 1)
    by_position = Sym(updates.shape, np.full((1, 1, 1, 1), Lin(0, {"#3": 1}), object))  # fill = column index
    with pytest.raises(Declined, match="not one per channel|not a constant"):
        scatter_write(alg, data, rows, by_position, 1)


def test_a_dim_that_may_be_one_does_not_broadcast_silently():
    alg = Algebra()
    n = Lin(0, {"d0": 1})  # a batch: may be 1
    ramp = alg.range(Lin(0), n, Lin(1))  # [0, 1, .., n-1]
    assert alg.expand(ramp, [Lin(4)]).table is None  # n = 1 broadcasts, n = 4 does not: values unknown
    padded = alg.range(Lin(0), H, Lin(1))  # h + 2 >= 2: broadcasting it against 4 means h + 2 = 4
    assert alg.expand(padded, [Lin(4)]).table is not None and alg.resolve(H) == Lin(4)


# ---------------------------------------------------------------- the exporters' forms fuse

FORMS = {  # exporter, dynamic dims, block (DBB: cin, cout, k, stride), example size, second size
    "torchscript-batch": ("torchscript", "batch", (4, 6, 3, 1), (2, 4, 9, 9), (3, 4, 9, 9)),
    "torchscript-hw": ("torchscript", "hw", (4, 6, 5, 2), (2, 4, 9, 9), (3, 4, 11, 14)),
    "dynamo-batch": ("dynamo", "batch", (4, 6, 3, 1), (2, 4, 9, 9), (3, 4, 9, 9)),
    "dynamo-hw": ("dynamo", "hw", (4, 6, 5, 2), (2, 4, 9, 9), (3, 4, 11, 14)),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_exported_dbb_fuses_to_its_deploy_form(form):
    exporter, dims, (cin, cout, k, stride), example, second = FORMS[form]
    model = randomize(B.DBB(cin, cout, k, stride))  # the deploy form (zoo.dbb.fuse_dbb) is one conv
    exported = export(model, torch.randn(example), exporter, dims)
    assert [n.op_type for n in exported.graph.node].count("ScatterND") == 8  # 4 border writes x 2 BN-and-pads
    fused, kinds, report = fuse(exported)
    assert kinds.count("Conv") == 1 and "BatchNormalization" not in kinds and "ScatterND" not in kinds, kinds
    assert not [d for d in report.declined if "border" in d.reason], report.table(explain=True)
    assert assert_same_numbers(model, exported, fused, [example, second]) == 2


# ---------------------------------------------------------------- and what is not exactly the border stays

class Writes(nn.Module):
    """1x1 conv -> BN -> pad by 1 -> border writes -> 3x3 conv -> BN, with the writes of `variant`:
    "border" (DBB's BN-and-pad), "partial" (no last column), "offset" (rows 1:2 instead of 0:1), "wrong"
    (the BN's bias as fill) or "sized" (rows :h-10, the border at the example's h = 11 only)."""

    def __init__(self, variant: str = "border", c: int = 4):
        super().__init__()
        self.variant = variant
        self.one = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.kxk = nn.Conv2d(c, c, 3, bias=False)
        self.out = nn.BatchNorm2d(c)

    def forward(self, x):
        bn = self.bn
        y = F.pad(bn(self.one(x)), [1, 1, 1, 1])
        fill = bn.bias if self.variant == "wrong" else bn.bias - bn.running_mean * bn.weight / torch.sqrt(
            bn.running_var + bn.eps)
        fill = fill.view(1, -1, 1, 1)
        top = {"offset": slice(1, 2), "sized": slice(0, y.shape[2] - 10)}.get(self.variant, slice(0, 1))
        y[:, :, top, :] = fill
        y[:, :, -1:, :] = fill
        y[:, :, :, 0:1] = fill
        if self.variant != "partial":
            y[:, :, :, -1:] = fill
        return self.out(self.kxk(y))


VARIANTS = {  # variant -> why it stays
    "partial": "border writes do not cover exactly the padded border",
    "offset": "border write is not at a fixed distance from the ends at every size",
    "wrong": "pad value differs from the op's response to a zero input",
    "sized": "border write's extent is not known at every size",  # max(h - 10, 0): clamped below h = 10
}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_writes_that_are_not_the_border_stay(variant, exporter):
    if variant == "sized" and exporter == "torchscript":
        pytest.skip("TorchScript bakes the example's sizes into the fill: its graph runs at h = 11 only, "
                    "where rows :h-10 are the border (fusing is then exact for every input it takes)")
    model = randomize(Writes(variant))
    example = (2, 4, 9, 9)
    exported = export(model, torch.randn(example), exporter, "hw")
    fused, kinds, report = fuse(exported)
    assert "ScatterND" in kinds, kinds  # the writes stay
    assert any(VARIANTS[variant] in d.reason for d in report.declined), report.table(explain=True)
    assert assert_same_numbers(model, exported, fused, [example, (3, 4, 12, 10)]) >= 1


def test_the_border_form_of_the_same_block_fuses():
    """The control for the variants above: the same block with DBB's writes is one conv."""
    model = randomize(Writes("border"))
    exported = export(model, torch.randn(2, 4, 9, 9), "dynamo", "hw")
    fused, kinds, _ = fuse(exported)
    assert kinds.count("Conv") == 1 and "ScatterND" not in kinds and "BatchNormalization" not in kinds, kinds
    assert assert_same_numbers(model, exported, fused, [(2, 4, 9, 9), (3, 4, 12, 10)]) == 2


# ---------------------------------------------------------------- torch.compile on the official code's idiom

class IdentityBasedConv1x1(nn.Conv2d):
    """The official DBB code's 1x1: an identity kernel kept as a plain tensor attribute, added in forward."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 1, bias=False)
        self.id_tensor = torch.eye(channels).view(channels, channels, 1, 1)
        nn.init.normal_(self.weight, std=0.1)

    def forward(self, x):
        return F.conv2d(x, self.weight + self.id_tensor.to(self.weight.device))


class BNAndPadLayer(nn.Module):
    """The official DBB code's BN-and-pad: the fill computed in forward from the BN's parameters."""

    def __init__(self, pad: int, channels: int):
        super().__init__()
        self.bn, self.pad = nn.BatchNorm2d(channels), pad

    def forward(self, x):
        out = self.bn(x)
        bn, p = self.bn, self.pad
        values = (bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps))
        out = F.pad(out, [p] * 4)
        values = values.to(out.dtype).view(1, -1, 1, 1)
        out[:, :, 0:p, :] = values
        out[:, :, -p:, :] = values
        out[:, :, :, 0:p] = values
        out[:, :, :, -p:] = values
        return out


class OfficialStyleDBB(nn.Module):
    """kxk conv-BN + (identity-based 1x1 -> BN-and-pad -> kxk -> BN): one kxk conv deployed."""

    def __init__(self, c: int = 4, k: int = 3):
        super().__init__()
        self.origin = nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c))
        self.chain = nn.Sequential(IdentityBasedConv1x1(c), BNAndPadLayer(k // 2, c), nn.Conv2d(c, c, k, bias=False),
                                   nn.BatchNorm2d(c))

    def forward(self, x):
        return self.origin(x) + self.chain(x)


def compiled(model):
    torch._dynamo.reset()
    return torch.compile(model, backend="repfuse", options={"inner": "eager"})


def call(f, x):
    """f(x), and the graphs the backend built for that call (compiled_graphs() has no order)."""
    before = {id(g) for g in backend.compiled_graphs()}
    y = f(x)
    return y, [g for g in backend.compiled_graphs() if id(g) not in before]


def has_writes(graph) -> bool:
    return any(n.target is operator.setitem for n in graph.graph_module.graph.nodes)


def test_compile_fuses_the_official_idiom_at_every_size():
    model = randomize(OfficialStyleDBB())
    f = compiled(model)
    with torch.no_grad():
        for shape in [(2, 4, 9, 9), (3, 4, 11, 14)]:  # the second call recompiles with dynamic sizes
            x = torch.randn(shape)
            y, graphs = call(f, x)
            torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-5)
            assert len(graphs) == 1 and graphs[0].report.after.convs == 1 and not has_writes(graphs[0]), \
                [g.report.table(explain=True) for g in graphs]
        model.chain[0].id_tensor.mul_(0.5)  # module state like a weight: an in-place edit is followed
        torch.testing.assert_close(f(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["wrong", "sized"])
def test_compile_keeps_writes_that_are_not_the_border(variant):
    model = randomize(Writes(variant))
    f = compiled(model)
    with torch.no_grad():
        for shape in [(2, 4, 9, 9), (3, 4, 12, 10)]:  # the second call recompiles with dynamic sizes
            x = torch.randn(shape)
            y, graphs = call(f, x)
            torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-5)
            # at the example size rows :h-10 are the border (and the static graph guards that size)
            static_sized = variant == "sized" and shape[2] == 9
            assert len(graphs) == 1 and has_writes(graphs[0]) != static_sized, graphs[0].report.table(explain=True)
