"""Differential fuzzer for repfuse: random training-form blocks through FX, ONNX, torch.compile and TVM.

    python benchmarks/fuzz.py --ir fx,onnx,compile,tvm --blocks 10000 --seed 0
    python benchmarks/fuzz.py --ir fx --seed 1234 --blocks 1 -v      # replay one block

Block i has seed `--seed + i`; the same seed always gives the same block, weights and inputs
(tests/fuzz_blocks.py).  Prints per IR the counts of ok / not fused / wrong / crash / skip, and each
failure with its seed and class; `--json FILE` writes every result, `--stop-after N` ends an IR after N
failures, `--time-limit S` ends an IR after S seconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fuzz_blocks as FB  # noqa: E402


def summarize(ir, results, seconds):
    c = collections.Counter(r.status for r in results)
    ok = [r for r in results if r.status == "ok"]
    not_fused = sum(r.fused is False for r in ok)
    refused = sum(r.refused for r in ok)
    return (f"{ir:8s} blocks {len(results):6d}  ok {c['ok']:6d}  (not fused {not_fused}, second size refused {refused})"
            f"  wrong {c['wrong']:4d}  crash {c['crash']:4d}  skip {c['skip']:4d}   {seconds:.0f}s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ir", default="fx,onnx,compile,tvm", help="comma-separated: " + ",".join(FB.IRS))
    ap.add_argument("--blocks", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tvm-batch", type=int, default=12, help="blocks per TVM build")
    ap.add_argument("--json", help="write every result to this file")
    ap.add_argument("--stop-after", type=int, default=0, help="stop an IR after this many failures (0: never)")
    ap.add_argument("--time-limit", type=float, default=0, help="stop an IR after this many seconds (0: never)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every block and full failure details")
    args = ap.parse_args(argv)
    irs = [s.strip() for s in args.ir.split(",") if s.strip()]
    unknown = [i for i in irs if i not in FB.IRS]
    if unknown:
        print(f"unknown IR {unknown}; choose from {FB.IRS}")
        return 2
    seeds = list(range(args.seed, args.seed + args.blocks))
    summary, everything = [], []
    for ir in irs:
        start, results = time.time(), []
        step = args.tvm_batch if ir == "tvm" else 1
        for i in range(0, len(seeds), step):
            got = FB.run(ir, seeds[i:i + step], tvm_batch=args.tvm_batch)
            results += got
            for r in got:
                if args.verbose:
                    print(r.line() if r.status != "ok" else f"[{ir}] seed={r.seed} ok "
                          f"({'fused' if r.fused else 'not fused'}{', second size refused' if r.refused else ''}) :: {r.desc}")
                    if r.status in ("wrong", "crash"):
                        print("    " + r.detail.replace("\n", "\n    "))
                elif r.status in ("wrong", "crash"):
                    print(f"[{ir}] seed={r.seed} {r.status}: {r.signature} :: {r.detail.splitlines()[0][:200]}", flush=True)
            fails = sum(r.status in ("wrong", "crash") for r in results)
            if (args.stop_after and fails >= args.stop_after) or \
                    (args.time_limit and time.time() - start > args.time_limit):
                break
            if not args.verbose and len(results) % 500 < step:
                print(f"  {ir}: {len(results)} blocks, {fails} failures", file=sys.stderr, flush=True)
        summary.append(summarize(ir, results, time.time() - start))
        everything += results
        classes = collections.defaultdict(list)
        for r in results:
            if r.status in ("wrong", "crash"):
                classes[r.signature].append(r.seed)
        if classes:
            print(f"\n{ir}: failure classes (count, seeds to replay)")
            for sig, s in sorted(classes.items(), key=lambda kv: -len(kv[1])):
                print(f"  {len(s):5d}  {sig}\n         seeds {s[:12]}{' ...' if len(s) > 12 else ''}")
        print(summary[-1], flush=True)
    print("\n" + "\n".join(summary))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in everything], indent=1))
    return 1 if any(r.status in ("wrong", "crash") for r in everything) else 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
