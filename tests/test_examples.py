"""The examples run (small inputs) and print what changed."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_small_runs_every_entry_point():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--small"],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    assert "regions fused: 7" in out
    compiled = float(out.split("first call (compile)")[1].split("max relative error vs training form")[1].split()[0])
    deployed = float(out.split("deploy vs training form:")[1].split()[0])
    assert compiled < 1e-4 and deployed < 1e-4
    assert "repfuse optimize exit code 0" in out
    assert "conv2d calls 15 -> 7" in out
    tvm_error = float(out.split("conv2d calls 15 -> 7")[1].split("training form")[1].split()[0])
    assert tvm_error < 1e-4
