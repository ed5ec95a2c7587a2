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


def _run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                          check=True, timeout=600).stdout


def test_deploy_example():
    out = _run("deploy_pytorch.py", "--network", "repvgg-a0", "--size", "32")
    assert "regions fused: 22" in out and "the paper's own deploy form has 23" in out
    assert float(out.split("training form:")[1].split()[0]) < 1e-4


def test_compile_backend_example():
    out = _run("compile_backend.py", "--network", "repvgg-a0", "--size", "32", "--inner", "eager")
    errors = [float(line.split("max relative error")[1].split()[0]) for line in out.splitlines()
              if "max relative error" in line]
    assert len(errors) == 2 and max(errors) < 1e-4


def test_onnx_example():
    out = _run("optimize_onnx.py", "--network", "acnet-resnet18", "--size", "32")
    assert " ok" in out and "regions fused" in out


def test_tvm_example():
    out = _run("tvm_relax.py", "--network", "repvgg-a0", "--size", "32")
    assert "conv2d calls 44 -> 22" in out
    errors = [float(line.split("max relative error")[1].split()[0]) for line in out.splitlines()
              if "max relative error" in line]
    assert len(errors) == 2 and max(errors) < 1e-4
