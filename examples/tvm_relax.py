"""TVM Relax: the RepFuse pass and the "repfuse" pipeline on a zoo network.

    python examples/tvm_relax.py --network mobileone-s0
"""

import time

import torch

from _common import NETWORKS, parser, rel_err


def main():
    args = parser(__doc__, "mobileone-s0", 96).parse_args()
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from repfuse.backends.tvm import RepFuse  # importing it registers the "repfuse" pipeline

    model = NETWORKS[args.network].build()
    x = torch.randn(1, 3, args.size, args.size)
    with torch.no_grad():
        reference = model(x)
        mod = from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=False)
    fused = RepFuse()(mod)
    count = lambda m: m["main"].script().count("R.nn.conv2d(")  # noqa: E731
    print(f"{args.network}: conv2d calls {count(mod)} -> {count(fused)}")
    for pipeline in ("default", "repfuse"):
        t = time.perf_counter()
        vm = relax.VirtualMachine(tvm.compile(mod, target="llvm", relax_pipeline=pipeline), tvm.cpu())
        built = time.perf_counter() - t
        t = time.perf_counter()
        out = vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
        print(f'relax_pipeline="{pipeline}": built in {built:.1f} s, one call {(time.perf_counter() - t) * 1e3:.0f} ms '
              f"(untuned), max relative error {rel_err(out, reference.numpy()):.2e}")


if __name__ == "__main__":
    main()
