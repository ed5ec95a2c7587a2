"""The TVM Relax path: the RepFuse pass, the "repfuse" pipeline, and pass-through cases.

Modules come from torch.export through TVM's own frontend; each is built for
llvm before and after the pass and run on the VM on the same random input.
"""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import blocks as B

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402

from repfuse.backends.tvm import RepFuse, pipeline  # noqa: E402

warnings.filterwarnings("ignore")


def to_relax(model, x, keep_params_as_input=False):
    return from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=keep_params_as_input)


def run(mod, x, pipeline_name="default"):
    ex = tvm.compile(mod, target="llvm", relax_pipeline=pipeline_name)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()


def count_convs(mod) -> int:
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and \
                expr.op.name in ("relax.nn.conv2d", "relax.nn.conv1d", "relax.matmul"):
            found.append(expr)

    relax.analysis.post_order_visit(mod["main"], visit)
    return len(found)


def count_batchnorms(mod) -> int:
    return mod["main"].script().count("R.nn.batch_norm")


FAMILIES = [n for n in B.CASES if n not in ("tiny_net",)]


@pytest.mark.parametrize("name", FAMILIES)
def test_block_fuses_and_matches(name):
    factory, shape, n_convs, n_bns = B.CASES[name]
    model = B.randomize(factory(), seed=21)
    x = torch.randn(shape)
    mod = to_relax(model, x)
    fused = RepFuse()(mod)
    assert count_convs(fused) == n_convs
    if n_bns is not None:
        assert count_batchnorms(fused) == n_bns
    ref = model(x).detach().numpy()
    before, after = run(mod, x), run(fused, x)
    scale = np.abs(ref).max()
    assert np.abs(before - ref).max() <= 1e-4 * scale
    assert np.abs(after - before).max() <= 1e-4 * scale


def test_pipeline_by_name_and_idempotence():
    model = B.randomize(B.TinyRepNet())
    x = torch.randn(1, 3, 32, 32)
    mod = to_relax(model, x)
    ref = model(x).detach().numpy()
    out = run(mod, x, "repfuse")  # registered by importing repfuse.backends.tvm
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    once = RepFuse()(mod)
    assert count_convs(once) == 7
    tvm.ir.assert_structural_equal(RepFuse()(once), once)


def test_nothing_to_fuse_is_structurally_unchanged():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x)) * torch.sigmoid(x)

    mod = to_relax(Plain().eval(), torch.randn(1, 4, 8, 8))
    tvm.ir.assert_structural_equal(RepFuse()(mod), mod)


def test_unbound_params_are_left_alone_until_bound():
    model = B.randomize(B.RepVGGBlock(8, 8))
    x = torch.randn(1, 8, 9, 9)
    mod = to_relax(model, x, keep_params_as_input=True)
    tvm.ir.assert_structural_equal(RepFuse()(mod), mod)
    params = mod["main"].attrs["params"]  # the frontend attaches the values in parameter order
    bound = relax.transform.BindParams("main", {v: p for v, p in zip(mod["main"].params[1:], params)})(mod)
    assert count_convs(RepFuse()(bound)) == 1


def test_pipeline_in_front_of_another():
    model = B.randomize(B.ACBlock(8, 8))
    x = torch.randn(1, 8, 9, 9)
    mod = to_relax(model, x)
    ex = tvm.compile(mod, target="llvm", relax_pipeline=pipeline("default"))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    ref = model(x).detach().numpy()
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_repfuse_imports_without_tvm():
    code = ("import sys; sys.modules['tvm'] = None\n"
            "import repfuse, repfuse.patterns\n"
            "try:\n    import repfuse.backends.tvm\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'repfuse[tvm]'" in out


def test_torch_compile_with_inner_tvm_matches_eager_and_follows_weights():
    torch._dynamo.reset()
    model = B.randomize(B.RepVGGBlock(8, 8))
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        compiled = torch.compile(model, backend="repfuse", options={"inner": "tvm"})
        out = compiled(x)
        ref = model(x)
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
        model.load_state_dict(B.randomize(B.RepVGGBlock(8, 8), seed=9).state_dict())
        ref = model(x)
        assert (compiled(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["repvgg", "dbb_bn_and_pad"])
def test_cli_compile_onnx_to_library(name, tmp_path, capsys):
    from repfuse.backends.cli import main

    factory, shape, _, _ = B.CASES[name]
    model = B.randomize(factory(), seed=2)
    src = tmp_path / "in.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.randn(shape),), str(src), dynamo=False, input_names=["x"])
    lib = tmp_path / "model.so"
    assert main(["compile", str(src), "-o", str(lib), "--check", "-q"]) == 0
    assert "ok" in capsys.readouterr().out
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    x = torch.randn(shape)
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    out = out[0] if hasattr(out, "__len__") and not hasattr(out, "numpy") else out
    ref = model(x).detach().numpy()
    assert np.abs(out.numpy() - ref).max() <= 1e-4 * np.abs(ref).max()
