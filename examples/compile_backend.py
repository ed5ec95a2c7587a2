"""torch.compile(backend="repfuse"): fused before the inner compiler, with weights that stay live.

    python examples/compile_backend.py --inner eager      # inductor (default) takes longer to start
"""

import dataclasses
import time

import torch

from _common import NETWORKS, parser, rel_err


def main():
    p = parser(__doc__, "acnet-resnet18", 160)
    p.add_argument("--inner", default="inductor", choices=["inductor", "eager", "tvm"])
    args = p.parse_args()
    net = NETWORKS[args.network]
    model = net.build()
    x = torch.randn(1, 3, args.size, args.size)
    compiled = torch.compile(model, backend="repfuse", options={"inner": args.inner})
    with torch.no_grad():
        t = time.perf_counter()
        out = compiled(x)
        print(f"compile + first call ({args.inner}): {time.perf_counter() - t:.1f} s; "
              f"max relative error {rel_err(out, model(x)):.2e}")
        model.load_state_dict(dataclasses.replace(net, seed=1).build().state_dict())  # other weights, same graph
        print(f"after load_state_dict: max relative error {rel_err(compiled(x), model(x)):.2e}")
        for name, timed in (("training form, eager", model), (f"repfuse + {args.inner}", compiled)):
            t = time.perf_counter()
            for _ in range(5):
                timed(x)
            print(f"{name:28s} {(time.perf_counter() - t) / 5 * 1e3:8.1f} ms per call")


if __name__ == "__main__":
    main()
