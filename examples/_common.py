"""Shared bits of the example scripts: pick a zoo network, report errors."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

from zoo import NETWORKS  # noqa: E402


def parser(description: str, default: str, size: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--network", default=default, choices=sorted(NETWORKS), help=f"zoo network (default {default})")
    p.add_argument("--size", type=int, default=size, help=f"input height and width (default {size})")
    return p


def rel_err(out, ref) -> float:
    import numpy as np

    out, ref = np.asarray(out), np.asarray(ref)
    return float(np.abs(out - ref).max() / np.abs(ref).max())
