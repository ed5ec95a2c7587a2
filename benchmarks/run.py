"""Every zoo network against every peer: ONNX Runtime, PyTorch eager and inductor, TVM.

One command benchmarks each network of examples/zoo (training form, random
weights and BatchNorm statistics) on four backends:

    onnxruntime  TorchScript export (dynamo=False, opset 17) of the training form, then
                 train          the export as is ("input")
                 onnxsim        onnxsim.simplify
                 onnxslim       onnxslim.slim
                 onnxoptimizer  onnxoptimizer fuse-and-elimination passes
                 ort-offline    the model onnxruntime saves with ORT_ENABLE_ALL (run as saved)
                 repfuse        repfuse.optimize_onnx(path)
                 reference      the export of the paper's own deploy form (net.to_deploy)
                 every variant runs in an ORT_ENABLE_ALL session (ort-offline: already
                 optimized, ORT_DISABLE_ALL), 1 intra-op + 1 inter-op thread.
    eager        train: the training form; repfuse: repfuse.deploy(model, (x,));
                 reference: the deploy form
    inductor     train: torch.compile(model) (inductor); repfuse:
                 torch.compile(model, backend="repfuse") (inner compiler inductor);
                 reference: torch.compile(deploy form)
    tvm          torch.export + from_exported_program(keep_params_as_input=False), target
                 llvm, TVM_NUM_THREADS=1; train: relax_pipeline="default"; repfuse:
                 relax_pipeline="repfuse"; reference: the deploy form with "default"

The ONNX peer tools, export and sessions come from benchmarks/onnx_peers.py,
the Relax helpers from benchmarks/tvm_pipeline.py, the networks (with their
references), the interleaved timer and the report helpers from
benchmarks/harness.py.

Measured per variant: median latency of interleaved rounds (the variants of a
network on one backend, or all six PyTorch variants together, are called
round-robin with a rotating start; the number of rounds is fitted to a time
budget per backend; the JSON also has the median of the per-round ratios to
the base, which drifts less on a busy machine), max abs error against the torch training form
(tolerance 1e-4 * max |output|), node and conv counts where the backend has a
graph (ONNX nodes / Conv ops; FX ops / conv+linear ops from repfuse's report
for the PyTorch rows; relax operator calls / relax.nn.conv2d before the build
for TVM), and the optimize or compile time.  PyTorch runs with
torch.set_num_threads(1) under torch.no_grad().

Latency is given as a ratio to the reference on the same backend, or to the
training form where a network has no reference (or its reference failed
there).  The "best peer" is the fastest non-repfuse optimizer on a backend:
the fastest of onnxsim / onnxslim / onnxoptimizer / ort-offline on
onnxruntime, the training form itself on eager, inductor and TVM's default
pipeline.

Targets (summarized at the end): on every network with a reference, repfuse
<= 1.02 x the reference latency on onnxruntime, inductor and TVM; on every
"branches" network (re-parameterizable by branch merging), repfuse has
strictly fewer nodes and a lower latency than the best peer (nodes: the
fewest of any peer) on those three backends.

Outputs: the markdown tables on stdout and in --md (default
benchmarks/results/run.md), JSON in --json (default
benchmarks/results/run.json), a chart in --png (default
benchmarks/results/run.png).  Progress goes to stderr.

Usage:  python benchmarks/run.py [--quick] [--networks a,b] [--backends onnxruntime,eager,inductor,tvm]
                                 [--size N] [--json PATH] [--png PATH] [--md PATH] [--workdir DIR]
        full run: 1x3x160x160 input, all networks, rounds fitted to 6 s (ONNX Runtime, PyTorch)
        and 15 s (TVM, 4-10 rounds) per network; --quick: 1x3x64x64, repvgg-a0 and drconv-net, 5 rounds
        (TVM 2), outputs to benchmarks/results/run_quick.{md,json,png}.  Inductor compiles
        dominate the first run; inductor's on-disk cache makes reruns faster.
"""

from __future__ import annotations

import os

os.environ["TVM_NUM_THREADS"] = "1"  # read once, when tvm is first imported: set it before anything else

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

import harness  # noqa: E402  (zoo networks and references, interleaved timer, report helpers)
import onnx_peers  # noqa: E402  (export, the peer tools, sessions, op counts)
import tvm_pipeline  # noqa: E402  (relax helpers)
from harness import ZOO, describe, failed, fmt, log, max_abs_error  # noqa: E402
from zoo.common import count_convs  # noqa: E402

BACKENDS = ["onnxruntime", "eager", "inductor", "tvm"]
TARGET_BACKENDS = ["onnxruntime", "inductor", "tvm"]  # where the targets apply
ONNX_PEERS = list(onnx_peers.PEERS)  # onnxsim, onnxslim, onnxoptimizer, ort-offline
PEERS = {"onnxruntime": ONNX_PEERS, "eager": ["train"], "inductor": ["train"], "tvm": ["train"]}
COLUMNS = ["train", *ONNX_PEERS, "repfuse", "reference"]  # latency columns of the table
REWRITE_NETWORKS = ["pruned-resnet", "dynamic-mobilenetv2", "nas-supernet"]  # repfuse / train in their own table
TARGET_RATIO = 1.02
QUICK_NETWORKS = ["repvgg-a0", "drconv-net"]  # one with a reference, one without; both compile fast


@dataclass(frozen=True)
class Timing:
    """Warm-up calls per variant, then rounds fitted to budget_s (within min_rounds..max_rounds)."""

    warmup: int
    budget_s: float
    min_rounds: int
    max_rounds: int


FULL_TIMING = {"onnxruntime": Timing(3, 6.0, 10, 60), "torch": Timing(3, 6.0, 10, 50), "tvm": Timing(1, 15.0, 4, 10)}
QUICK_TIMING = {"onnxruntime": Timing(1, 0.0, 5, 5), "torch": Timing(1, 0.0, 5, 5), "tvm": Timing(1, 0.0, 2, 2)}


# ================================================================ helpers


def interleaved(calls: dict, timing: Timing) -> tuple[dict[str, list[float]], int]:
    """Milliseconds of every call; calls round-robin with a rotating start, rounds fitted to the budget."""
    return harness.interleaved(calls, timing.warmup, None, timing.budget_s, timing.min_rounds, timing.max_rounds)


def finish(backend: dict, samples: dict[str, list[float]], tol: float) -> dict:
    """Medians, the ratio base (reference if it ran, else the training form), ratios and statuses."""
    rows = backend["variants"]
    for name, ms in samples.items():
        rows[name]["median_ms"] = float(np.median(ms))
        rows[name]["samples_ms"] = ms
    base = "reference" if rows.get("reference", {}).get("median_ms") else "train"
    backend["base"] = base
    base_ms = rows.get(base, {}).get("median_ms")
    base_samples = samples.get(base)
    for name, row in rows.items():
        row["ratio"] = row["median_ms"] / base_ms if base_ms and row.get("median_ms") else None
        if base_samples and name in samples:
            row["paired_ratio"] = float(np.median(harness.per_round_ratios(samples[name], base_samples)))
        row["status"] = harness.status(row.get("error"), row.get("max_abs_err"), tol)
    backend["best_peer"] = best_peer(backend["name"], rows)
    return backend


def best_peer(backend_name: str, rows: dict) -> str | None:
    """The fastest peer variant that ran and matched."""
    ok = [p for p in PEERS[backend_name] if rows.get(p, {}).get("status") == "ok" and rows[p].get("median_ms")]
    return min(ok, key=lambda p: rows[p]["median_ms"]) if ok else None


def fewest_peer_nodes(backend_name: str, rows: dict) -> int | None:
    nodes = [rows[p]["nodes"] for p in PEERS[backend_name]
             if rows.get(p, {}).get("status") == "ok" and rows[p].get("nodes") is not None]
    return min(nodes) if nodes else None


# ================================================================ onnxruntime


def bench_onnx(name: str, model, reference, x: torch.Tensor, ref: np.ndarray, tol: float, workdir: Path,
               timing: Timing) -> dict:
    backend = {"name": "onnxruntime", "variants": {}}
    rows = backend["variants"]
    paths = {v: workdir / f"{name}.{v}.onnx" for v in COLUMNS}
    for variant, module in (("train", model), ("reference", reference)):
        if module is None:
            continue
        rows[variant] = {}
        log(f"   onnx: export {variant} (TorchScript, opset 17) ...")
        try:
            t0 = time.perf_counter()
            onnx_peers.export(module, x, paths[variant])
            rows[variant]["export_s"] = time.perf_counter() - t0
        except Exception as e:
            failed(rows[variant], e)

    for tool_name, tool in onnx_peers.TOOLS.items():  # the four peers and repfuse
        row = rows[tool_name] = {}
        if "error" in rows["train"]:
            row["error"] = "skipped: the training form did not export"
            continue
        log(f"   onnx: {tool_name} ...")
        try:
            row["optimize_s"] = onnx_peers.timed_tool(tool, paths["train"], paths[tool_name], repeats=1)[0]
        except Exception as e:
            failed(row, e)
    rows = backend["variants"] = {v: rows[v] for v in COLUMNS if v in rows}  # table order

    feed = {"input": x.numpy()}
    sessions = onnx_peers.open_sessions(rows, paths, feed, ref)
    log(f"   onnx: timing {len(sessions)} sessions ...")
    samples, backend["rounds"] = interleaved({v: (lambda s=s: s.run(None, feed)) for v, s in sessions.items()},
                                             timing)
    return finish(backend, samples, tol)


# ================================================================ PyTorch: eager and inductor


def fused_graph_stats(graphs) -> dict:
    """FX ops and conv+linear ops before/after, summed over the graphs repfuse's backend fused."""
    return {"graphs": len(graphs),
            "ops_before": sum(g.report.before.total_ops for g in graphs),
            "ops_after": sum(g.report.after.total_ops for g in graphs),
            "convs_before": sum(g.report.before.convs for g in graphs),
            "convs_after": sum(g.report.after.convs for g in graphs)}


def bench_torch(model, reference, x: torch.Tensor, ref: np.ndarray, tol: float, timing: Timing) -> tuple[dict, dict]:
    import repfuse
    from repfuse.backends.pytorch import compiled_graphs

    torch._dynamo.reset()  # a fresh dynamo cache per network (recompile limits, memory)
    eager = {"name": "eager", "variants": {"train": {}}}
    inductor = {"name": "inductor", "variants": {"train": {}, "repfuse": {}}}
    calls = {("eager", "train"): model}

    log("   torch: repfuse.deploy ...")
    eager["variants"]["repfuse"] = row = {}
    try:
        t0 = time.perf_counter()
        gm = repfuse.deploy(model, (x,))
        row["optimize_s"] = time.perf_counter() - t0
        report = gm.meta["repfuse_report"]
        eager["variants"]["train"].update(nodes=report.before.total_ops, convs=report.before.convs,
                                          macs=report.before.macs)
        row.update(nodes=report.after.total_ops, convs=report.after.convs, macs=report.after.macs)
        calls[("eager", "repfuse")] = gm
    except Exception as e:
        failed(row, e)
    if reference is not None:
        eager["variants"]["reference"] = {"convs": count_convs(reference)}
        inductor["variants"]["reference"] = {}
        calls[("eager", "reference")] = reference

    to_compile = {"train": (model, "inductor"), "repfuse": (model, "repfuse"), "reference": (reference, "inductor")}
    for variant, (module, backend_name) in to_compile.items():
        if module is None:
            continue
        row = inductor["variants"][variant]
        log(f"   torch: compiling {variant} (torch.compile backend={backend_name!r}) ...")
        known = {id(g) for g in compiled_graphs()}
        try:
            compiled = torch.compile(module, backend=backend_name)
            t0 = time.perf_counter()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled(x)  # the first call compiles
            row["compile_s"] = time.perf_counter() - t0
            log(f"     compiled in {row['compile_s']:.1f} s")
            calls[("inductor", variant)] = compiled
        except Exception as e:
            failed(row, e)
            continue
        if variant == "repfuse":
            graphs = [g for g in compiled_graphs() if id(g) not in known]
            stats = fused_graph_stats(graphs)
            row["fused"] = {**stats, "ids": {id(g) for g in graphs}}
            row.update(nodes=stats["ops_after"], convs=stats["convs_after"])
            inductor["variants"]["train"].update(nodes=stats["ops_before"], convs=stats["convs_before"])
            if stats["graphs"] == 0:
                row["note"] = "NOT FUSED: the backend passed every graph through"

    with torch.no_grad():
        for (backend_name, variant), fn in list(calls.items()):
            row = (eager if backend_name == "eager" else inductor)["variants"][variant]
            try:
                row["max_abs_err"] = max_abs_error(fn(x).numpy(), ref)
            except Exception as e:
                failed(row, e)
                del calls[(backend_name, variant)]
        log(f"   torch: timing {len(calls)} variants (eager and inductor interleaved) ...")
        samples, rounds = interleaved({f"{b}/{v}": (lambda f=fn: f(x)) for (b, v), fn in calls.items()}, timing)
    fused = inductor["variants"]["repfuse"].get("fused")
    if fused is not None:  # the backend's weight prologue should not have re-fused during timing
        live = [g for g in compiled_graphs() if id(g) in fused.pop("ids")]
        fused.update(recomputes=sum(g.recomputes for g in live), fallback=any(g._use_fallback for g in live))
    results = []
    for backend in (eager, inductor):
        prefix = backend["name"] + "/"
        backend["rounds"] = rounds
        results.append(finish(backend, {k[len(prefix):]: s for k, s in samples.items() if k.startswith(prefix)},
                              tol))
    return results[0], results[1]


# ================================================================ TVM


class TVM:
    """tvm, relax, the torch importer and repfuse's relax pipeline, imported once, on first use."""

    def __init__(self):
        import tvm
        from tvm import relax
        from tvm.relax.frontend.torch import from_exported_program

        import repfuse.backends.tvm as rtvm  # registers relax_pipeline="repfuse"

        self.tvm, self.relax, self.from_exported_program, self.rtvm = tvm, relax, from_exported_program, rtvm
        self.num_threads = int(tvm.runtime.num_threads())

    def counts(self, mod) -> tuple[int, int]:
        """(operator calls, relax.nn.conv2d calls) in mod["main"]."""
        ops = tvm_pipeline.op_counts(self.relax, self.tvm, mod["main"])
        return sum(ops.values()), ops.get("relax.nn.conv2d", 0)


def tvm_of(state: dict) -> TVM:
    if "tvm" not in state:
        state["tvm"] = TVM()
    return state["tvm"]


TVM_VARIANTS = {"train": ("train", "default"), "repfuse": ("train", "repfuse"), "reference": ("reference", "default")}


def bench_tvm(tv: TVM, model, reference, x: torch.Tensor, ref: np.ndarray, tol: float, timing: Timing) -> dict:
    backend = {"name": "tvm", "variants": {}}
    rows = backend["variants"]
    imported = {}
    for form, module in (("train", model), ("reference", reference)):
        if module is None:
            continue
        log(f"   tvm: torch.export + from_exported_program ({form}) ...")
        try:
            t0 = time.perf_counter()
            imported[form] = tvm_pipeline.import_module(torch, tv.from_exported_program, module, x)
            backend[f"import_s_{form}"] = time.perf_counter() - t0
        except Exception as e:
            imported[form] = e
            log(traceback.format_exc())
            backend[f"import_traceback_{form}"] = traceback.format_exc()

    xt = tv.tvm.runtime.tensor(x.numpy())
    calls = {}
    for variant, (form, pipeline) in TVM_VARIANTS.items():
        if form not in imported:
            continue
        row = rows[variant] = {"pipeline": pipeline}
        if isinstance(imported[form], Exception):
            row["error"] = "import failed: " + describe(imported[form])
            row["traceback"] = backend[f"import_traceback_{form}"]
            continue
        try:  # counts before the build; for repfuse, its pass applied on its own
            if pipeline == "repfuse":
                t0 = time.perf_counter()
                fused = tv.rtvm.RepFuse()(imported[form])
                row["pass_s"] = time.perf_counter() - t0
                row["nodes"], row["convs"] = tv.counts(fused)
            else:
                row["nodes"], row["convs"] = tv.counts(imported[form])
        except Exception as e:
            row["count_error"] = describe(e)
            log(traceback.format_exc())
        log(f"   tvm: {variant}: tvm.compile(target='llvm', relax_pipeline={pipeline!r}) ...")
        try:
            t0 = time.perf_counter()
            executable = tv.tvm.compile(imported[form], target="llvm", relax_pipeline=pipeline)
            row["compile_s"] = time.perf_counter() - t0
            main = tv.relax.VirtualMachine(executable, tv.tvm.cpu())["main"]
            out = main(xt)
            out = out if hasattr(out, "numpy") else out[0]
            row["max_abs_err"] = max_abs_error(out.numpy(), ref)
            calls[variant] = (lambda f=main: f(xt))
        except Exception as e:
            failed(row, e)
    log(f"   tvm: timing {len(calls)} variants ...")
    samples, backend["rounds"] = interleaved(calls, timing)
    return finish(backend, samples, tol)


# ================================================================ one network


def bench_network(name: str, args, timing: dict, workdir: Path, tvm_state: dict) -> dict:
    net = ZOO[name]
    result = {"network": name, "kind": net.kind, "backends": {}}
    log(f"== {name} ({net.kind}): building ...")
    try:
        case = harness.zoo_case(name, args.seed, args.size)
    except Exception as e:
        log(traceback.format_exc())
        result.update(skipped="build failed: " + describe(e), traceback=traceback.format_exc())
        return result
    model, reference, x, ref, tol = case.model, case.reference, case.x, case.ref, case.tol
    result.update(input_shape=list(x.shape), max_abs_output=float(np.abs(ref).max()), tolerance=tol,
                  has_reference=net.to_deploy is not None)
    if case.reference_error is not None:
        result.update(reference_error=case.reference_error, reference_traceback=case.reference_traceback)
    elif reference is not None:
        result["reference_torch_err"] = case.reference_err
        if not case.reference_err <= tol:
            log(f"   WARNING: {case.reference_problem()}")

    runners = {
        "onnxruntime": lambda: {"onnxruntime": bench_onnx(name, model, reference, x, ref, tol, workdir,
                                                          timing["onnxruntime"])},
        "torch": lambda: dict(zip(("eager", "inductor"), bench_torch(model, reference, x, ref, tol, timing["torch"]))),
        "tvm": lambda: {"tvm": bench_tvm(tvm_of(tvm_state), model, reference, x, ref, tol, timing["tvm"])},
    }
    wanted = {"onnxruntime": ["onnxruntime"], "torch": ["eager", "inductor"], "tvm": ["tvm"]}
    for group, run in runners.items():
        if not set(wanted[group]) & set(args.backends):
            continue
        t0 = time.perf_counter()
        try:
            for backend_name, backend in run().items():
                if backend_name in args.backends:
                    result["backends"][backend_name] = backend
        except Exception as e:  # an unexpected failure of a whole backend: report it, go on
            log(traceback.format_exc())
            for backend_name in wanted[group]:
                result["backends"][backend_name] = {"name": backend_name, "failed": describe(e),
                                                    "traceback": traceback.format_exc(), "variants": {}}
        log(f"   {group} done in {time.perf_counter() - t0:.0f} s")
        gc.collect()
    if name in GHOST_NETWORKS:
        log("   ghost_concat on / off ...")
        try:
            result["ghost"] = bench_ghost(model, x, ref, tol, workdir, timing, args.backends)
        except Exception as e:
            log(traceback.format_exc())
            result["ghost"] = {"all": {"error": describe(e)}}
    return result


# ================================================================ Ghost concat on / off

GHOST_NETWORKS = ["ghostnet-1.0x"]


def bench_ghost(model, x: torch.Tensor, ref: np.ndarray, tol: float, workdir: Path, timing: dict,
                backends: list[str]) -> dict:
    """repfuse with ghost_concat enabled vs its default (off), per backend: latency on / off."""
    import repfuse

    out = {}
    variants = {"off": {}, "on": {"enable": ["ghost_concat"]}}
    if "onnxruntime" in backends:
        src = workdir / "ghost.train.onnx"
        onnx_peers.export(model, x, src)
        sessions = {}
        for k, opts in variants.items():
            path = workdir / f"ghost.{k}.onnx"
            path.write_bytes(repfuse.optimize_onnx(str(src), **opts).SerializeToString())
            sessions[k] = onnx_peers.session(path, offline=False)
        feed = {"input": x.numpy()}
        out["onnxruntime"] = _on_off({k: (lambda s=s: s.run(None, feed)[0]) for k, s in sessions.items()},
                                     ref, tol, timing["onnxruntime"])
    torch_calls: dict[str, dict] = {}
    if "eager" in backends:
        torch_calls["eager"] = {k: repfuse.deploy(model, (x,), **opts) for k, opts in variants.items()}
    if "inductor" in backends:
        torch._dynamo.reset()
        torch_calls["inductor"] = {k: torch.compile(model, backend="repfuse", options=dict(opts))
                                   for k, opts in variants.items()}
    with torch.no_grad():
        for backend_name, calls in torch_calls.items():
            out[backend_name] = _on_off({k: (lambda f=f: f(x)) for k, f in calls.items()}, ref, tol,
                                        timing["torch"])
    return out


def _on_off(calls: dict, ref: np.ndarray, tol: float, timing: Timing) -> dict:
    errors = {k: max_abs_error(np.asarray(f()), ref) for k, f in calls.items()}
    samples, rounds = interleaved(calls, timing)
    ms = {k: statistics.median(v) for k, v in samples.items()}
    return {"off_ms": ms["off"], "on_ms": ms["on"], "ratio_on_off": ms["on"] / ms["off"], "rounds": rounds,
            "max_abs_err": max(errors.values()), "ok": max(errors.values()) <= tol}


def rewrites_text(results: list[dict]) -> str:
    """The seed-paper rewrites: repfuse / training form for the rewrite networks, and Ghost concat on / off."""
    out = ["### Rewrites beyond branch merging", "",
           "| network | MACs repfuse / train | onnxruntime | eager | inductor | tvm |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "skipped" in r or r["network"] not in REWRITE_NETWORKS:
            continue
        cells = []
        for backend_name in BACKENDS:
            rows = r["backends"].get(backend_name, {}).get("variants", {})
            train, rf = rows.get("train", {}).get("median_ms"), rows.get("repfuse", {}).get("median_ms")
            cells.append(fmt(rf / train if train and rf else None, ".3f"))
        eager = r["backends"].get("eager", {}).get("variants", {})
        macs = (eager.get("repfuse", {}).get("macs"), eager.get("train", {}).get("macs"))
        out.append(f"| {r['network']} | {fmt(macs[0] / macs[1] if all(macs) else None, '.3f')} | "
                   + " | ".join(cells) + " |")
    out += ["", "Latency ratios are repfuse / training form on the same backend (lower is faster).", ""]
    ghost = [r for r in results if r.get("ghost")]
    if ghost:
        out += ["Ghost concat (`enable=[\"ghost_concat\"]`) against repfuse's default (off): latency on / off", "",
                "| network | backend | off ms | on ms | on / off | outputs match |", "|---|---|---:|---:|---:|---|"]
        for r in ghost:
            for backend_name, g in r["ghost"].items():
                if "error" in g:
                    out.append(f"| {r['network']} | {backend_name} | - | - | - | FAIL: {g['error']} |")
                    continue
                out.append(f"| {r['network']} | {backend_name} | {g['off_ms']:.2f} | {g['on_ms']:.2f} | "
                           f"{g['ratio_on_off']:.3f} | {'yes' if g['ok'] else 'NO'} |")
    return "\n".join(out)


# ================================================================ report


def ratio_cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "FAIL"
    cell = fmt(row.get("ratio"), ".3f")
    return cell + (" (!)" if row.get("status") == "MISMATCH" else "")


def counts_cell(rows: dict, keys: list, field: str) -> str:
    values = [rows.get(k, {}).get(field) if isinstance(k, str) else k for k in keys]
    return " / ".join(fmt(v, "d") for v in values)


def problems(backend: dict) -> list[str]:
    if "failed" in backend:
        return [f"backend FAILED: {backend['failed']}"]
    out = []
    for variant, row in backend["variants"].items():
        if row.get("status") not in ("ok", None):
            out.append(f"{variant}: {row['status']}")
        if row.get("note"):
            out.append(f"{variant}: {row['note']}")
        fused = row.get("fused") or {}
        if fused.get("recomputes") or fused.get("fallback"):
            out.append(f"{variant}: weight prologue re-fused {fused['recomputes']} time(s)"
                       + (", ran the unfused fallback" if fused["fallback"] else ""))
        if row.get("count_error"):
            out.append(f"{variant}: counting failed: {row['count_error']}")
    return out


def markdown(results: list[dict], meta: dict) -> str:
    out = [f"# repfuse vs peers on the model zoo ({'quick' if meta['quick'] else 'full'} run)", ""]
    out.append(f"input {meta['input']}; {meta['cpus']} CPU(s), {meta['machine']}; versions: "
               + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    out.append(f"threads: torch 1, onnxruntime 1 intra + 1 inter, TVM_NUM_THREADS=1 "
               f"(tvm.runtime.num_threads() = {fmt(meta.get('tvm_num_threads'), 'd')}); timing: "
               + "; ".join(f"{k}: {t['warmup']} warm-up(s), rounds fitted to {t['budget_s']:.0f} s "
                           f"({t['min_rounds']}-{t['max_rounds']})" for k, t in meta["timing"].items()))
    out += ["", "Latency columns: median / median of the base on the same backend (base: the reference, or the "
            "training form where there is none); FAIL: the variant failed, (!): output differs from the training "
            "form by more than 1e-4 x max |output|. nodes: ONNX nodes (onnxruntime), FX ops (eager, inductor), "
            "relax operator calls before the build (tvm); convs: Conv ops (onnxruntime), conv + linear "
            "(eager, inductor), relax.nn.conv2d (tvm).", ""]
    header = ["network", "kind", "backend", "base ms", *COLUMNS, "best peer", "nodes train / best peer / repfuse / ref",
              "convs train / repfuse / ref", "repfuse max err", "problems"]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(COLUMNS) + 1) + ["---"] + ["---:"] * 3 + ["---"]) + "|")
    for r in results:
        if "skipped" in r:
            out.append(f"| {r['network']} | {r['kind']} | - | " + " | ".join(["-"] * (len(header) - 4))
                       + f" | SKIPPED: {r['skipped']} |")
            continue
        for backend_name in BACKENDS:
            backend = r["backends"].get(backend_name)
            if backend is None:
                continue
            rows = backend["variants"]
            base_ms = rows.get(backend.get("base"), {}).get("median_ms")
            base = f"{backend.get('base', '-')} {fmt(base_ms, '.2f')}"
            peer = backend.get("best_peer")
            best_nodes = fewest_peer_nodes(backend_name, rows)
            cells = [r["network"], r["kind"], backend_name, base, *(ratio_cell(rows.get(v)) for v in COLUMNS),
                     peer or "-", counts_cell(rows, ["train", best_nodes, "repfuse", "reference"], "nodes"),
                     counts_cell(rows, ["train", "repfuse", "reference"], "convs"),
                     fmt(rows.get("repfuse", {}).get("max_abs_err"), ".1e"), "; ".join(problems(backend)) or "ok"]
            out.append("| " + " | ".join(cells) + " |")
    skipped = [r for r in results if "skipped" in r]
    if skipped:
        out += ["", "Skipped networks: " + "; ".join(f"{r['network']} ({r['skipped']})" for r in skipped)]
    no_ref = [r["network"] for r in results if "skipped" not in r and not r.get("has_reference")]
    if no_ref:
        out += ["", "Without a reference (ratios to the training form): " + ", ".join(no_ref)]
    ref_bad = [f"{r['network']}: {r['reference_error']}" for r in results if r.get("reference_error")]
    ref_bad += [f"{r['network']}: reference differs from the training form in torch by "
                f"{r['reference_torch_err']:.2e} (tolerance {r['tolerance']:.2e})"
                for r in results if r.get("reference_torch_err") is not None
                and not r["reference_torch_err"] <= r["tolerance"]]
    if ref_bad:
        out += ["", "Reference problems: " + "; ".join(ref_bad)]

    out += ["", "### Optimize / compile seconds", "",
            "| network | onnxsim | onnxslim | onnxoptimizer | ort-offline | repfuse onnx | repfuse.deploy | "
            "inductor train | repfuse+inductor | inductor ref | tvm default | tvm repfuse | tvm ref |",
            "|---|" + "---:|" * 12]
    for r in results:
        if "skipped" in r:
            continue
        b = r["backends"]

        def get(backend_name, variant, field):
            return b.get(backend_name, {}).get("variants", {}).get(variant, {}).get(field)

        cells = [get("onnxruntime", v, "optimize_s") for v in [*ONNX_PEERS, "repfuse"]]
        cells += [get("eager", "repfuse", "optimize_s")]
        cells += [get("inductor", v, "compile_s") for v in ("train", "repfuse", "reference")]
        cells += [get("tvm", v, "compile_s") for v in ("train", "repfuse", "reference")]
        out.append(f"| {r['network']} | " + " | ".join(fmt(c, ".2f") for c in cells) + " |")
    return "\n".join(out)


def evaluate_targets(results: list[dict]) -> dict:
    """Target 1: repfuse <= 1.02 x reference (networks with a reference); target 2: fewer nodes and lower
    latency than the best peer ("branches" networks).  Each check: network, backend, met, numbers."""
    latency, beat_peers = [], []
    for r in results:
        if "skipped" in r:
            continue
        for backend_name in TARGET_BACKENDS:
            backend = r["backends"].get(backend_name)
            if backend is None:
                continue
            rows = backend["variants"]
            rf = rows.get("repfuse", {})
            rf_ok = rf.get("status") == "ok"
            if r.get("has_reference"):
                ratio = rf.get("ratio") if backend.get("base") == "reference" else None
                why = None if ratio is not None else (
                    "repfuse " + rf.get("status", "missing") if not rf.get("median_ms")
                    else "no reference latency on this backend")
                latency.append({"network": r["network"], "backend": backend_name, "ratio": ratio,
                                "paired_ratio": rf.get("paired_ratio") if ratio is not None else None,
                                "repfuse_ms": rf.get("median_ms"),
                                "reference_ms": rows.get("reference", {}).get("median_ms"),
                                "met": rf_ok and ratio is not None and ratio <= TARGET_RATIO, "why": why})
            if r["kind"] == "branches":
                peer = backend.get("best_peer")
                peer_ms = rows[peer]["median_ms"] if peer else None
                peer_nodes = fewest_peer_nodes(backend_name, rows)
                fewer = rf.get("nodes") is not None and peer_nodes is not None and rf["nodes"] < peer_nodes
                faster = rf.get("median_ms") is not None and peer_ms is not None and rf["median_ms"] < peer_ms
                beat_peers.append({"network": r["network"], "backend": backend_name, "best_peer": peer,
                                   "peer_ms": peer_ms, "repfuse_ms": rf.get("median_ms"),
                                   "peer_nodes": peer_nodes, "repfuse_nodes": rf.get("nodes"),
                                   "fewer_nodes": fewer, "faster": faster, "met": rf_ok and fewer and faster,
                                   "repfuse_status": rf.get("status", "missing")})
    return {"latency_vs_reference": latency, "beat_best_peer": beat_peers}


def summary_text(targets: dict) -> str:
    out = ["### Targets", ""]
    lat = targets["latency_vs_reference"]
    misses = [t for t in lat if not t["met"]]
    out.append(f"1. repfuse <= {TARGET_RATIO} x reference latency on onnxruntime, inductor and TVM, every network "
               f"with a reference: {len(lat) - len(misses)} of {len(lat)} met.")
    for t in misses:
        detail = (f"repfuse {fmt(t['repfuse_ms'], '.2f')} ms vs reference {fmt(t['reference_ms'], '.2f')} ms = "
                  f"{fmt(t['ratio'], '.3f')}x (median of per-round ratios {fmt(t['paired_ratio'], '.3f')})"
                  if t["ratio"] is not None else t["why"])
        out.append(f"   - MISS {t['network']} / {t['backend']}: {detail}")
    beat = targets["beat_best_peer"]
    misses = [t for t in beat if not t["met"]]
    out.append(f"2. strictly fewer nodes and lower latency than the best peer, every \"branches\" network "
               f"(onnxruntime, inductor, TVM): {len(beat) - len(misses)} of {len(beat)} met.")
    for t in misses:
        parts = []
        if t["repfuse_status"] != "ok":
            parts.append(f"repfuse {t['repfuse_status']}")
        if not t["fewer_nodes"]:
            parts.append(f"nodes repfuse {fmt(t['repfuse_nodes'], 'd')} vs best peer {fmt(t['peer_nodes'], 'd')}")
        if not t["faster"]:
            parts.append(f"latency repfuse {fmt(t['repfuse_ms'], '.2f')} ms vs best peer {t['best_peer'] or '-'} "
                         f"{fmt(t['peer_ms'], '.2f')} ms")
        out.append(f"   - MISS {t['network']} / {t['backend']}: " + "; ".join(parts))
    return "\n".join(out)


def errors_text(results: list[dict]) -> str:
    """Full tracebacks of everything that failed."""
    out = []
    for r in results:
        if "traceback" in r:
            out.append((f"{r['network']}: build", r["traceback"]))
        if "reference_traceback" in r:
            out.append((f"{r['network']}: reference", r["reference_traceback"]))
        for backend_name, backend in r.get("backends", {}).items():
            if "traceback" in backend:
                out.append((f"{r['network']} / {backend_name}", backend["traceback"]))
            for variant, row in backend["variants"].items():
                if "traceback" in row:
                    out.append((f"{r['network']} / {backend_name} / {variant}", row["traceback"]))
    if not out:
        return "### Errors\n\nnone"
    return "### Errors\n\n" + "\n\n".join(f"{label}:\n\n```\n{tb.rstrip()}\n```" for label, tb in out)


def chart(results: list[dict], path: Path, meta: dict) -> None:
    """Grouped bars per backend: best peer and repfuse latency / reference, per network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if "skipped" not in r]
    backends = [b for b in BACKENDS if any(b in r["backends"] for r in shown)]
    fig, axes = plt.subplots(len(backends), 1, figsize=(max(8.0, 1.1 * len(shown) + 3), 3.6 * len(backends)),
                             squeeze=False)
    width = 0.38
    for ax, backend_name in zip(axes[:, 0], backends):
        labels, peer_vals, rf_vals, peer_names = [], [], [], []
        for r in shown:
            backend = r["backends"].get(backend_name, {})
            rows = backend.get("variants", {})
            peer = backend.get("best_peer")
            labels.append(r["network"] + ("" if backend.get("base") == "reference" else "\u2020"))
            peer_vals.append(rows[peer]["ratio"] if peer else np.nan)
            peer_names.append(peer or "")
            rf = rows.get("repfuse", {})
            rf_vals.append(rf["ratio"] if rf.get("ratio") and rf.get("status") == "ok" else np.nan)
        pos = np.arange(len(labels))
        peer_label = "best peer" if backend_name == "onnxruntime" else {
            "eager": "training form (eager)", "inductor": "inductor on the training form",
            "tvm": "TVM default pipeline on the training form"}[backend_name]
        bars_p = ax.bar(pos - width / 2, peer_vals, width, label=peer_label, color="#9e9e9e")
        bars_r = ax.bar(pos + width / 2, rf_vals, width, label="repfuse", color="#1f77b4")
        for bars, values in ((bars_p, peer_vals), (bars_r, rf_vals)):
            for bar, v in zip(bars, values):
                text = "fail" if np.isnan(v) else f"{v:.2f}"
                y = 1.0 if np.isnan(v) else v
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 2), textcoords="offset points")
        if backend_name == "onnxruntime":  # which tool was the best peer
            labels = [f"{label}\n({name or 'no peer'})" for label, name in zip(labels, peer_names)]
        ax.axhline(1.0, color="black", linewidth=0.8, label="reference (1.0)")
        ax.axhline(TARGET_RATIO, color="#d62728", linewidth=0.8, linestyle="--", label=f"target {TARGET_RATIO}")
        finite = [v for v in peer_vals + rf_vals if not np.isnan(v)]
        ax.set_ylim(0, max(finite + [1.1]) * 1.12)
        ax.set_ylabel("latency / reference")
        ax.set_title(f"{backend_name}", fontsize=10, loc="left")
        ax.set_xticks(pos)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=4, frameon=False)
        ax.grid(axis="y", alpha=0.3, which="both")
    fig.suptitle(f"repfuse vs the best peer: latency / the paper's deploy form (lower is better)\n"
                 f"input {meta['input']}, 1 thread; \u2020 no reference: ratio to the training form", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ================================================================ main


def versions(tvm_state: dict) -> dict:
    names = ["repfuse", "torch", "onnx", "onnxruntime", "onnxsim", "onnxslim", "onnxoptimizer"]
    return harness.versions(*names, *(["tvm"] if "tvm" in tvm_state else []))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: 64x64 input, {' and '.join(QUICK_NETWORKS)}, 5 rounds (TVM 2)")
    parser.add_argument("--networks", help=f"comma-separated subset of {', '.join(ZOO)}")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {BACKENDS}")
    parser.add_argument("--size", type=int, default=None, help="input height and width (default 160, quick 64)")
    parser.add_argument("--seed", type=int, default=0)
    for ext, what in (("json", "the results"), ("png", "the chart"), ("md", "the markdown tables")):
        parser.add_argument(f"--{ext}", metavar="PATH",
                            help=f"{what} (default benchmarks/results/run.{ext}; --quick: run_quick.{ext})")
    parser.add_argument("--workdir", help="keep the ONNX files here (default: a temporary folder)")
    args = parser.parse_args()

    args.size = args.size or (64 if args.quick else 160)
    for ext in ("json", "png", "md"):
        if getattr(args, ext) is None:
            setattr(args, ext, str(HERE / "results" / f"run{'_quick' if args.quick else ''}.{ext}"))
    networks = args.networks.split(",") if args.networks else (QUICK_NETWORKS if args.quick else list(ZOO))
    args.backends = args.backends.split(",")
    unknown = [n for n in networks if n not in ZOO] + [b for b in args.backends if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown network(s) or backend(s): {', '.join(unknown)}")
    timing = QUICK_TIMING if args.quick else FULL_TIMING
    torch.set_num_threads(1)
    started = time.perf_counter()

    results, tvm_state = [], {}
    with harness.workdir(args.workdir, "repfuse-run-") as workdir:
        if "onnxruntime" in args.backends:
            log("warming up the ONNX tools on a tiny model ...")
            onnx_peers.warm_up_tools(workdir)
        for i, name in enumerate(networks, 1):
            log(f"[{i}/{len(networks)}] {name}  ({time.perf_counter() - started:.0f} s so far)")
            results.append(bench_network(name, args, timing, workdir, tvm_state))

    meta = {"quick": args.quick, "input": f"1x3x{args.size}x{args.size}", "size": args.size, "seed": args.seed,
            "cpus": os.cpu_count(), "machine": platform.machine(), "versions": versions(tvm_state),
            "tvm_num_threads": tvm_state["tvm"].num_threads if "tvm" in tvm_state else None,
            "timing": {k: vars(t) for k, t in timing.items()}, "networks": networks, "backends": args.backends}
    targets = evaluate_targets(results)
    meta["wall_s"] = time.perf_counter() - started
    text = "\n\n".join([markdown(results, meta), summary_text(targets), rewrites_text(results), errors_text(results),
                        f"total wall time {meta['wall_s']:.0f} s"])
    print(text)
    for path in (args.md, args.json, args.png):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(text + "\n")
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "networks": results, "targets": targets}, f, indent=1)
    try:
        chart(results, Path(args.png), meta)
    except Exception:
        log("chart failed:\n" + traceback.format_exc())
    log(f"wrote {args.md}, {args.json}, {args.png}")

    bad = [r["network"] for r in results if "skipped" in r]
    bad += [f"{r['network']}/{b}" for r in results for b, backend in r.get("backends", {}).items() if problems(backend)]
    return harness.exit_code(bad)


if __name__ == "__main__":
    sys.exit(main())
