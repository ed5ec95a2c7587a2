"""timm's models through repfuse on every IR, against timm's own conversion: counts and exactness.

    python benchmarks/corpus.py                     # the whole corpus, every IR; prints a markdown table
    python benchmarks/corpus.py --models repvgg_a0,resnet18 --ir fx,onnx
    python benchmarks/corpus.py --readme            # also rewrite the README's corpus table

Per model and IR, counts of convs / BatchNorms / linears (weight-bearing matmuls) in
three forms: the training form, timm's `reparameterize_model` of it (each family's own
`reparameterize`/`fuse`), and repfuse's output of the training form.  The fused output
is compared with the training form on random inputs at two input sizes (FX, ONNX) or
one (TVM).  `status` is "ok" when the numbers agree and every count is no higher than
timm's.  tests/test_timm_corpus.py asserts the same through `measure`.

The ONNX column exports with torch.onnx.export (TorchScript exporter by default, dynamic batch
and spatial dims; --exporter dynamo for the torch.export-based one); the TVM column
imports torch.export programs with TVM's Relax frontend and runs RepFuse.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from zoo.timm_corpus import CORPUS, build, timm_convert  # noqa: E402
from harness import interleaved  # noqa: E402

IRS = ("fx", "onnx", "tvm")
TOLERANCE = 1e-4  # max abs error relative to max |output| of the training form (float32 noise of deep nets)
README_BEGIN, README_END = "<!-- corpus:begin -->", "<!-- corpus:end -->"


@dataclass
class Counts:
    conv: int
    bn: int
    linear: int

    def __str__(self) -> str:
        return f"{self.conv}/{self.bn}/{self.linear}"

    def within(self, other: "Counts") -> bool:
        return self.conv <= other.conv and self.bn <= other.bn and self.linear <= other.linear


@dataclass
class Result:
    model: str
    ir: str
    training: Counts | None = None
    timm: Counts | None = None
    repfuse: Counts | None = None
    errors: list[float] = field(default_factory=list)  # relative max abs error per input size
    latency: float | None = None  # onnxruntime median time, repfuse's output over the training export (--latency)
    seconds: float = 0.0
    failure: str = ""

    @property
    def exact(self) -> bool:
        return bool(self.errors) and max(self.errors) <= TOLERANCE

    @property
    def status(self) -> str:
        if self.failure:
            return self.failure
        if not self.exact:
            return f"error {max(self.errors):.1e}"
        return "ok" if self.repfuse.within(self.timm) else "behind timm"


def inputs(entry, seed: int = 0):
    """Two random inputs: the model's size and a larger one (or, for a fixed-size model, another batch)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    other = (3, entry.size, entry.size) if entry.fixed_size else (2, entry.size + 32, entry.size + 32)
    return [torch.randn(2, 3, entry.size, entry.size, generator=g), torch.randn(other[0], 3, *other[1:], generator=g)]


def relative_error(out, ref) -> float:
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))


# ------------------------------------------------------------------ counting per IR


def fx_counts(stats) -> Counts:
    """From a GraphStats of an FX graph (ops keyed by torch op name)."""
    conv = sum(n for k, n in stats.ops.items() if k.startswith("conv"))
    bn = sum(n for k, n in stats.ops.items() if "batch_norm" in k)
    return Counts(conv, bn, stats.convs - conv)


def onnx_counts(model) -> Counts:
    """Conv / BatchNormalization / Gemm-or-MatMul-with-a-constant-operand counts of an onnx_ir Model."""
    consts = {v.name for v in model.graph.initializers.values()}
    ops = Counter()
    for node in model.graph.all_nodes():
        if node.op_type == "Constant":
            consts.update(o.name for o in node.outputs)
    for node in model.graph.all_nodes():
        kind = node.op_type
        if kind in ("Gemm", "MatMul"):
            kind = "linear" if any(i is not None and i.name in consts for i in node.inputs[:2]) else "matmul"
        ops[kind] += 1
    return Counts(ops["Conv"] + ops["ConvTranspose"], ops["BatchNormalization"], ops["linear"])


def relax_counts(mod) -> Counts:
    """Conv / batch_norm / matmul-with-a-constant-operand (possibly through permute_dims) counts."""
    import tvm
    from tvm import relax

    ops, bound = Counter(), {}

    def constant(e) -> bool:
        e = bound.get(e, e)
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.permute_dims":
            return constant(e.args[0])
        return isinstance(e, tvm.ir.expr.Constant)  # relax's constants since TVM 0.27

    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for block in getattr(func.body, "blocks", []):
            for binding in block.bindings:
                bound[binding.var] = binding.value
        for value in bound.values():
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                name = value.op.name
                if name == "relax.matmul":
                    name = "linear" if any(constant(a) for a in value.args[:2]) else "matmul"
                ops[name] += 1
    conv = sum(n for k, n in ops.items() if re.match(r"relax\.nn\.conv", k))
    return Counts(conv, ops["relax.nn.batch_norm"], ops["linear"])


# ------------------------------------------------------------------ one IR at a time


def measure_fx(model, reference, xs):
    """Counts training / timm / repfuse, errors per input, and no latency (each measure_* returns these five)."""
    import torch

    import repfuse
    from repfuse.patterns.rules import RULES

    with torch.no_grad():
        fused = repfuse.deploy(model, (xs[0],))
        ref_form = repfuse.deploy(reference, (xs[0],), disable=[r.name for r in RULES])
        errors = [relative_error(fused(x), model(x)) for x in xs]
    report = fused.meta["repfuse_report"]
    return (fx_counts(report.before), fx_counts(ref_form.meta["repfuse_report"].before), fx_counts(report.after),
            errors, None)


EXPORTER = "torchscript"  # or "dynamo" (torch's default, several times slower to export): --exporter


def _export_onnx(model, x, exporter: str) -> bytes:
    import torch

    dims = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            program = torch.onnx.export(model, (x,), dynamo=True, input_names=["x"], verbose=False,
                                        dynamic_shapes=(dims,))
            return program.model_proto.SerializeToString()
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["x"], dynamic_axes={"x": dims})
        return buf.getvalue()


def measure_onnx(model, reference, xs, exporter: str, latency: bool = False):
    """Counts, errors, and with `latency` repfuse's median onnxruntime time over the training export's."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    from repfuse.backends import onnx as pipeline

    training = onnx.load_from_string(_export_onnx(model, xs[0], exporter))
    converted = onnx.load_from_string(_export_onnx(reference, xs[0], exporter))
    fused, _ = pipeline.optimize(training)
    session = ort.InferenceSession(pipeline.to_proto(fused).SerializeToString(), providers=["CPUExecutionProvider"])
    reference_session = ort.InferenceSession(training.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    errors = [relative_error(session.run(None, {name: x.numpy()})[0],
                             reference_session.run(None, {name: x.numpy()})[0]) for x in xs]
    ratio = None
    if latency:
        feed = {name: xs[0].numpy()}
        samples, _ = interleaved({"repfuse": lambda: session.run(None, feed),
                                  "training": lambda: reference_session.run(None, feed)}, warmup=3, budget_s=4.0,
                                 min_rounds=10)
        ratio = float(np.median(samples["repfuse"]) / np.median(samples["training"]))
    counts = [onnx_counts(ir.serde.deserialize_model(m)) for m in (training, converted)]
    return counts[0], counts[1], onnx_counts(fused), errors, ratio


def _relax(model, x):
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    with torch.no_grad():
        return from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=False)


def measure_tvm(model, reference, xs):
    import torch
    import tvm
    from tvm import relax

    from repfuse.backends.tvm import RepFuse

    x = xs[0]
    training, converted = _relax(model, x), _relax(reference, x)
    fused = RepFuse()(training)
    pipeline = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                         relax.transform.LegalizeOps()])
    executable = tvm.compile(pipeline(fused), target="llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    out = out[0] if isinstance(out, (list, tuple)) or hasattr(out, "__getitem__") and not hasattr(out, "numpy") else out
    with torch.no_grad():
        ref = model(x)
    errors = [relative_error(out.numpy(), ref)]
    return relax_counts(training), relax_counts(converted), relax_counts(fused), errors, None


MEASURE = {"fx": measure_fx, "onnx": measure_onnx, "tvm": measure_tvm}


def measure(name: str, ir: str, latency: bool = False) -> Result:
    """One corpus model through one IR; never raises (a failure is the row's status)."""
    entry = next(m for m in CORPUS if m.name == name)
    result = Result(name, ir)
    start = time.perf_counter()
    try:
        model = build(name, **dict(entry.kwargs))
        reference = timm_convert(model)
        extra = (entry.exporter or EXPORTER, latency) if ir == "onnx" else ()
        result.training, result.timm, result.repfuse, result.errors, result.latency = MEASURE[ir](
            model, reference, inputs(entry), *extra)
    except Exception as e:  # a table row, not a crash of the whole run
        first = (str(e).strip().splitlines() or [""])[0]
        result.failure = f"{type(e).__name__}: {first[:120]}"
    result.seconds = time.perf_counter() - start
    return result


# ------------------------------------------------------------------ the table


def table(results: list[Result], irs: list[str]) -> str:
    """Markdown: per model, conv/BN/linear counts training -> timm -> repfuse per IR, and status."""
    by_model: dict[str, dict[str, Result]] = {}
    for r in results:
        by_model.setdefault(r.model, {})[r.ir] = r
    timed = any(r.latency for r in results)
    head = "| model | family | " + " | ".join(f"{ir}: training → timm → repfuse" for ir in irs)
    head += " | onnxruntime latency, repfuse / training" * timed + " | status |"
    lines = [head, "|" + "---|" * (3 + len(irs) + timed)]
    for entry in CORPUS:
        rows = by_model.get(entry.name)
        if not rows:
            continue
        cells, states = [], []
        for ir in irs:
            r = rows.get(ir)
            if r is None:
                cells.append("–")
            elif r.failure:
                cells.append("failed")
                states.append(f"{ir}: {r.failure}")
            else:
                cells.append(f"{r.training} → {r.timm} → **{r.repfuse}**")
                if r.status != "ok":
                    states.append(f"{ir}: {r.status}")
        if timed:
            latency = rows.get("onnx").latency if rows.get("onnx") else None
            cells.append("–" if latency is None else f"{latency:.3f}")
        lines.append(f"| {entry.name} | {entry.family} | " + " | ".join(cells) + f" | {'; '.join(states) or 'ok'} |")
    return "\n".join(lines)


def update_readme(text: str) -> None:
    readme = ROOT / "README.md"
    content = readme.read_text()
    if README_BEGIN not in content:
        raise SystemExit(f"README.md has no {README_BEGIN} marker")
    before, rest = content.split(README_BEGIN, 1)
    _, after = rest.split(README_END, 1)
    readme.write_text(f"{before}{README_BEGIN}\n{text}\n{README_END}{after}")


def main(argv=None) -> int:
    global EXPORTER
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated timm names (default: the whole corpus)")
    parser.add_argument("--ir", default=",".join(IRS), help="comma-separated IRs among fx,onnx,tvm (default: all)")
    parser.add_argument("--exporter", choices=["torchscript", "dynamo"], default=EXPORTER,
                        help="torch.onnx.export's exporter for the ONNX column (default: %(default)s)")
    parser.add_argument("--latency", action="store_true",
                        help="also time repfuse's ONNX output against the training export on onnxruntime")
    parser.add_argument("--readme", action="store_true", help="rewrite the corpus table in README.md")
    args = parser.parse_args(argv)
    EXPORTER = args.exporter
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    names = args.models.split(",") if args.models else [m.name for m in CORPUS]
    unknown = sorted(set(names) - {m.name for m in CORPUS})
    if unknown:
        parser.error(f"not in the corpus: {', '.join(unknown)}")
    irs = args.ir.split(",")
    if set(irs) - set(IRS):
        parser.error(f"--ir takes {', '.join(IRS)}")
    results = []
    tvm_subset = {m.name for m in CORPUS if m.tvm}
    for name in names:
        for ir in irs:
            if ir == "tvm" and not args.models and name not in tvm_subset:
                continue  # TVM on its subset unless models are named
            r = measure(name, ir, latency=args.latency)
            results.append(r)
            speed = f"  onnxruntime x{r.latency:.3f}" if r.latency else ""
            print(f"{name:24} {ir:5} {r.seconds:6.1f}s  {r.training} -> {r.timm} -> {r.repfuse}  {r.status}{speed}",
                  file=sys.stderr, flush=True)
    text = "counts are convs/BatchNorms/linears\n\n" + table(results, irs)
    print(text)
    if args.readme:
        update_readme(text)
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
