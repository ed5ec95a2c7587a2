"""repfuse.deploy: a zoo network's training form to a fused torch.fx.GraphModule, saved and reloaded.

    python examples/deploy_pytorch.py --network dbb-resnet18
"""

import io
import time

import torch

import repfuse
from _common import NETWORKS, parser, rel_err
from zoo.common import count_convs


def main():
    args = parser(__doc__, "repvgg-a0", 224).parse_args()
    net = NETWORKS[args.network]
    model = net.build()
    x = torch.randn(1, 3, args.size, args.size)
    t = time.perf_counter()
    deployed = repfuse.deploy(model, (x,))
    print(f"repfuse.deploy({args.network}) took {time.perf_counter() - t:.1f} s")
    print(deployed.meta["repfuse_report"])
    if net.to_deploy is not None:
        print(f"the paper's own deploy form has {count_convs(net.to_deploy(model))} conv/linear layers")
    buffer = io.BytesIO()
    torch.save(deployed, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        print(f"max relative error, saved and reloaded vs training form: {rel_err(reloaded(x), model(x)):.2e}")


if __name__ == "__main__":
    main()
