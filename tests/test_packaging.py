"""The wheel carries the three mapped packages and the entry points, and imports from outside the checkout."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents_and_import(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("repfuse-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("repfuse/__init__.py", "repfuse/patterns/affine.py", "repfuse/patterns/planner.py",
                   "repfuse/passes/fx.py", "repfuse/backends/pytorch.py"):
        assert module in names, module
    licenses = [n for n in names if n.endswith("LICENSE")]  # the file pyproject's license names
    assert licenses and "Apache License" in zipfile.ZipFile(wheel).read(licenses[0]).decode()[:200]
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[torch_dynamo_backends]" in entry_points and "repfuse = repfuse.backends.pytorch:repfuse_backend" in entry_points

    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    # run from an empty folder so the checkout cannot shadow the installed package
    code = ("import repfuse, repfuse.patterns.affine, repfuse.passes.fx, repfuse.backends.pytorch;"
            "print(repfuse.patterns.affine.__file__)")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().startswith(str(target))


def test_import_repfuse_does_not_need_torch():
    code = "import sys, repfuse, repfuse.patterns; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "ok"
