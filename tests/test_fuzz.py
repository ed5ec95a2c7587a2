"""Differential fuzzing in CI: a few hundred random training-form blocks per IR must be exact or untouched.

The blocks and runners are in tests/fuzz_blocks.py; `python benchmarks/fuzz.py` runs any number of them.
Each test runs one chunk of seeds, so a failure names its seeds; replay one with
    python benchmarks/fuzz.py --ir fx --seed SEED --blocks 1 -v
Each chunk also checks that the rewrites fired on a good share of its blocks (so the fuzzer cannot
pass by never fusing anything).
"""

from __future__ import annotations

import pytest

import fuzz_blocks as FB

# (blocks, chunk) per IR: about 5 minutes on one core in all
PLAN = {"fx": (300, 25), "onnx": (300, 50), "compile": (100, 20), "tvm": (72, 12)}
# Of the blocks that ran fine, the share where the rewrite removed a conv, BN or affine op, checked per
# chunk (seeds are fixed, so this is deterministic; xdist may run chunks on different workers).
MIN_FUSED = 0.25
MAX_SKIPPED = 0.25


def _chunks():
    for ir, (n, step) in PLAN.items():
        for start in range(0, n, step):
            yield pytest.param(ir, start, min(step, n - start), id=f"{ir}-seeds-{start}-{min(start + step, n) - 1}")


@pytest.mark.parametrize("ir,start,count", list(_chunks()))
def test_fuzz_chunk(ir, start, count):
    if ir == "tvm":
        pytest.importorskip("tvm")
    if ir == "onnx":
        pytest.importorskip("onnxruntime")
    results = FB.run(ir, range(start, start + count), tvm_batch=12)
    bad = [r for r in results if r.status in ("wrong", "crash")]
    assert not bad, f"{len(bad)} of {len(results)} blocks failed on {ir}:\n" + "\n".join(r.line() for r in bad)
    ok = [r for r in results if r.status == "ok" and r.fused is not None]
    fused = sum(r.fused for r in ok)
    assert ok and fused >= MIN_FUSED * len(ok), f"{ir}: only {fused} of {len(ok)} blocks fused anything"
    skipped = sum(r.status == "skip" for r in results)
    assert skipped <= MAX_SKIPPED * len(results), f"{ir}: {skipped} of {len(results)} blocks skipped (export fails)"
