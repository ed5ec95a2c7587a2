"""The seed-paper rewrites on the TVM Relax path: dead channels, dynamic-conv aggregation, constant folding
of weight slicing, and switching rules by name.

Models come from torch.export through TVM's frontend (parameters as module constants); each is built
for llvm once before and once after RepFuse and run on the VM: the fused module must match torch and
the unfused module, and its structure must have changed the way the rule says.
"""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import rewrite_blocks as RB

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402

from repfuse.backends.tvm import RepFuse, fuse_module, pipeline  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from zoo import NETWORKS  # noqa: E402

warnings.filterwarnings("ignore")


def to_relax(model, x):
    with torch.no_grad():
        return from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=False)


def run(mod, x, relax_pipeline="default"):
    ex = tvm.compile(mod, target="llvm", relax_pipeline=relax_pipeline)
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()


def convs(mod) -> list[relax.Call]:
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.nn.conv2d":
            found.append(expr)

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def conv_weights(mod) -> list[tuple[int, ...]]:
    """The weight shape of every conv2d, in binding order."""
    return [tuple(int(d) for d in call.args[1].ty.shape.values) for call in convs(mod)]


def constant_weights(mod) -> bool:
    return all(not isinstance(call.args[1], relax.Var) for call in convs(mod))


def check(model, x, mod, fused):
    """The fused module matches torch and the unfused module on the VM; fusing again changes nothing."""
    with torch.no_grad():
        ref = model(x).numpy()
    before, after = run(mod, x), run(fused, x)
    tol = 1e-4 * np.abs(ref).max()
    assert np.abs(before - ref).max() <= tol
    assert np.abs(after - ref).max() <= tol
    assert np.abs(after - before).max() <= tol
    tvm.ir.assert_structural_equal(RepFuse()(fused), fused)


def rows(pass_) -> dict:
    return {r.name: r for r in pass_.last_report}


@pytest.mark.parametrize("factory, shapes, removed", [
    # channel 1 (zero) and 2 (0.5) of the producer are constant; a 1x1 consumer takes 0.5 into its bias
    (lambda: RB.DeadChannels(0.5, k=1, padding=0), [(6, 3, 3, 3), (6, 6, 1, 1)], 2),
    # through a padded 3x3 the non-zero constant is not a bias at the borders: it stays
    (lambda: RB.DeadChannels(0.5, k=3, padding=1), [(7, 3, 3, 3), (6, 7, 3, 3)], 1),
    # channel 3 is dead in one branch of the residual sum only: the sum's channel is not constant
    (lambda: RB.ResidualDead(both=False), [(8, 3, 3, 3), (8, 8, 3, 3), (8, 8, 1, 1), (4, 8, 1, 1)], 0),
    (lambda: RB.ResidualDead(both=True), [(8, 3, 3, 3), (7, 8, 3, 3), (7, 8, 1, 1), (4, 7, 1, 1)], 1),
], ids=["k1", "k3-padded", "residual-one-branch", "residual-both"])
def test_dead_channels(factory, shapes, removed):
    model = factory()
    x = torch.randn(1, 3, 8, 8)
    mod = to_relax(model, x)
    fuse = RepFuse()
    fused = fuse(mod)
    assert conv_weights(fused) == shapes
    assert rows(fuse)["dead_channels"].applied == removed
    check(model, x, mod, fused)


@pytest.mark.parametrize("batch", [1, 4])
def test_dynamic_conv(batch):
    model = RB.DynamicNet()
    x = torch.randn(batch, 3, 8, 8)
    mod = to_relax(model, x)
    fuse = RepFuse()
    fused = fuse(mod)
    assert len(conv_weights(mod)) == 8 + 1
    # the stem, then one conv per dynamic conv with the per-sample kernels as its groups
    assert conv_weights(fused) == [(8, 3, 3, 3), (batch * 12, 8, 3, 3), (batch * 12, 1, 3, 3)]
    assert rows(fuse)["dynamic_conv"].applied == 2
    check(model, x, mod, fused)


def test_dynamic_conv_declines_a_symbolic_batch():
    model = RB.DynamicConv(4, 6, K=2)
    x = torch.randn(2, 4, 6, 6)
    batch = torch.export.Dim("batch", min=2, max=8)
    with torch.no_grad():
        exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    mod = from_exported_program(exported, keep_params_as_input=False)
    fuse = RepFuse()
    fused = fuse(mod)
    assert len(conv_weights(fused)) == 2  # the weighted convs stay
    assert "symbolic batch" in rows(fuse)["dynamic_conv"].detail


@pytest.mark.parametrize("name", ["pruned-resnet", "nas-supernet"])
def test_zoo_reaches_its_reference(name):
    """Dead channels (pruned ResNet) and folded weight slices (NAS supernet) give the reference's convs."""
    net = NETWORKS[name]
    model = net.build()
    with torch.no_grad():
        reference = net.to_deploy(model)
    x = torch.randn(1, 3, 64, 64)
    mod = to_relax(model, x)
    fused = RepFuse()(mod)
    want = sorted(tuple(m.weight.shape) for m in reference.modules() if isinstance(m, torch.nn.Conv2d))
    assert sorted(conv_weights(fused)) == want and constant_weights(fused)
    # before: full-width convs (pruned ResNet) or convs reading slices of the full weights (supernet)
    assert sorted(conv_weights(mod)) != want or not constant_weights(mod)
    check(model, x, mod, fused)


def test_rules_by_name():
    model = RB.DeadChannels(0.5, k=1, padding=0)
    x = torch.randn(1, 3, 8, 8)
    mod = to_relax(model, x)
    fuse = RepFuse(disable=["dead_channels"])
    kept = fuse(mod)
    assert conv_weights(kept) == [(8, 3, 3, 3), (6, 8, 1, 1)]
    assert not rows(fuse)["dead_channels"].enabled and rows(fuse)["affine"].applied == 2
    names = ["constant_folding", "affine", "conv_transpose", "dynamic_conv", "dead_channels"]
    same, report = fuse_module(mod, disable=names)
    assert same is mod and not any(r.applied for r in report)
    assert [r.name for r in report][:5] == names
    with torch.no_grad():
        ref = model(x).numpy()
    out = run(mod, x, pipeline("default", disable=["dead_channels"]))
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    with pytest.raises(ValueError, match="unknown rule"):
        RepFuse(disable=["dead_channel"])
    with pytest.raises(ValueError, match="unknown rule"):
        pipeline(enable=["nope"])


@pytest.mark.parametrize("enable", [False, True], ids=["default-off", "enabled"])
def test_ghost_concat_fires_only_where_enabled(enable):
    model = RB.Ghost()
    x = torch.randn(1, 8, 9, 9)
    mod = to_relax(model, x)
    fuse = RepFuse(enable=["ghost_concat"] if enable else [])
    fused = fuse(mod)
    assert rows(fuse)["ghost_concat"].applied == int(enable)
    assert ("R.concat(" in fused["main"].script()) != enable
    assert ((12, 1, 3, 3) in conv_weights(fused)) == enable  # two outputs per channel
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(run(fused, x) - ref).max() <= 1e-4 * np.abs(ref).max()
