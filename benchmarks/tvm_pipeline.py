"""TVM Relax: the "repfuse" build pipeline against TVM's default pipeline and a hand-fused network.

What is measured
----------------
Four networks of examples/zoo, each in its *training form* (random weights,
randomized BatchNorm statistics, eval mode) and the zoo's *hand-fused* deploy
form (`to_deploy`, the paper's conversion, written without repfuse):
repvgg-a0, acnet-resnet18, dbb-resnet18, mobileone-s0 (`--networks` takes any
zoo network with a deploy form).

Every form is captured with torch.export.export and imported with
tvm.relax.frontend.torch.from_exported_program(..., keep_params_as_input=False)
(weights become module constants), then built for target "llvm" three ways:

    (a) train default    training form, tvm.compile(relax_pipeline="default")
    (b) train repfuse    training form, tvm.compile(relax_pipeline="repfuse")
                         (import repfuse.backends.tvm registers it: RepFuse,
                         then what "default" runs)
    (c) hand default     hand-fused form, tvm.compile(relax_pipeline="default")

Recorded per variant: the tvm.compile wall time (the export + import time of
each form is given separately), the number of relax.nn.conv2d calls (and of
all operator calls) in mod["main"] before the build (for (b): after applying
repfuse.backends.tvm.RepFuse() to the imported module separately, which is
also timed), the latency on the Relax VM, and the max abs error of the VM
output against the PyTorch training-form output (tolerance 1e-4 * max |output|).

Latency: TVM_NUM_THREADS is set to --threads (default 1) before tvm is
imported; whether that took effect is checked with tvm.runtime.num_threads()
(and, in fresh interpreters, what TVM uses without the variable and with it
set to 2, to show that the variable is read), and the generated LLVM IR of
every variant is searched for TVMBackendParallelLaunch calls (none means the
kernels are single-threaded whatever the thread count).  Each variant gets
--warmup untimed calls of vm["main"](input); then the three variants of a
network are called round-robin, the starting variant rotating each round, and
the median milliseconds per call is reported with its interquartile range, and
the median over rounds of the per-round ratio to (c) ("paired ratio").
Unless --rounds is given, the number of rounds is fitted to a per-network
timing budget (--budget seconds, estimated from the last warm-up call; at
least --min-rounds, at most --max-rounds).  Ratios are to (c).  Target:
(b) <= 1.02 x (c).

TVM's "default" relax pipeline on CPU only legalizes the operators into TIR
with TVM's generic (untuned) schedules: no MetaSchedule tuning, no operator
fusion.  Absolute times are therefore far from what tuned TVM would reach and
say nothing about TVM's tuned performance; the comparison is between graphs
built the same way.

Usage:  python benchmarks/tvm_pipeline.py [--quick] [--json PATH] [--networks a,b] [--size N]
        [--threads N] [--warmup N] [--rounds N] [--budget S]
        (--quick: 1x3x64x64 input, repvgg-a0 and mobileone-s0, 2 warm-ups, 10 rounds)
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import (ZOO, describe, failed, fmt, interleaved, log, machine, max_abs_error,  # noqa: E402
                     per_round_ratios, status, versions, write_json, zoo_case)

VARIANTS = {  # name -> (form, relax pipeline)
    "train default": ("train", "default"),
    "train repfuse": ("train", "repfuse"),
    "hand default": ("hand", "default"),
}
LABELS = {"train default": "(a) train default", "train repfuse": "(b) train repfuse",
          "hand default": "(c) hand-fused default"}
BASE = "hand default"
TARGET_RATIO = 1.02
ALL_NETWORKS = ["repvgg-a0", "acnet-resnet18", "dbb-resnet18", "mobileone-s0"]
QUICK_NETWORKS = ["repvgg-a0", "mobileone-s0"]


# ---------------------------------------------------------------- threads


def probe_num_threads(env_value: str | None) -> int | None:
    """tvm.runtime.num_threads() in a fresh interpreter, TVM_NUM_THREADS set to env_value (None: unset)."""
    env = dict(os.environ)
    env.pop("TVM_NUM_THREADS", None)
    if env_value is not None:
        env["TVM_NUM_THREADS"] = env_value
    try:
        proc = subprocess.run([sys.executable, "-c", "import tvm; print(tvm.runtime.num_threads())"],
                              env=env, capture_output=True, text=True, timeout=120)
        return int(proc.stdout.strip().splitlines()[-1])
    except Exception:
        return None


def thread_check(tvm, threads: int, env_before: str | None, tvm_was_imported: bool) -> dict:
    info = {"requested": threads, "env_before_script": env_before, "env_now": os.environ.get("TVM_NUM_THREADS"),
            "tvm_imported_before_env_was_set": tvm_was_imported, "cpus": os.cpu_count()}
    try:
        info["runtime_num_threads"] = int(tvm.runtime.num_threads())
    except Exception as e:
        info["runtime_num_threads"] = None
        info["runtime_num_threads_error"] = describe(e)
    info["default_num_threads_without_env"] = probe_num_threads(None)
    other = "2" if threads != 2 else "1"
    info[f"num_threads_with_env_{other}"] = probe_num_threads(other)
    info["env_is_read"] = info[f"num_threads_with_env_{other}"] == int(other)
    info["took_effect"] = info["runtime_num_threads"] == threads and not tvm_was_imported
    return info


def thread_sentence(info: dict) -> str:
    other = next(k for k in info if k.startswith("num_threads_with_env_")).rsplit("_", 1)[1]
    text = (f"TVM_NUM_THREADS={info['env_now']} set before importing tvm: tvm.runtime.num_threads() = "
            f"{info['runtime_num_threads']} -> {'took effect' if info['took_effect'] else 'did NOT take effect'}. "
            f"In fresh interpreters on this {info['cpus']}-CPU machine: without the variable TVM uses "
            f"{fmt(info['default_num_threads_without_env'], 'd')} thread(s), with TVM_NUM_THREADS={other} it uses "
            f"{fmt(info[f'num_threads_with_env_{other}'], 'd')} (the variable is "
            f"{'read' if info['env_is_read'] else 'NOT read'}).")
    if info["default_num_threads_without_env"] == info["runtime_num_threads"]:
        text += " (Here the default already equals the requested count, so setting it changes nothing.)"
    return text


def parallel_launches(executable) -> int | None:
    """Calls of TVMBackendParallelLaunch in the LLVM IR of the built kernels (None: IR not available)."""
    total, found = 0, False
    stack = [executable.mod]
    while stack:
        module = stack.pop()
        stack.extend(module.imports)
        if module.kind != "llvm":
            continue
        try:
            source = module.inspect_source("ll")
        except Exception:
            continue
        found = True
        total += len(re.findall(r"call[^\n]*@TVMBackendParallelLaunch", source))
    return total if found else None


# ---------------------------------------------------------------- relax helpers


def op_counts(relax, tvm, func) -> Counter:
    """Operator calls (relax.Call whose op is an Op) in a Relax function, by operator name."""
    counts: Counter = Counter()

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            counts[expr.op.name] += 1

    relax.analysis.post_order_visit(func, visit)
    return counts


def import_module(torch, from_exported_program, model, x):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model, (x,))
        return from_exported_program(exported, keep_params_as_input=False)


# ---------------------------------------------------------------- one network


def bench_network(name: str, args, size: int, mods) -> dict:
    torch, tvm, relax, from_exported_program, rtvm = mods
    log(f"== {name}: building the training and hand-fused forms ...")
    case = zoo_case(name, args.seed, size)
    if case.reference is None:
        raise RuntimeError(case.reference_problem())
    train, hand, x, ref, tol, hand_err = case.model, case.reference, case.x, case.ref, case.tol, case.reference_err
    result = {"network": name, "input_shape": list(x.shape), "variants": {}, "tolerance": tol,
              "max_abs_output": float(abs(ref).max()), "hand_check_torch_err": hand_err,
              "hand_check_ok": hand_err <= tol}
    log(f"   hand-fused check in torch: max abs error {hand_err:.3g} (tolerance {tol:.3g})")

    imported, import_s = {}, {}
    for form, model in (("train", train), ("hand", hand)):
        log(f"   torch.export + from_exported_program ({form}) ...")
        t0 = time.perf_counter()
        imported[form] = import_module(torch, from_exported_program, model, x)
        import_s[form] = time.perf_counter() - t0
    result["import_s"] = import_s

    # operator counts before the build; (b): the imported training form after RepFuse, applied separately
    before = {"train default": imported["train"], "hand default": imported["hand"]}
    log("   RepFuse() on the imported training form (for the counts) ...")
    try:
        t0 = time.perf_counter()
        before["train repfuse"] = rtvm.RepFuse()(imported["train"])
        result["repfuse_pass_s"] = time.perf_counter() - t0
    except Exception as e:
        result["repfuse_pass_s"] = None
        result["repfuse_pass_error"] = describe(e)
        result["repfuse_pass_traceback"] = traceback.format_exc()
        log(result["repfuse_pass_traceback"])
    for variant, mod in before.items():
        counts = op_counts(relax, tvm, mod["main"])
        result["variants"].setdefault(variant, {}).update(
            conv2d=counts.get("relax.nn.conv2d", 0), ops=sum(counts.values()), op_counts=dict(counts))

    xt = tvm.runtime.tensor(x.numpy())
    calls = {}
    for variant, (form, pipe) in VARIANTS.items():
        row = result["variants"].setdefault(variant, {})
        row["pipeline"] = pipe
        log(f"   {variant}: tvm.compile(target='llvm', relax_pipeline={pipe!r}) ...")
        try:
            t0 = time.perf_counter()
            executable = tvm.compile(imported[form], target="llvm", relax_pipeline=pipe)
            row["compile_s"] = time.perf_counter() - t0
            log(f"     compiled in {row['compile_s']:.1f} s")
            vm = relax.VirtualMachine(executable, tvm.cpu())
            main = vm["main"]
            out = main(xt)
            out = out[0] if not hasattr(out, "numpy") else out
            row["max_abs_err"] = max_abs_error(out.numpy(), ref)
            row["parallel_launches"] = parallel_launches(executable)
            calls[variant] = (lambda f=main: f(xt))
        except Exception as e:
            failed(row, e)

    samples, rounds = interleaved(calls, args.warmup, args.rounds, args.budget, args.min_rounds, args.max_rounds)
    result["rounds"] = rounds
    for variant, ms in samples.items():
        row = result["variants"][variant]
        q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
        row.update(median_ms=statistics.median(ms), p25_ms=q[0], p75_ms=q[2], min_ms=min(ms), samples_ms=ms)
    base = result["variants"][BASE].get("median_ms")
    for variant, row in result["variants"].items():
        row["ratio"] = row["median_ms"] / base if base and row.get("median_ms") else None
        # the same ratio taken round by round (calls of one round are adjacent in time), less drift-prone
        if variant in samples and BASE in samples:
            paired = per_round_ratios(samples[variant], samples[BASE])
            q = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [paired[0]] * 3
            row.update(paired_ratio=statistics.median(paired), paired_ratio_p25=q[0], paired_ratio_p75=q[2])
        row["status"] = status(row.get("error"), row.get("max_abs_err"), tol)
    ratio = result["variants"]["train repfuse"].get("ratio")
    result["target"] = {"ratio": ratio, "target": f"<= {TARGET_RATIO}", "met": ratio is not None and ratio <= TARGET_RATIO,
                        "paired_ratio": result["variants"]["train repfuse"].get("paired_ratio")}
    return result


def print_network(result: dict) -> None:
    shape = "x".join(map(str, result["input_shape"]))
    print(f"\n### {result['network']}, input {shape}, "
          f"median of {result.get('rounds', 0)} interleaved rounds\n")
    if "failed" in result:
        print(f"FAILED: {result['failed']}\n\n```\n{result['traceback']}```")
        return
    print("| variant | relax pipeline | conv2d before build | ops before build | compile s | median ms | "
          "IQR ms | ratio to (c) | paired ratio (IQR) | max abs err vs torch train | status |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for variant in VARIANTS:
        row = result["variants"][variant]
        iqr = (f"{row['p25_ms']:.1f}-{row['p75_ms']:.1f}" if row.get("median_ms") is not None else "-")
        paired = (f"{row['paired_ratio']:.3f} ({row['paired_ratio_p25']:.3f}-{row['paired_ratio_p75']:.3f})"
                  if row.get("paired_ratio") is not None else "-")
        print(f"| {LABELS[variant]} | {row['pipeline']} | {fmt(row.get('conv2d'), 'd')} | {fmt(row.get('ops'), 'd')} | "
              f"{fmt(row.get('compile_s'), '.2f')} | {fmt(row.get('median_ms'), '.2f')} | {iqr} | "
              f"{fmt(row.get('ratio'), '.3f')} | {paired} | {fmt(row.get('max_abs_err'), '.2e')} | {row['status']} |")
    t = result["target"]
    print(f"\ntarget: repfuse (b) / hand-fused (c) = {fmt(t['ratio'], '.3f')} "
          f"(target {t['target']}: {'met' if t['met'] else 'NOT met'}); median of the per-round ratios "
          f"{fmt(t['paired_ratio'], '.3f')}")
    a = result["variants"]["train default"].get("ratio")
    print(f"training form with the default pipeline (a) / hand-fused (c) = {fmt(a, '.3f')}")
    print(f"export + import s: training form {result['import_s']['train']:.1f}, hand-fused "
          f"{result['import_s']['hand']:.1f}; RepFuse() alone on the imported training form: "
          f"{fmt(result.get('repfuse_pass_s'), '.2f')} s (included in (b)'s compile s)")
    b_ops = result["variants"]["train repfuse"].get("op_counts")
    c_ops = result["variants"]["hand default"].get("op_counts")
    if b_ops is not None and c_ops is not None:
        diff = {op: (b_ops.get(op, 0), c_ops.get(op, 0)) for op in sorted(set(b_ops) | set(c_ops))
                if b_ops.get(op, 0) != c_ops.get(op, 0)}
        print("operator calls that differ between (b) and (c) before the build: "
              + (", ".join(f"{op} {nb} vs {nc}" for op, (nb, nc) in diff.items()) or "none"))
    launches = {v: result["variants"][v].get("parallel_launches") for v in VARIANTS}
    print("TVMBackendParallelLaunch calls in the generated code: "
          + ", ".join(f"{v} {fmt(n, 'd')}" for v, n in launches.items()))
    print(f"error tolerance 1e-4 * max |output| = {result['tolerance']:.2e}; hand-fused vs training form in "
          f"torch: {result['hand_check_torch_err']:.2e} ({'ok' if result['hand_check_ok'] else 'MISMATCH'})")
    if "repfuse_pass_error" in result:
        print(f"\nRepFuse() applied separately FAILED:\n\n```\n{result['repfuse_pass_traceback']}```")
    for variant in VARIANTS:
        row = result["variants"][variant]
        if "traceback" in row:
            print(f"\n{LABELS[variant]} FAILED:\n\n```\n{row['traceback']}```")


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 64x64 input, repvgg-a0 and mobileone-s0, 2 warm-ups, 10 rounds")
    parser.add_argument("--networks", help=f"comma-separated zoo networks (default {', '.join(ALL_NETWORKS)})")
    parser.add_argument("--size", type=int, default=None, help="input height and width (default 224, quick 64)")
    parser.add_argument("--threads", type=int, default=1, help="TVM_NUM_THREADS (and torch threads), default 1")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant (default 2)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed interleaved rounds (default: fitted to --budget; quick 10)")
    parser.add_argument("--budget", type=float, default=90.0,
                        help="seconds of timed rounds per network when --rounds is not given (default 90)")
    parser.add_argument("--min-rounds", type=int, default=10)
    parser.add_argument("--max-rounds", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()

    size = args.size or (64 if args.quick else 224)
    if args.quick and args.rounds is None:
        args.rounds = 10
    networks = (args.networks.split(",") if args.networks else (QUICK_NETWORKS if args.quick else ALL_NETWORKS))
    unknown = [n for n in networks if n not in ZOO]
    if unknown:
        parser.error(f"unknown network(s) {', '.join(unknown)}; choose from {', '.join(ZOO)}")

    # the thread count must be in the environment before tvm (and its runtime thread pool) is loaded
    env_before = os.environ.get("TVM_NUM_THREADS")
    tvm_was_imported = "tvm" in sys.modules
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    started = time.perf_counter()

    import torch
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    import repfuse.backends.tvm as rtvm  # registers relax_pipeline="repfuse"

    torch.set_num_threads(args.threads)
    threads = thread_check(tvm, args.threads, env_before, tvm_was_imported)
    log(thread_sentence(threads))
    mods = (torch, tvm, relax, from_exported_program, rtvm)

    # one small build with each pipeline first, so one-time initialization is not charged to a network
    log("warming up tvm.compile on a tiny model ...")
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU()).eval()
    tiny_mod = import_module(torch, from_exported_program, tiny, torch.randn(1, 3, 8, 8))
    for pipe in ("default", "repfuse"):
        try:
            tvm.compile(tiny_mod, target="llvm", relax_pipeline=pipe)
        except Exception as e:
            log(f"warm-up build with {pipe!r} failed: {describe(e)}")

    results = []
    for name in networks:
        try:
            results.append(bench_network(name, args, size, mods))
        except Exception as e:  # a network that cannot be built or imported: report it, go on
            log(traceback.format_exc())
            results.append({"network": name, "input_shape": [1, 3, size, size], "failed": describe(e),
                            "traceback": traceback.format_exc()})
    elapsed = time.perf_counter() - started

    tools = versions("tvm", "torch", "numpy", "repfuse")
    print(f"# TVM Relax: relax_pipeline=\"repfuse\" vs \"default\" vs hand-fused ({'quick' if args.quick else 'full'} run)\n")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in tools.items()) + f"; {machine()}; target llvm, tvm.cpu()")
    print(f"\nthreads: {thread_sentence(threads)}")
    print(f"\ntiming: {args.warmup} warm-up call(s) per variant, then round-robin over (a), (b), (c) with a rotating "
          f"start; median of per-call wall times of vm[\"main\"](input) "
          + (f"over {args.rounds} rounds" if args.rounds else
             f"over rounds fitted to a {args.budget:.0f} s budget per network ({args.min_rounds}-{args.max_rounds})")
          + "; \"paired ratio\": median over rounds of the ratio of a variant's call to (c)'s call in the same round.")
    print("\nNOTE: TVM's \"default\" relax pipeline builds for llvm with generic, *untuned* TIR schedules (operators "
          "legalized, no MetaSchedule tuning, no operator fusion). Absolute times are not representative of tuned "
          "TVM; only the ratios between graphs built the same way are meaningful here.")
    for result in results:
        print_network(result)

    print("\n### Summary\n")
    print("| network | conv2d (a) / (b) / (c) | (a) / (c) | (b) / (c) | (b) / (c) paired | "
          "target (b) <= 1.02 x (c) | errors |")
    print("|---|---|---:|---:|---:|---|---|")
    for r in results:
        if "failed" in r:
            print(f"| {r['network']} | - | - | - | - | - | FAILED: {r['failed']} |")
            continue
        v = r["variants"]
        convs = " / ".join(fmt(v[k].get("conv2d"), "d") for k in VARIANTS)
        bad = [f"{LABELS[k]}: {v[k]['status']}" for k in VARIANTS if v[k]["status"] != "ok"]
        print(f"| {r['network']} | {convs} | {fmt(v['train default'].get('ratio'), '.3f')} | "
              f"{fmt(v['train repfuse'].get('ratio'), '.3f')} | {fmt(v['train repfuse'].get('paired_ratio'), '.3f')} | "
              f"{'met' if r['target']['met'] else 'NOT met'} | "
              f"{'; '.join(bad) or 'none'} |")
    print(f"\ntotal benchmark wall time {elapsed:.0f} s")

    if args.json:
        write_json(args.json, {
            "quick": args.quick, "versions": tools, "machine": platform.machine(), "cpus": os.cpu_count(),
            "input_size": size, "threads": threads, "warmup": args.warmup, "rounds": args.rounds,
            "budget_s": args.budget, "seed": args.seed, "target": "llvm", "networks": results, "wall_s": elapsed})

    bad = [r["network"] for r in results if "failed" in r]
    bad += [f"{r['network']}/{k}" for r in results if "variants" in r for k, row in r["variants"].items()
            if row["status"] != "ok"]
    return harness.exit_code(bad)


if __name__ == "__main__":
    sys.exit(main())
