"""The >2 GB path: build a training-form model with external data, run `repfuse optimize --check`.

    python benchmarks/external_data.py                  # ~2.7 GB (4 RepVGG blocks, 4096 channels)
    python benchmarks/external_data.py --channels 512   # small and quick
    python benchmarks/external_data.py --keep DIR       # keep the files (default: a temporary folder, deleted)

Each block is conv3x3+BN + conv1x1+BN + BN(identity), summed, then ReLU: repfuse folds it into
one 3x3 conv.  Weights are written straight to the data file one tensor at a time, so building
needs about one weight's memory.  Prints the files' sizes, the command's wall time and its peak
resident memory (the child's ru_maxrss), and the op counts before and after.

Measured (2 cores, 23 GB RAM, idle machine): 2.69 GB in, 2.42 GB out, 32 ops -> 8 (8 Conv -> 4), check ok
(max error 7e-5); wall 43.9 s, peak RSS 14.5 GB.  Before the planner released the fused weights of
absorbed regions (one float64 copy per value of every region) it was 94.5 s and 22.6 GB on a busy machine.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def build(folder: Path, channels: int, blocks: int, size: int, seed: int = 0) -> Path:
    """Write model.onnx and model.onnx.data into `folder`; returns the model's path."""
    rng = np.random.default_rng(seed)
    model_path, data_name = folder / "model.onnx", "model.onnx.data"
    inits, nodes = [], []
    with open(folder / data_name, "wb") as data:
        def weight(name: str, array: np.ndarray) -> str:
            array = np.ascontiguousarray(array, np.float32)
            offset = data.tell()
            data.write(array.tobytes())
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape,
                            data_location=TensorProto.EXTERNAL)
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
                t.external_data.add(key=k, value=v)
            inits.append(t)
            return name

        def bn(name: str, x: str) -> str:
            c = channels
            params = [weight(f"{name}.{p}", a) for p, a in (
                ("scale", rng.random(c) + 0.5), ("bias", rng.standard_normal(c)),
                ("mean", rng.standard_normal(c)), ("var", rng.random(c) * 3 + 0.2))]
            nodes.append(helper.make_node("BatchNormalization", [x] + params, [name]))
            return name

        x = "x"
        for b in range(blocks):
            scale = 1.0 / np.sqrt(9 * channels)  # keeps activations O(1) through the blocks
            w3 = weight(f"b{b}.w3", rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) * scale)
            w1 = weight(f"b{b}.w1", rng.standard_normal((channels, channels, 1, 1), dtype=np.float32) * scale)
            nodes.append(helper.make_node("Conv", [x, w3], [f"b{b}.c3"], pads=[1, 1, 1, 1]))
            nodes.append(helper.make_node("Conv", [x, w1], [f"b{b}.c1"]))
            s = [bn(f"b{b}.bn3", f"b{b}.c3"), bn(f"b{b}.bn1", f"b{b}.c1"), bn(f"b{b}.bnid", x)]
            nodes.append(helper.make_node("Add", s[:2], [f"b{b}.add"]))
            nodes.append(helper.make_node("Add", [f"b{b}.add", s[2]], [f"b{b}.sum"]))
            nodes.append(helper.make_node("Relu", [f"b{b}.sum"], [f"b{b}.out"]))
            x = f"b{b}.out"
    shape = [1, channels, size, size]
    graph = helper.make_graph(nodes, "repvgg_big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    model = onnx.shape_inference.infer_shapes(model)  # reads dims only, never the external data
    onnx.save(model, str(model_path))
    return model_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=4096)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--size", type=int, default=4, help="spatial size of the input")
    parser.add_argument("--keep", metavar="DIR", help="build in DIR and keep the files")
    args = parser.parse_args()

    with harness.workdir(args.keep, "repfuse-ext-") as folder:
        start = time.perf_counter()
        src = build(folder, args.channels, args.blocks, args.size)
        size_in = src.stat().st_size + (folder / "model.onnx.data").stat().st_size
        print(f"built {src} ({size_in / 1e9:.2f} GB) in {time.perf_counter() - start:.1f}s", flush=True)
        out = folder / "fused.onnx"
        cmd = [sys.executable, "-m", "repfuse", "optimize", str(src), "-o", str(out), "--check", "-q"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # KiB -> GB (approx.)
        print(proc.stdout.strip())
        if proc.stderr.strip():
            print(proc.stderr.strip(), file=sys.stderr)
        if proc.returncode:
            print(f"repfuse optimize --check exited {proc.returncode}", file=sys.stderr)
            return proc.returncode
        size_out = sum(p.stat().st_size for p in folder.glob("fused.onnx*"))
        before = [n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node]
        after = [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]
        print(f"input  {size_in / 1e9:.2f} GB, {len(before)} ops ({before.count('Conv')} Conv, "
              f"{before.count('BatchNormalization')} BatchNormalization)")
        print(f"output {size_out / 1e9:.2f} GB, {len(after)} ops ({after.count('Conv')} Conv)")
        print(f"repfuse optimize --check: wall {wall:.1f} s, peak RSS {peak:.2f} GB")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
