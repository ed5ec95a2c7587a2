"""The examples run (small inputs) and print what changed."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_small():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--small", "--no-compile"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert "regions fused: 7" in out
    error = float(out.split("deploy vs training form:")[1].split()[0])
    assert error < 1e-4
