"""RepVGG-A0 inference benchmark: repfuse against a hand-fused reference, eager and inductor.

What is measured
----------------
RepVGG-A0 from examples/zoo (zoo.repvgg) in its *training form*: every block is

    relu( BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x) )

(the identity BN branch only where in == out channels and stride 1), with
block counts [1, 2, 4, 14, 1] (the first "stage" is the stem block), widths
48, 48, 96, 192, 1280, then global average pooling and a Linear layer to 1000
classes.  Weights and all BatchNorm statistics/affine parameters are random
(fixed seed), so folding them is not a no-op.

The *hand-fused* deploy form is the zoo's `to_deploy`, the RepVGG paper's
conversion written without repfuse: each BN folded into its conv, the 1x1
kernel zero-padded to 3x3, the identity branch as a 3x3 kernel with 1 at the
centre of the diagonal, and the three summed into one Conv2d(3x3, bias=True)
+ ReLU.

Six variants are timed in one process:

    train-form eager        the training-form model, eager
    repfuse.deploy eager    repfuse.deploy(model, (x,)), eager
    hand-fused eager        the hand-fused model, eager
    inductor                torch.compile(model, backend="inductor")
    repfuse+inductor        torch.compile(model, backend="repfuse")  (inner compiler: inductor)
    hand-fused inductor     torch.compile(hand_fused, backend="inductor")

How
---
Everything runs under torch.no_grad() with torch.set_num_threads(--threads,
default 1) on one input of shape 1x3x224x224 (--quick: 1x3x64x64 and few
iterations).  Compiled variants are compiled (first call) before timing.
Each variant gets --warmup untimed calls, then --rounds rounds in which the
variants are called round-robin (the starting variant rotates each round),
one call per variant per round; the reported time is the median per call.
Ratios are taken to "hand-fused eager" for eager rows and to
"hand-fused inductor" for compiled rows.  Each variant's output is compared
with the training form (max abs error, tolerance 1e-4 * max |output|), and
the number of convolutions each eager variant runs is counted.

Usage:  python benchmarks/torch_repvgg.py [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import describe, fmt, interleaved, log, max_abs_error, status, versions, write_json, zoo_case  # noqa: E402

NETWORK = "repvgg-a0"


def count_convs(model: nn.Module) -> int:
    """Conv2d modules, plus conv call nodes when the model is an fx.GraphModule."""
    n = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    if isinstance(model, torch.fx.GraphModule):
        conv_fns = {torch.conv2d, nn.functional.conv2d, torch.ops.aten.conv2d.default,
                    torch.ops.aten.convolution.default}
        n += sum(node.op == "call_function" and node.target in conv_fns for node in model.graph.nodes)
    return n


# ---------------------------------------------------------------- main

EAGER = ["train-form eager", "repfuse.deploy eager", "hand-fused eager"]
COMPILED = ["inductor", "repfuse+inductor", "hand-fused inductor"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 64x64 input, few iterations")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per variant (default 10, quick 2)")
    parser.add_argument("--rounds", type=int, default=None, help="timed round-robin rounds (default 50, quick 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()

    size = 64 if args.quick else 224
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else 50)
    torch.set_num_threads(args.threads)
    case = zoo_case(NETWORK, args.seed, size)
    model, hand, x, ref, tol = case.model, case.checked_reference(), case.x, case.ref, case.tol
    hand_err = case.reference_err
    log(f"hand-fused check: max abs error {hand_err:.3g} (tolerance {tol:.3g}, max |output| {abs(ref).max():.3g})")

    fns: dict[str, object] = {}
    errors: dict[str, str] = {}  # variant -> one-line description of the exception
    tracebacks: dict[str, str] = {}
    convs: dict[str, int] = {}
    compile_s: dict[str, float] = {}

    fns["train-form eager"] = model
    convs["train-form eager"] = count_convs(model)
    log("repfuse.deploy ...")
    try:
        import repfuse

        t0 = time.perf_counter()
        gm = repfuse.deploy(model, (x,))
        compile_s["repfuse.deploy eager"] = time.perf_counter() - t0
        fns["repfuse.deploy eager"] = gm
        convs["repfuse.deploy eager"] = count_convs(gm)
    except Exception as e:
        errors["repfuse.deploy eager"] = describe(e)
        tracebacks["repfuse.deploy eager"] = traceback.format_exc()
        log(tracebacks["repfuse.deploy eager"])
    fns["hand-fused eager"] = hand
    convs["hand-fused eager"] = count_convs(hand)

    to_compile = {"inductor": (model, "inductor"), "repfuse+inductor": (model, "repfuse"),
                  "hand-fused inductor": (hand, "inductor")}
    for name, (module, backend) in to_compile.items():
        log(f"compiling {name} (torch.compile backend={backend!r}) ...")
        try:
            compiled = torch.compile(module, backend=backend)
            t0 = time.perf_counter()
            with torch.no_grad():
                compiled(x)  # the first call compiles
            compile_s[name] = time.perf_counter() - t0
            fns[name] = compiled
            log(f"  compiled in {compile_s[name]:.1f} s")
        except Exception as e:
            errors[name] = describe(e)
            tracebacks[name] = traceback.format_exc()
            log(tracebacks[name])

    # accuracy against the training form
    err: dict[str, float] = {}
    with torch.no_grad():
        for name, fn in fns.items():
            err[name] = max_abs_error(fn(x), ref)
    # the repfuse backend should actually have fused something (not passed the graph through)
    fused_graphs = None
    if "repfuse+inductor" in fns:
        try:
            from repfuse.backends.pytorch import compiled_graphs

            fused_graphs = len(compiled_graphs())
        except Exception:  # inspection helper missing: not an error of the variant
            pass

    log(f"timing: input 1x3x{size}x{size}, {args.threads} thread(s), {warmup} warmup, {rounds} rounds ...")
    with torch.no_grad():
        samples, _ = interleaved({name: (lambda f=fn: f(x)) for name, fn in fns.items()}, warmup, rounds)
    ms = {name: statistics.median(s) for name, s in samples.items()}

    # ---- report
    def ratio(name: str) -> float | None:
        base = "hand-fused eager" if name in EAGER else "hand-fused inductor"
        if name in ms and base in ms:
            return ms[name] / ms[base]
        return None

    print(f"\nRepVGG-A0, input 1x3x{size}x{size}, torch {torch.__version__}, {args.threads} thread(s), "
          f"median of {rounds} interleaved rounds after {warmup} warmups\n")
    print("| variant | median ms | ratio | convs | max abs err vs train | status |")
    print("|---|---:|---:|---:|---:|---|")
    results = []
    for name in EAGER + COMPILED:
        row = {"variant": name, "median_ms": ms.get(name), "ratio": ratio(name),
               "convs": convs.get(name), "max_abs_err": err.get(name),
               "compile_s": compile_s.get(name), "error": errors.get(name),
               "traceback": tracebacks.get(name)}
        row["status"] = status(errors.get(name), err.get(name), tol)
        if row["status"] == "ok" and name == "repfuse+inductor" and fused_graphs == 0:
            row["status"] = "NOT FUSED (the backend passed the graph through)"
        results.append(row)
        print(f"| {name} | {fmt(row['median_ms'], '.2f')} | {fmt(row['ratio'], '.3f')} | "
              f"{fmt(row['convs'], 'd')} | {fmt(row['max_abs_err'], '.2e')} | {row['status']} |")
    print("\nratio base: eager rows / hand-fused eager; compiled rows / hand-fused inductor")
    print(f"error tolerance: 1e-4 * max |output| = {tol:.2e}")
    if fused_graphs is not None:
        print(f"graphs fused by the repfuse backend: {fused_graphs}")

    targets = {}
    r1 = ratio("repfuse.deploy eager")
    targets["repfuse.deploy / hand-fused"] = {"ratio": r1, "target": "<= 1.02",
                                              "met": r1 is not None and r1 <= 1.02}
    r2 = ms["repfuse+inductor"] / ms["inductor"] if {"repfuse+inductor", "inductor"} <= set(ms) else None
    targets["repfuse+inductor / inductor"] = {"ratio": r2, "target": "< 1", "met": r2 is not None and r2 < 1}
    print()
    for label, t in targets.items():
        value = "-" if t["ratio"] is None else f"{t['ratio']:.3f}"
        print(f"{label}: {value}  (target {t['target']}: {'met' if t['met'] else 'NOT met'})")

    if args.json:
        write_json(args.json, {
            "model": "RepVGG-A0 (training form)", "input_shape": list(x.shape), "threads": args.threads,
            "warmup": warmup, "rounds": rounds, "seed": args.seed, "quick": args.quick, **versions("torch"),
            "machine": platform.machine(), "tolerance": tol, "hand_fused_check_err": hand_err,
            "repfuse_backend_fused_graphs": fused_graphs, "results": results, "targets": targets})

    bad = [r["variant"] for r in results if r["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
