"""repfuse's ONNX path against peer ONNX optimizers, on four re-parameterized CNNs, plus scaling.

What is measured
----------------
Four networks of examples/zoo in their *training form* (random weights,
randomized BatchNorm statistics, eval mode), each with the zoo's *hand-fused*
deploy form (`to_deploy`: its paper's own conversion, written without
repfuse):

    repvgg-a0        RepVGG-A0 (3x3-BN + 1x1-BN + BN identity, then ReLU)
    acnet-resnet18   ResNet-18 whose 3x3 conv-BNs are ACNet blocks (3x3-BN + 1x3-BN + 3x1-BN)
    dbb-resnet18     ResNet-18 whose 3x3 conv-BNs are Diverse Branch Blocks
                     (3x3-BN, 1x1-BN, 1x1-BNpad-avgpool-BN, 1x1-BNpad-3x3-BN)
    mobileone-s0     MobileOne-S0 (k=4 conv-BN branches, 1x1 scale branch, BN identity)

`--networks` takes any zoo network with a deploy form.  Each hand-fused
network is asserted to match its training form in torch (max abs diff <=
1e-4 * max |output|).

Both forms are exported with torch.onnx.export(dynamo=False, opset 17).  The
variants of each network are

    input          the training-form ONNX as exported
    onnxsim        onnxsim.simplify(path)
    onnxslim       onnxslim.slim(path)
    onnxoptimizer  onnxoptimizer.optimize(onnx.load(path), get_fuse_and_elimination_passes())
    ort-offline    onnxruntime session with ORT_ENABLE_ALL and optimized_model_filepath
                   (offline optimization); the saved model (which may hold
                   ORT-specific NCHWc / fused ops) is then run with ORT_DISABLE_ALL
    repfuse        repfuse.optimize_onnx(path)   (runs onnxsim first, then fuses)
    hand-fused     the exported hand-fused network

and for each we record the node count and Conv count of the model file (Conv
counts every op named Conv or FusedConv, whatever its domain), the optimize
wall time (min over --opt-repeats calls, fewer once a tool has used 10 s;
every tool gets the input *path*, so loading is included for all alike), the
onnxruntime CPU latency and the max abs error against the training-form
torch output.

Latency: one onnxruntime session per variant, intra-op and inter-op threads
1, sequential execution, graph_optimization_level ORT_ENABLE_ALL for every
variant (so ORT's own online optimizations apply equally) except ort-offline
(ORT_DISABLE_ALL, it is already optimized).  After --warmup calls each, the
variants of one network run --rounds rounds round-robin, the starting variant
rotating each round; the reported figure is the median per call.  Ratios are
to the hand-fused variant (latency and node count).

Per network a summary line gives: repfuse latency / hand-fused (target
<= 1.02), whether repfuse has no more nodes than every peer tool, and the
optimize wall time of repfuse against onnxsim on the same model (target: no
slower).  As repfuse runs onnxsim inside, both repfuse's total and its own
time (optimize_onnx(onnxsim output, simplify=False)) are given, and, unless
--no-cli, fresh-process wall times (interpreter start-up and imports
included): `repfuse optimize IN -o OUT -q` against a `python -c` that runs
onnxsim.simplify and onnx.save.  (Not the `onnxsim` command itself: in
onnxsim 0.8 it prints a model-info summary computed with sympy that takes
most of its run time, e.g. 78 s of 80 on dbb-resnet18, with check_n 0.)

Scaling: synthetic ONNX chains of RepVGG-style blocks (Conv3x3+BN, Conv1x1+BN,
BN identity, two Adds, Relu: 8 nodes a block; 8 channels, 8x8) are built with
onnx.helper at about 1,250 / 2,500 / 5,000 / 10,000 nodes, and
repfuse.optimize_onnx(model, simplify=False) and simplify=True are timed
(onnxsim.simplify alone too, for reference).  The growth exponent is the
least-squares slope of log(time) on log(nodes) (up to 1.1: about linear;
above 1.2: superlinear).  When it is above 1.1 (or with --profile) the
largest model is run under cProfile and the phases (load, simplify, shape
inference, fuse, cleanup, check, serialize) and the hottest functions (with
the caller that spends most of each one's own time) are printed.

Usage:  python benchmarks/onnx_peers.py [--quick] [--json PATH] [--networks a,b] [--rounds N]
        (--quick: 1x3x64x64 input, repvgg-a0 and mobileone-s0 only, few rounds,
        scaling at 1,250 and 2,500 nodes)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import (ZOO, describe, failed, fmt, interleaved, log, machine, max_abs_error, status,  # noqa: E402
                     stdout_to_stderr, versions, write_json, zoo_case)


# ================================================================ the networks

NETWORKS = ["repvgg-a0", "acnet-resnet18", "dbb-resnet18", "mobileone-s0"]
QUICK_NETWORKS = ["repvgg-a0", "mobileone-s0"]


# ================================================================ the variants

VARIANTS = ["input", "onnxsim", "onnxslim", "onnxoptimizer", "ort-offline", "repfuse", "hand-fused"]
PEERS = ["onnxsim", "onnxslim", "onnxoptimizer", "ort-offline"]


def run_onnxsim(src: Path, dst: Path) -> None:
    import onnxsim

    model, ok = onnxsim.simplify(str(src))
    if not ok:
        raise RuntimeError("onnxsim.simplify reported that its result could not be validated")
    onnx.save(model, dst)


def run_onnxslim(src: Path, dst: Path) -> None:
    import onnxslim

    onnx.save(onnxslim.slim(str(src)), dst)


def run_onnxoptimizer(src: Path, dst: Path) -> None:
    import onnxoptimizer

    onnx.save(onnxoptimizer.optimize(onnx.load(src), onnxoptimizer.get_fuse_and_elimination_passes()), dst)


def run_ort_offline(src: Path, dst: Path) -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3  # the "hardware specific optimizations" warning
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


def run_repfuse(src: Path, dst: Path, simplify: bool = True) -> None:
    import repfuse

    onnx.save(repfuse.optimize_onnx(str(src), simplify=simplify), dst)


TOOLS = {"onnxsim": run_onnxsim, "onnxslim": run_onnxslim, "onnxoptimizer": run_onnxoptimizer,
         "ort-offline": run_ort_offline, "repfuse": run_repfuse}


def timed_tool(tool, src: Path, dst: Path, repeats: int, budget_s: float = 10.0) -> list[float]:
    """Wall seconds of up to `repeats` runs of a tool (the file is rewritten each time); no
    further run starts once the runs so far took `budget_s` in all (a slow tool runs once).

    The save of the result is inside the timing for every tool alike (ort-offline saves inside
    session creation); it is a small part for models of this size."""
    times = []
    for _ in range(repeats):
        if sum(times) >= budget_s:
            break
        with stdout_to_stderr(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            tool(src, dst)
            times.append(time.perf_counter() - t0)
    return times


def warm_up_tools(workdir: Path) -> None:
    """Run every tool once on a tiny model, so first-call imports and initialization are not timed."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()
    src = workdir / "warmup.onnx"
    export(net, torch.randn(1, 3, 8, 8), src)
    for name, tool in TOOLS.items():
        try:
            timed_tool(tool, src, workdir / f"warmup-{name}.onnx", 1)
        except Exception as e:
            log(f"warm-up of {name} failed: {describe(e)}")


def export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings(), stdout_to_stderr():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])


def op_counts(path: Path) -> tuple[int, int, dict[str, int]]:
    model = onnx.load(path, load_external_data=False)
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}" for n in model.graph.node)
    convs = sum(n.op_type in ("Conv", "FusedConv") for n in model.graph.node)
    return len(model.graph.node), convs, dict(ops)


def session(path: Path, offline: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if offline
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def open_sessions(rows: dict, paths: dict, feed: dict, ref: np.ndarray) -> dict[str, ort.InferenceSession]:
    """A session per variant that has not failed; records its node, Conv and op counts and its error."""
    sessions = {}
    for variant, row in rows.items():
        if row.get("error") is not None:
            continue
        try:
            row["nodes"], row["convs"], row["ops"] = op_counts(paths[variant])
            sessions[variant] = session(paths[variant], offline=(variant == "ort-offline"))
            row["max_abs_err"] = max_abs_error(sessions[variant].run(None, feed)[0], ref)
        except Exception as e:
            failed(row, e)
            sessions.pop(variant, None)
    return sessions


def cli_seconds(argv: list[str], repeats: int) -> float:
    """Best wall time of a command line (a fresh interpreter each time)."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:4])} ... exited {proc.returncode}: "
                               f"{proc.stderr.strip().splitlines()[-1:] or ''}")
        best = min(best, elapsed)
    return best


# ================================================================ one network

def bench_network(name: str, args, workdir: Path, size: int) -> dict:
    log(f"== {name}: building ...")
    case = zoo_case(name, args.seed, size)
    train, hand, x, ref, tol = case.model, case.checked_reference(), case.x, case.ref, case.tol
    log(f"   hand-fused check in torch: max abs error {case.reference_err:.3g} (tolerance {tol:.3g})")

    paths = {v: workdir / f"{name}.{v}.onnx" for v in VARIANTS}
    log("   exporting (dynamo=False, opset 17) ...")
    export(train, x, paths["input"])
    export(hand, x, paths["hand-fused"])

    rows = {v: {"variant": v, "error": None} for v in VARIANTS}
    for variant, tool in TOOLS.items():
        log(f"   {variant} ...")
        try:
            times = timed_tool(tool, paths["input"], paths[variant], args.opt_repeats)
            rows[variant]["optimize_s"] = min(times)
            rows[variant]["optimize_s_all"] = times
        except Exception as e:
            failed(rows[variant], e)

    # repfuse's own share: the fusion pipeline without onnxsim, on onnxsim's output
    own_s = None
    if rows["onnxsim"]["error"] is None:
        try:
            own = workdir / f"{name}.repfuse-nosim.onnx"
            own_s = min(timed_tool(lambda s, d: run_repfuse(s, d, simplify=False), paths["onnxsim"], own,
                                   args.opt_repeats))
        except Exception as e:
            log(f"   repfuse(simplify=False) on the onnxsim output failed: {describe(e)}")

    cli = {}
    if not args.no_cli:
        log("   command-line wall times ...")
        onnxsim_script = ("import sys, onnx, onnxsim; model, ok = onnxsim.simplify(sys.argv[1]); "
                          "onnx.save(model, sys.argv[2])")
        for tool, argv in {"repfuse": [sys.executable, "-m", "repfuse", "optimize", str(paths["input"]), "-o",
                                       str(workdir / f"{name}.cli-repfuse.onnx"), "-q"],
                           "onnxsim": [sys.executable, "-c", onnxsim_script, str(paths["input"]),
                                       str(workdir / f"{name}.cli-onnxsim.onnx")]}.items():
            try:
                cli[tool] = cli_seconds(argv, args.cli_repeats)
            except Exception as e:
                cli[tool] = None
                log(f"   CLI {tool} failed: {describe(e)}")

    # sessions, accuracy, counts
    feed = {"input": x.numpy()}
    sessions = open_sessions(rows, paths, feed, ref)

    log(f"   timing {len(sessions)} variants: {args.warmup} warmups, {args.rounds} interleaved rounds ...")
    samples, _ = interleaved({v: (lambda s=s: s.run(None, feed)) for v, s in sessions.items()}, args.warmup,
                             args.rounds)
    for v, s in samples.items():
        rows[v]["median_ms"] = statistics.median(s)
        rows[v]["samples_ms"] = s
    del sessions

    hand_ms = rows["hand-fused"].get("median_ms")
    hand_nodes = rows["hand-fused"].get("nodes")
    for v in VARIANTS:
        row = rows[v]
        row["latency_ratio"] = (row["median_ms"] / hand_ms) if "median_ms" in row and hand_ms else None
        row["nodes_ratio"] = (row["nodes"] / hand_nodes) if "nodes" in row and hand_nodes else None
        row["status"] = status(row["error"], row.get("max_abs_err"), tol)

    rf = rows["repfuse"]
    peer_nodes = {p: rows[p]["nodes"] for p in PEERS if rows[p].get("nodes") is not None}
    summary = {
        "repfuse_latency_ratio": rf.get("latency_ratio"),
        "latency_target_met": rf.get("latency_ratio") is not None and rf["latency_ratio"] <= 1.02,
        "repfuse_nodes": rf.get("nodes"),
        "peer_nodes": peer_nodes,
        "fewest_nodes": rf.get("nodes") is not None and all(rf["nodes"] <= n for n in peer_nodes.values()),
        "repfuse_total_s": rf.get("optimize_s"),
        "onnxsim_s": rows["onnxsim"].get("optimize_s"),
        "repfuse_own_s": own_s,
        "cli_repfuse_s": cli.get("repfuse"),
        "cli_onnxsim_s": cli.get("onnxsim"),
    }
    s = summary
    s["time_target_met"] = (s["repfuse_total_s"] is not None and s["onnxsim_s"] is not None
                            and s["repfuse_total_s"] <= s["onnxsim_s"])
    return {"network": name, "input_shape": list(x.shape), "max_abs_output": float(abs(ref).max()), "tolerance": tol,
            "hand_fused_torch_err": case.reference_err, "rows": [rows[v] for v in VARIANTS], "summary": summary}


def print_network(result: dict, args) -> None:
    shape = "x".join(map(str, result["input_shape"]))
    print(f"\n### {result['network']}  (input {shape}; onnxruntime {ort.__version__} CPU, 1 intra-op + 1 inter-op "
          f"thread; median of {args.rounds} interleaved rounds after {args.warmup} warmups)\n")
    print("| variant | nodes | nodes / hand | Conv | optimize s | median ms | latency / hand | max abs err | status |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in result["rows"]:
        print(f"| {row['variant']} | {fmt(row.get('nodes'), 'd')} | {fmt(row.get('nodes_ratio'), '.3f')} | "
              f"{fmt(row.get('convs'), 'd')} | {fmt(row.get('optimize_s'), '.3f')} | "
              f"{fmt(row.get('median_ms'), '.2f')} | {fmt(row.get('latency_ratio'), '.3f')} | "
              f"{fmt(row.get('max_abs_err'), '.2e')} | {row['status']} |")
    s = result["summary"]
    peers = ", ".join(f"{p} {n}" for p, n in s["peer_nodes"].items())
    print(f"\nerror tolerance 1e-4 * max |output| = {result['tolerance']:.2e}; "
          f"hand-fused vs training form in torch: {result['hand_fused_torch_err']:.2e}")
    print(f"summary {result['network']}: repfuse latency {fmt(s['repfuse_latency_ratio'], '.3f')}x hand-fused "
          f"(target <= 1.02: {'met' if s['latency_target_met'] else 'NOT met'}); "
          f"repfuse {fmt(s['repfuse_nodes'], 'd')} nodes vs peers ({peers}): "
          f"{'no more than any peer' if s['fewest_nodes'] else 'MORE than some peer'}; "
          f"optimize time repfuse {fmt(s['repfuse_total_s'], '.3f')} s total "
          f"(own, simplify=False on the onnxsim output: {fmt(s['repfuse_own_s'], '.3f')} s) vs onnxsim "
          f"{fmt(s['onnxsim_s'], '.3f')} s (target no slower: {'met' if s['time_target_met'] else 'NOT met'})"
          + (f"; fresh-process wall `repfuse optimize IN -o OUT -q` {fmt(s['cli_repfuse_s'], '.2f')} s vs "
             f"`python -c <onnxsim.simplify + onnx.save>` {fmt(s['cli_onnxsim_s'], '.2f')} s"
             if not args.no_cli else ""))


# ================================================================ scaling

def synthetic_chain(target_nodes: int, channels: int = 8, hw: int = 8, seed: int = 0) -> onnx.ModelProto:
    """A chain of RepVGG-style blocks, 8 nodes each:

        relu( BN(Conv3x3(x)) + BN(Conv1x1(x)) + BN(x) )

    Weights are small and the identity BN is near identity, so values stay finite over 1,000+ blocks."""
    rng = np.random.default_rng(seed)
    c = channels
    nodes, inits = [], []

    def const(name, array):
        inits.append(helper.make_tensor(name, TensorProto.FLOAT, array.shape, array.astype(np.float32).ravel()))
        return name

    def batchnorm(src, name, gamma_scale):
        var = rng.uniform(0.5, 1.5, c)
        params = [const(f"{name}.gamma", gamma_scale * np.sqrt(var) * rng.uniform(0.8, 1.2, c)),
                  const(f"{name}.beta", rng.normal(0, 0.01, c)), const(f"{name}.mean", rng.normal(0, 0.01, c)),
                  const(f"{name}.var", var)]
        nodes.append(helper.make_node("BatchNormalization", [src] + params, [name], name=name, epsilon=1e-5))
        return name

    x = "input"
    for i in range(max(1, target_nodes // 8)):
        b = f"b{i}"
        w3 = const(f"{b}.w3", rng.normal(0, 0.005, (c, c, 3, 3)))
        w1 = const(f"{b}.w1", rng.normal(0, 0.005, (c, c, 1, 1)))
        nodes.append(helper.make_node("Conv", [x, w3], [f"{b}.c3"], name=f"{b}.c3", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Conv", [x, w1], [f"{b}.c1"], name=f"{b}.c1"))
        y3 = batchnorm(f"{b}.c3", f"{b}.bn3", 1.0)
        y1 = batchnorm(f"{b}.c1", f"{b}.bn1", 1.0)
        yi = batchnorm(x, f"{b}.bnid", 1.0)
        nodes.append(helper.make_node("Add", [y3, y1], [f"{b}.s1"], name=f"{b}.s1"))
        nodes.append(helper.make_node("Add", [f"{b}.s1", yi], [f"{b}.s2"], name=f"{b}.s2"))
        nodes.append(helper.make_node("Relu", [f"{b}.s2"], [f"{b}.out"], name=f"{b}.out"))
        x = f"{b}.out"
    nodes.append(helper.make_node("Identity", [x], ["output"], name="output"))
    graph = helper.make_graph(nodes, "repvgg_chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                    [1, c, hw, hw])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, c, hw, hw])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx_peers")
    model.ir_version = 8
    return model


# phase -> (file path suffix, function name); cumulative times are read from cProfile's stats
PHASES = {
    "load (deserialize)": [("onnx_ir/serde.py", "deserialize_model"), ("backends/onnx.py", "load")],
    "simplify (onnxsim)": [("backends/onnx.py", "simplify")],
    "shape inference": [("backends/onnx.py", "_infer_shapes")],
    "fuse": [("passes/onnx_write.py", "run_rules")],
    "cleanup: unused nodes": [("common/unused_removal.py", "call")],
    "cleanup: topological sort": [("common/topological_sort.py", "call")],
    "check (onnx.checker)": [("onnx/checker.py", "check_model")],
    "serialize (all calls)": [("onnx_ir/serde.py", "serialize_model")],
}


def profile_optimize(model: onnx.ModelProto, simplify: bool) -> dict:
    """Run repfuse.optimize_onnx under cProfile: phase times and the hottest functions."""
    import repfuse

    profiler = cProfile.Profile()
    with stdout_to_stderr():
        t0 = time.perf_counter()
        profiler.enable()
        repfuse.optimize_onnx(model, simplify=simplify)
        profiler.disable()
        total = time.perf_counter() - t0
    stats = pstats.Stats(profiler, stream=io.StringIO())
    phases = {}
    for phase, keys in PHASES.items():
        cum = 0.0
        for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
            if any(filename.replace(os.sep, "/").endswith(suffix) and func == fn for suffix, fn in keys):
                cum = max(cum, ct)  # the outermost call of a phase covers its nested calls
        phases[phase] = cum
    hot = []
    for (filename, line, func), (_cc, nc, tt, ct, callers) in stats.stats.items():
        # the caller that spent most of this function's own time in it
        top = max(callers.items(), key=lambda item: item[1][2], default=None)
        caller = None if top is None else f"{short_path(top[0][0])}:{top[0][1]}({top[0][2]})"
        hot.append({"function": f"{short_path(filename)}:{line}({func})", "ncalls": nc, "tottime": tt,
                    "cumtime": ct, "top_caller": caller})
    by_cum = sorted(hot, key=lambda h: -h["cumtime"])[:25]
    by_tot = sorted(hot, key=lambda h: -h["tottime"])[:15]
    return {"simplify": simplify, "total_s_profiled": total, "phases_s": phases, "top_cumulative": by_cum,
            "top_tottime": by_tot}


def short_path(filename: str) -> str:
    parts = filename.replace(os.sep, "/").split("/")
    for anchor in ("site-packages", "main"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1:])
    return "/".join(parts[-3:])


LINEAR_SLOPE = 1.1  # growth exponents up to this count as about linear
SUPERLINEAR_SLOPE = 1.2  # above this: clearly superlinear


def growth(slope: float | None) -> str:
    if slope is None:
        return "unknown"
    if slope <= LINEAR_SLOPE:
        return "about linear"
    return "slightly superlinear" if slope <= SUPERLINEAR_SLOPE else "SUPERLINEAR"


def loglog_slope(nodes: list[int], seconds: list[float]) -> float | None:
    if len(nodes) < 2 or min(seconds) <= 0:
        return None
    xs, ys = np.log(nodes), np.log(seconds)
    return float(np.polyfit(xs, ys, 1)[0])


def bench_scaling(args) -> dict:
    import onnxsim
    import repfuse

    rows = []
    models = {}
    for target in args.sizes:
        model = synthetic_chain(target, seed=args.seed)
        models[target] = model
        n = len(model.graph.node)
        row = {"target": target, "nodes": n}
        for label, simplify in (("nosim", False), ("sim", True)):
            log(f"== scaling: {n} nodes, repfuse.optimize_onnx(simplify={simplify}) ...")
            try:
                with stdout_to_stderr():
                    t0 = time.perf_counter()
                    out = repfuse.optimize_onnx(model, simplify=simplify)
                    row[f"repfuse_{label}_s"] = time.perf_counter() - t0
                row[f"repfuse_{label}_nodes_after"] = len(out.graph.node)
            except Exception as e:
                row[f"repfuse_{label}_s"] = None
                row[f"repfuse_{label}_error"] = describe(e)
                log(traceback.format_exc())
        log(f"== scaling: {n} nodes, onnxsim.simplify ...")
        try:
            with stdout_to_stderr():
                t0 = time.perf_counter()
                onnxsim.simplify(model)
                row["onnxsim_s"] = time.perf_counter() - t0
        except Exception as e:
            row["onnxsim_s"] = None
            row["onnxsim_error"] = describe(e)
        rows.append(row)

    # numbers check on the smallest model: the fused chain computes the same as the unfused one
    check = None
    try:
        smallest = models[min(models)]
        fused = repfuse.optimize_onnx(smallest, simplify=False)
        feed = {"input": np.random.default_rng(args.seed).standard_normal((1, 8, 8, 8)).astype(np.float32)}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        a = ort.InferenceSession(smallest.SerializeToString(), options).run(None, feed)[0]
        b = ort.InferenceSession(fused.SerializeToString(), options).run(None, feed)[0]
        check = {"max_abs_err": float(np.abs(a - b).max()), "max_abs_output": float(np.abs(a).max())}
        check["ok"] = check["max_abs_err"] <= 1e-4 * check["max_abs_output"]
    except Exception as e:
        check = {"error": describe(e), "ok": False}

    result = {"rows": rows, "check": check, "slopes": {}, "profiles": []}
    for label in ("nosim", "sim"):
        good = [r for r in rows if r.get(f"repfuse_{label}_s")]
        result["slopes"][label] = loglog_slope([r["nodes"] for r in good], [r[f"repfuse_{label}_s"] for r in good])
    good = [r for r in rows if r.get("onnxsim_s")]
    result["slopes"]["onnxsim"] = loglog_slope([r["nodes"] for r in good], [r["onnxsim_s"] for r in good])
    largest = max(models)
    for label, simplify in (("nosim", False), ("sim", True)):
        slope = result["slopes"][label]
        if args.profile or (slope is not None and slope > LINEAR_SLOPE):
            log(f"== scaling: profiling repfuse.optimize_onnx(simplify={simplify}) on {largest} nodes ...")
            try:
                result["profiles"].append(profile_optimize(models[largest], simplify))
            except Exception as e:
                log(f"profiling failed: {describe(e)}")
    return result


def print_scaling(result: dict) -> None:
    print("\n### Scaling: synthetic RepVGG-style chains (8 nodes a block, 8 channels, 8x8)\n")
    print("| nodes | repfuse simplify=False s | s / 1000 nodes | repfuse simplify=True s | s / 1000 nodes | "
          "onnxsim alone s | nodes after |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        k = r["nodes"] / 1000

        def per(v):
            return None if v is None else v / k

        print(f"| {r['nodes']} | {fmt(r.get('repfuse_nosim_s'), '.3f')} | "
              f"{fmt(per(r.get('repfuse_nosim_s')), '.3f')} | "
              f"{fmt(r.get('repfuse_sim_s'), '.3f')} | {fmt(per(r.get('repfuse_sim_s')), '.3f')} | "
              f"{fmt(r.get('onnxsim_s'), '.3f')} | {fmt(r.get('repfuse_nosim_nodes_after'), 'd')} |")
        for key in ("repfuse_nosim_error", "repfuse_sim_error", "onnxsim_error"):
            if key in r:
                print(f"  {key}: {r[key]}")
    slopes = result["slopes"]
    largest = result["rows"][-1]
    print(f"\ngrowth exponent (slope of log time on log nodes): repfuse simplify=False "
          f"{fmt(slopes['nosim'], '.2f')}, simplify=True {fmt(slopes['sim'], '.2f')}, onnxsim alone "
          f"{fmt(slopes['onnxsim'], '.2f')}  (1.0 = linear; up to {LINEAR_SLOPE} about linear, above "
          f"{SUPERLINEAR_SLOPE} superlinear)")
    for label, text in (("nosim", "simplify=False"), ("sim", "simplify=True")):
        t = largest.get(f"repfuse_{label}_s")
        slope = slopes[label]
        print(f"repfuse {text}: {largest['nodes']} nodes in {fmt(t, '.2f')} s "
              f"({'under' if t is not None and t < 10 else 'NOT under'} 10 s); growth {growth(slope)}")
    c = result["check"]
    if "error" in c:
        print(f"numbers check on the smallest chain: FAILED: {c['error']}")
    else:
        print(f"numbers check on the smallest chain (onnxruntime, fused vs unfused): max abs error "
              f"{c['max_abs_err']:.2e} of max |output| {c['max_abs_output']:.2e}: {'ok' if c['ok'] else 'MISMATCH'}")
    for prof in result["profiles"]:
        print(f"\n#### cProfile of repfuse.optimize_onnx(simplify={prof['simplify']}) on {largest['nodes']} nodes "
              f"({prof['total_s_profiled']:.2f} s under the profiler)\n")
        print("| phase | cumulative s |")
        print("|---|---:|")
        for phase, s in prof["phases_s"].items():
            print(f"| {phase} | {s:.3f} |")
        print("\n| function (by cumulative time) | ncalls | tottime s | cumtime s |")
        print("|---|---:|---:|---:|")
        for h in prof["top_cumulative"]:
            print(f"| {h['function']} | {h['ncalls']} | {h['tottime']:.3f} | {h['cumtime']:.3f} |")
        print("\n| function (by own time) | ncalls | tottime s | cumtime s | main caller |")
        print("|---|---:|---:|---:|---|")
        for h in prof["top_tottime"]:
            print(f"| {h['function']} | {h['ncalls']} | {h['tottime']:.3f} | {h['cumtime']:.3f} | "
                  f"{h['top_caller'] or '-'} |")


# ================================================================ main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 64x64 input, two networks, few rounds, small scaling sizes")
    parser.add_argument("--networks", help=f"comma-separated zoo networks (default {', '.join(NETWORKS)}), or none")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per variant (default 5, quick 3)")
    parser.add_argument("--rounds", type=int, default=None, help="timed interleaved rounds (default 60, quick 20)")
    parser.add_argument("--opt-repeats", type=int, default=None,
                        help="runs of each optimizer; the minimum is reported (default 3, quick 1)")
    parser.add_argument("--cli-repeats", type=int, default=None, help="runs of each command line (default 2, quick 1)")
    parser.add_argument("--no-cli", action="store_true", help="skip the command-line wall times")
    parser.add_argument("--sizes", help="scaling sizes in nodes (default 1250,2500,5000,10000; quick 1250,2500)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling section")
    parser.add_argument("--profile", action="store_true", help="profile the largest scaling model in any case")
    parser.add_argument("--workdir", help="keep the ONNX files here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()

    size = 64 if args.quick else 224
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    args.rounds = args.rounds if args.rounds is not None else (20 if args.quick else 60)
    args.opt_repeats = args.opt_repeats if args.opt_repeats is not None else (1 if args.quick else 3)
    args.cli_repeats = args.cli_repeats if args.cli_repeats is not None else (1 if args.quick else 2)
    if args.networks is not None:
        networks = [] if args.networks in ("", "none") else args.networks.split(",")
    else:
        networks = QUICK_NETWORKS if args.quick else list(NETWORKS)
    unknown = [n for n in networks if n not in ZOO]
    if unknown:
        parser.error(f"unknown network(s) {', '.join(unknown)}; choose from {', '.join(ZOO)}")
    args.sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes
                  else ([1250, 2500] if args.quick else [1250, 2500, 5000, 10000]))
    torch.set_num_threads(1)
    started = time.perf_counter()

    with harness.workdir(args.workdir, "onnx_peers-") as workdir:
        log("warming up the tools on a tiny model ...")
        warm_up_tools(workdir)
        results = []
        for name in networks:
            try:
                results.append(bench_network(name, args, workdir, size))
            except Exception as e:  # a network that cannot be built or exported: report, go on
                log(traceback.format_exc())
                results.append({"network": name, "failed": describe(e), "traceback": traceback.format_exc()})
        scaling = None if args.no_scaling else bench_scaling(args)

    tools = versions("torch", "onnx", "onnxruntime", "onnxsim", "onnxslim", "onnxoptimizer", "repfuse")
    print(f"# ONNX optimizers on re-parameterized CNNs ({'quick' if args.quick else 'full'} run)\n")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in tools.items()) + f"; {machine()}")
    for result in results:
        if "failed" in result:
            print(f"\n### {result['network']}\n\nFAILED: {result['failed']}")
        else:
            print_network(result, args)
    if scaling is not None:
        print_scaling(scaling)
    elapsed = time.perf_counter() - started
    print(f"\ntotal benchmark wall time {elapsed:.0f} s")

    if args.json:
        write_json(args.json, {
            "quick": args.quick, "versions": tools, "machine": platform.machine(), "cpus": os.cpu_count(),
            "warmup": args.warmup, "rounds": args.rounds, "opt_repeats": args.opt_repeats,
            "cli_repeats": None if args.no_cli else args.cli_repeats, "seed": args.seed,
            "networks": results, "scaling": scaling, "wall_s": elapsed})

    bad = [r["network"] for r in results if "failed" in r]
    bad += [f"{r['network']}/{row['variant']}" for r in results if "rows" in r for row in r["rows"]
            if row["status"] != "ok"]
    if scaling is not None and not scaling["check"].get("ok"):
        bad.append("scaling check")
    return harness.exit_code(bad)


if __name__ == "__main__":
    sys.exit(main())
