"""timm's models through repfuse, against timm's own conversion (`reparameterize_model`).

Per model and IR: the fused model computes what the training form computes (random inputs, two
sizes on FX and ONNX), and its conv / BatchNorm / linear counts are no higher than those of timm's
converted model (on ONNX: than the export of timm's converted model).  A plain CNN never gets more
convs than it started with.  Random init, randomized BatchNorm statistics (examples/zoo/common.py).

CI runs the corpus minus the models marked slow; the whole corpus:

    REPFUSE_CORPUS=full python -m pytest -n 2 tests/test_timm_corpus.py
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from corpus import CORPUS, TOLERANCE, measure  # noqa: E402
from zoo.timm_corpus import import_timm  # noqa: E402  (corpus put examples/ on sys.path)

try:
    import_timm()
except ImportError:
    if os.environ.get("CI"):  # CI installs timm (README's test command): its absence is a failure there
        raise
    pytest.skip("timm is not installed: pip install --no-deps timm==1.0.31 (see README: tests)",
                allow_module_level=True)

FULL = os.environ.get("REPFUSE_CORPUS") == "full"


def cases():
    for entry in CORPUS:
        irs = ["fx", "onnx"] + (["tvm"] if entry.tvm or FULL else [])
        for ir in irs:
            marks = [pytest.mark.skip(reason="slow: REPFUSE_CORPUS=full runs it")] if entry.slow and not FULL else []
            yield pytest.param(entry, ir, id=f"{entry.name}-{ir}", marks=marks)


@pytest.mark.parametrize("entry, ir", cases())
def test_corpus_model(entry, ir):
    r = measure(entry.name, ir)
    assert not r.failure, r.failure
    assert r.errors and max(r.errors) <= TOLERANCE, f"relative errors {r.errors}"
    assert r.repfuse.within(r.timm), f"repfuse {r.repfuse} vs timm {r.timm} (conv/BN/linear)"
    assert r.repfuse.conv <= r.training.conv, f"more convs than the training form: {r.training} -> {r.repfuse}"
    if entry.kind == "reparam" and r.training.conv > r.timm.conv:
        assert r.repfuse.conv < r.training.conv  # the structure changed where timm's changed it
