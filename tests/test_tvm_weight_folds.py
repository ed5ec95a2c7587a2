"""Relax constant folding of weights built from smaller ones (OREPA: an einsum product, a 1x1 kernel
padded to 3x3): the conv weight becomes a constant, so its BatchNorm folds; numbers on the TVM VM
against torch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402

from repfuse.backends.tvm import RepFuse  # noqa: E402

import blocks as B  # noqa: E402


class GeneratedWeight(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8))
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        if self.how == "matmul":
            return self.bn(F.conv2d(x, (self.a @ self.b).view(8, 8, 1, 1)))
        return self.bn(F.conv2d(x, F.pad(self.a.view(8, 8, 1, 1), [1, 1, 1, 1]), padding=1))


def ops(mod) -> list[str]:
    names = []
    relax.analysis.post_order_visit(mod["main"], lambda e: names.append(e.op.name) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) else None)
    return names


@pytest.mark.parametrize("how", ["matmul", "pad"])
def test_generated_weight_folds_and_its_batchnorm_with_it(how):
    model = B.randomize(GeneratedWeight(how)).eval()
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mod = from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=False)
        ref = model(x).numpy()
    fused = RepFuse()(mod)
    names = ops(fused)
    assert names.count("relax.nn.conv2d") == 1 and "relax.nn.batch_norm" not in names
    assert "relax.matmul" not in names and "relax.nn.pad" not in names
    pipeline = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), relax.transform.LegalizeOps()])
    vm = relax.VirtualMachine(tvm.compile(pipeline(fused), target="llvm"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    out = out[0] if not hasattr(out, "numpy") else out
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
