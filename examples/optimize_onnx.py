"""repfuse optimize on an exported training-form network, checked with onnxruntime.

    python examples/optimize_onnx.py --network dbb-resnet18
"""

import tempfile
from pathlib import Path

import torch

from _common import NETWORKS, parser
from repfuse.backends.cli import main as repfuse_cli


def main():
    args = parser(__doc__, "dbb-resnet18", 224).parse_args()
    model = NETWORKS[args.network].build()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "train.onnx", Path(tmp) / "deploy.onnx"
        with torch.no_grad():
            torch.onnx.export(model, (torch.randn(1, 3, args.size, args.size),), str(src), dynamo=False,
                              input_names=["x"], dynamic_axes={"x": {0: "batch"}})
        print(f"exported {args.network}: {src.stat().st_size:,} bytes")
        return repfuse_cli(["optimize", str(src), "-o", str(out), "--check", "--report", str(Path(tmp) / "r.json")])


if __name__ == "__main__":
    raise SystemExit(main())
