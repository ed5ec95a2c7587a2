"""What the benchmarks share: zoo networks with their deploy references, the interleaved timer, report helpers.

    from harness import zoo_case, interleaved, log, fmt
    case = zoo_case("repvgg-a0", seed=0, size=64)   # training form, reference, input, output, tolerance
    samples, rounds = interleaved({"a": f, "b": g}, warmup=2, rounds=10)

Networks come from examples/zoo: the training form (`net.build()`) and the
paper's own deploy form (`net.to_deploy`), written without repfuse.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from zoo import NETWORKS as ZOO  # noqa: E402

TOLERANCE = 1e-4  # allowed max abs error, relative to max |output| of the training form


# ---------------------------------------------------------------- report helpers


def log(msg: str) -> None:
    """Progress goes to stderr; stdout keeps only the report."""
    print(msg, file=sys.stderr, flush=True)


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def describe(e: BaseException) -> str:
    """One line for a table: the exception type and the first lines of its message."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join([type(e).__name__ + ":"] + lines[:2])


def max_abs_error(out, ref) -> float:
    return float(np.abs(np.asarray(out, dtype=np.float64) - np.asarray(ref, dtype=np.float64)).max())


def failed(row: dict, e: BaseException) -> None:
    """Record an exception on a variant's row (one line and the full traceback) and log it."""
    row["error"] = describe(e)
    row["traceback"] = traceback.format_exc()
    log(row["traceback"])


def status(error: str | None, err: float | None, tol: float) -> str:
    """A variant's status: FAILED (it raised), not run, MISMATCH (beyond tol, or NaN) or ok."""
    if error is not None:
        return "FAILED: " + error
    if err is None:
        return "not run"
    return "ok" if err <= tol else "MISMATCH"


def exit_code(problems: list[str]) -> int:
    """1 (after logging them) when there are problems, else 0."""
    if problems:
        log(f"problems: {', '.join(problems)}")
    return 1 if problems else 0


def versions(*modules: str) -> dict[str, str]:
    """`__version__` of each named module (imported if need be; "missing" if it is not installed), then Python's."""
    out = {}
    for name in modules:
        try:
            out[name] = str(getattr(importlib.import_module(name), "__version__", "?"))
        except ImportError:
            out[name] = "missing"
    out["python"] = platform.python_version()
    return out


def machine() -> str:
    return f"{os.cpu_count()} CPU(s), {platform.machine()}"


def write_json(path: str, data: dict, indent: int = 2) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=indent)
    log(f"wrote {path}")


@contextlib.contextmanager
def workdir(path: str | None, prefix: str):
    """The folder `path` (created if need be), or a temporary folder removed at the end."""
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)


@contextlib.contextmanager
def stdout_to_stderr():
    """Send what tools print (Python or native) to stderr, so stdout keeps only the report."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


# ---------------------------------------------------------------- timing


def interleaved(calls: dict, warmup: int, rounds: int | None = None, budget_s: float = 0.0, min_rounds: int = 1,
                max_rounds: int = 1000) -> tuple[dict[str, list[float]], int]:
    """Milliseconds of every call of the zero-argument `calls`, called round-robin with the starting
    variant rotating each round, after `warmup` untimed calls each.  rounds=None fits the rounds to
    budget_s (estimated from the last warm-up call), within min_rounds..max_rounds."""
    if not calls:
        return {}, 0
    names = list(calls)
    last = {}
    for name in names:
        for _ in range(max(warmup, rounds is None)):  # the estimate needs one call
            t0 = time.perf_counter()
            calls[name]()
            last[name] = time.perf_counter() - t0
    if rounds is None:
        per_round = sum(last.values())
        rounds = max(min_rounds, min(max_rounds, int(budget_s / per_round) if per_round > 0 else max_rounds))
        log(f"   timing {rounds} rounds (warm-up estimate {per_round:.2f} s a round) ...")
    samples = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            t0 = time.perf_counter()
            calls[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples, rounds


def per_round_ratios(samples: list[float], base: list[float]) -> list[float]:
    """A variant's time over the base's, round by round (calls of one round are adjacent in time)."""
    return [t / b for t, b in zip(samples, base)]


# ---------------------------------------------------------------- networks


@dataclass
class Case:
    """A zoo network ready to benchmark: training form, reference (None if the zoo has none or it
    failed), input, the training form's output in float64 and the error tolerance."""

    name: str
    kind: str
    model: object
    x: object
    ref: np.ndarray
    tol: float
    reference: object = None
    reference_err: float | None = None  # max abs error of the reference against ref, in torch
    reference_error: str | None = None  # to_deploy raised
    reference_traceback: str | None = None

    def reference_problem(self) -> str | None:
        if self.reference is None:
            return self.reference_error or f"{self.name} has no deploy form in the zoo"
        if not self.reference_err <= self.tol:
            return (f"{self.name}: the reference differs from the training form in torch: "
                    f"{self.reference_err:.3g} > {self.tol:.3g}")
        return None

    def checked_reference(self):
        """The reference; raises if there is none or it differs from the training form."""
        problem = self.reference_problem()
        if problem:
            raise RuntimeError(problem)
        return self.reference


def zoo_case(name: str, seed: int, size: int) -> Case:
    """Build a zoo network (weights after torch.manual_seed(seed)), its reference, a size x size input."""
    import torch

    net = ZOO[name]
    torch.manual_seed(seed)  # weights use torch's default init
    model = net.build()
    batch, channels = net.input_size[:2]
    torch.manual_seed(seed)
    x = torch.randn(batch, channels, size, size)
    with torch.no_grad():
        ref = model(x).numpy().astype(np.float64)
    case = Case(name, net.kind, model, x, ref, TOLERANCE * float(np.abs(ref).max()))
    if net.to_deploy is not None:
        try:
            with torch.no_grad():
                case.reference = net.to_deploy(model).eval()
                case.reference_err = max_abs_error(case.reference(x), ref)
        except Exception as e:
            case.reference, case.reference_error = None, describe(e)
            case.reference_traceback = traceback.format_exc()
            log(case.reference_traceback)
    return case
