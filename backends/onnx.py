"""The ONNX pipeline behind `repfuse optimize` and `repfuse.optimize_onnx`.

load -> onnxsim (optional; a failure is a warning) -> shape inference ->
repfuse fusion to a fixed point -> dead-code removal -> topological sort ->
onnx.checker -> atomic save.  Every user mistake raises InputError with one
line that names the problem; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (registers ir.passes.common)

from ..passes import onnx as onnxpass
from ..passes import onnx_rewrites
from ..passes.report import FusionReport
from ..patterns import rules as R

__all__ = ["InputError", "load", "optimize", "optimize_onnx", "save", "compare_outputs", "MIN_OPSET"]

MIN_OPSET = 11
_PROTOBUF_LIMIT = 2**31 - 1
_SIMPLIFY_LIMIT = 1_800_000_000  # onnxsim serializes the model into one protobuf


class InputError(Exception):
    """A problem with what the user gave us (file, path, opset): reported in one line."""


Loaded = "onnx.ModelProto | ir.Model"  # a ModelProto when it fits one protobuf, else a lazy onnx_ir Model


def load(path: str | os.PathLike):
    """Read a model for `optimize`: a ModelProto (weights in memory) when it fits one protobuf,
    else an onnx_ir Model whose external weights stay memory-mapped."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an ONNX file")
    try:
        model = ir.load(path) if _on_disk_bytes(path) > _SIMPLIFY_LIMIT else onnx.load(str(path))
    except OSError as e:
        raise InputError(f"{path}: cannot read it or its external data: {e}") from None
    except Exception as e:  # protobuf reports corrupt files with several exception types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a readable ONNX model (truncated or corrupt?): {reason}") from None
    check_opset(model, str(path))
    return model


def node_count(model) -> int:
    return len(model.graph.node) if isinstance(model, onnx.ModelProto) else len(model.graph)


def _on_disk_bytes(path: Path) -> int:
    """The model file plus the data files beside it (an upper bound on its weights)."""
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob("*.data") if p.is_file())


def check_opset(model, name: str = "model") -> int:
    if isinstance(model, onnx.ModelProto):
        imports = {o.domain: o.version for o in model.opset_import}
    else:
        imports = dict(model.opset_imports)
    opset = imports.get("", imports.get("ai.onnx"))
    newest = onnx.defs.onnx_opset_version()
    if opset is None:
        raise InputError(f"{name}: no default-domain opset import; is this an ONNX model?")
    if opset > newest:
        raise InputError(f"{name}: uses opset {opset}, newer than the newest this onnx {onnx.__version__} "
                         f"supports ({newest}); upgrade onnx")
    if opset < MIN_OPSET:
        raise InputError(f"{name}: uses opset {opset}; repfuse needs {MIN_OPSET} or newer "
                         f"(convert it with onnx.version_converter.convert_version)")
    return opset


def _tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def simplify(proto: onnx.ModelProto, warn: Callable[[str], None]) -> onnx.ModelProto:
    """onnxsim's constant folding and shape inference; on any failure warn once and keep the model."""
    try:
        import onnxsim
    except ImportError:
        warn("onnxsim is not installed (pip install 'repfuse[onnx]'); continuing without simplification")
        return _infer_shapes(proto)
    try:
        with _quiet_native_output():
            simplified, ok = onnxsim.simplify(proto)
        if ok:
            return simplified
        warn("onnxsim could not validate its result; continuing without simplification")
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warn(f"onnxsim failed ({reason}); continuing without simplification")
    return _infer_shapes(proto)


@contextlib.contextmanager
def _quiet_native_output():
    """onnxsim's C++ core prints per-op warnings straight to the process's stdout/stderr."""
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(proto)
    except Exception:  # shapes are a help, not a requirement: unknown shapes only decline fusions
        return proto


def _proto_stats(proto: onnx.ModelProto):
    """Op counts, conv count and parameters of the input, read straight from the protobuf (cheap on
    exporter graphs with thousands of shape ops); MACs are filled in once shapes are known."""
    from ..passes.report import GraphStats

    stats = GraphStats()
    constants = {i.name for i in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    for node in proto.graph.node:
        stats.ops[node.op_type] += 1
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in constants:
            stats.convs += 1
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    stats.params = sum(int(np.prod(i.dims, dtype=np.int64)) for i in proto.graph.initializer if i.data_type in floating)
    return stats


def rule_set(disable=(), enable=()) -> frozenset[str]:
    """The rules to run (patterns.rules names); an unknown name is the user's mistake: InputError."""
    try:
        return R.enabled(disable, enable)
    except ValueError as e:
        raise InputError(str(e)) from None


def optimize(model, *, simplify_first: bool = True, warn: Callable[[str], None] | None = None,
             progress: Callable[[str, int, int], None] | None = None,
             rules: frozenset[str] | None = None) -> tuple[ir.Model, FusionReport]:
    """Run the pipeline on a loaded model (ModelProto or onnx_ir Model); returns the optimized
    onnx_ir Model and its report.  `rules`: the patterns.rules names to run (default: those on
    by default).  Nothing is checked or written yet: see `to_proto` and `save`."""
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    rules = R.enabled() if rules is None else frozenset(rules)
    check_opset(model)
    if isinstance(model, ir.Model):
        if _tensor_bytes(model) <= _SIMPLIFY_LIMIT:
            model = ir.serde.serialize_model(model)
        else:
            warn("model is too large for onnxsim and shape inference (protobuf limit); fusing as it is")
    if isinstance(model, onnx.ModelProto):
        before = _proto_stats(model)
        proto = simplify(model, warn) if simplify_first else _infer_shapes(model)
        model = ir.serde.deserialize_model(proto)
        before.macs = onnxpass.graph_stats(model).macs  # simplification leaves convs and their shapes alone
    else:
        before = onnxpass.graph_stats(model)
    run = onnx_rewrites.run_rules(model, rules, progress=(lambda i, n: progress("fusing", i, n)) if progress else None)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.TopologicalSortPass()(model)
    after = onnxpass.graph_stats(model)
    return model, FusionReport(before, after, run.regions, sorted(run.declined.items()),
                               rules=list(run.rules.values()))


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize and run onnx.checker (models under 2 GB; larger ones are checked from disk by `save`)."""
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    return proto


def optimize_onnx(model_or_path, simplify: bool = True, disable=(), enable=()) -> onnx.ModelProto:
    """Optimize an ONNX model (ModelProto, onnx_ir Model or path); returns a new ModelProto.

    `disable` / `enable`: rule names (repfuse.patterns.rules.RULES) to switch off or on; an
    unknown name raises InputError.  The input is never modified.  Models over 2 GB cannot be
    returned as one ModelProto: use the CLI or `optimize` + `save` for those.
    """
    rules = rule_set(disable, enable)
    if isinstance(model_or_path, (str, os.PathLike)):
        model = load(model_or_path)
    elif isinstance(model_or_path, onnx.ModelProto):
        model = model_or_path
    elif isinstance(model_or_path, ir.Model):
        model = ir.serde.serialize_model(model_or_path)
    else:
        raise TypeError(f"optimize_onnx takes a path, onnx.ModelProto or onnx_ir.Model, not {type(model_or_path)}")
    model, report = optimize(model, simplify_first=simplify, rules=rules)
    proto = to_proto(model)
    proto.metadata_props.add(key="repfuse.regions_fused", value=str(len(report.regions)))
    return proto


def check_writable(out: str | os.PathLike) -> None:
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise InputError(f"{out}: is a directory; give a file name for the output")
    if not parent.is_dir():
        raise InputError(f"{out}: cannot write: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise InputError(f"{out}: cannot write: permission denied")


def save(model: ir.Model, out: str | os.PathLike, *, external_data: bool = False) -> list[Path]:
    """Check and write atomically: into a temporary folder beside `out`, then rename into place.

    Weights go to `<out>.data` beside the model when asked, or when the model
    would not fit one protobuf.  Returns the files written.
    """
    out = Path(out)
    check_writable(out)
    external = external_data or _tensor_bytes(model) > _SIMPLIFY_LIMIT
    data_name = out.name + ".data"
    written = []
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".repfuse-") as tmp:
        tmp_model = Path(tmp) / out.name
        try:
            if external:
                ir.save(model, tmp_model, external_data=data_name)
                onnx.checker.check_model(str(tmp_model))
            else:
                onnx.save(to_proto(model), str(tmp_model))
        except OSError as e:
            raise InputError(f"{out}: cannot write: {e.strerror or e}") from None
        if external:
            os.replace(Path(tmp) / data_name, out.parent / data_name)
            written.append(out.parent / data_name)
        os.replace(tmp_model, out)
        written.append(out)
    return written


# ---------------------------------------------------------------- numeric check

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
                "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def parse_input_shapes(specs: list[str]) -> dict[str, list[int]]:
    """['x:1,3,224,224', ...] -> {'x': [1, 3, 224, 224]}."""
    shapes = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise InputError(f"--input-shape {spec!r}: expected NAME:D1,D2,... (e.g. input:1,3,224,224)") from None
    return shapes


def _concrete_shape(shape, given: list[int] | None) -> list[int]:
    """Sensible sizes for dynamic dims: batch 2, spatial dims of an image 224, anything else 16."""
    if given is not None:
        return given
    dims = []
    for i, d in enumerate(shape):
        if isinstance(d, int) and d > 0:
            dims.append(d)
        elif i == 0:
            dims.append(2)
        elif len(shape) == 4 and i >= 2:
            dims.append(224)
        else:
            dims.append(16)
    return dims


def random_feeds(path: str, input_shapes: dict[str, list[int]] | None = None, seed: int = 0) -> dict:
    """Random inputs for every graph input of the model at `path` (sizes as in _concrete_shape)."""
    session = _session(path)
    shapes = input_shapes or {}
    unknown = set(shapes) - {i.name for i in session.get_inputs()}
    if unknown:
        raise InputError(f"--input-shape names unknown inputs: {', '.join(sorted(unknown))}")
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in session.get_inputs():
        dtype = _NUMPY_TYPES.get(spec.type)
        if dtype is None:
            raise InputError(f"--check: input {spec.name} has type {spec.type}, which the check cannot generate")
        dims = _concrete_shape(spec.shape, shapes.get(spec.name))
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype is np.bool_:
            feeds[spec.name] = rng.random(dims) > 0.5
        else:
            feeds[spec.name] = rng.integers(0, 10, dims).astype(dtype)
    return feeds


def _session(path: str):
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError("--check needs onnxruntime: pip install 'repfuse[onnx]'") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnxruntime(path: str, feeds: dict) -> tuple[list[str], list[np.ndarray]]:
    session = _session(path)
    return [o.name for o in session.get_outputs()], session.run(None, feeds)


def compare(names: list[str], reference: list[np.ndarray], candidate: list[np.ndarray]) -> list[dict]:
    """One row per output: max abs error against a tolerance relative to the reference's scale."""
    rows = []
    for name, a, b in zip(names, reference, candidate):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = float(np.abs(a64).max(initial=0.0))
        tol = (1e-2 if np.asarray(a).dtype == np.float16 else 1e-4) * max(scale, 1e-3)
        err = float(np.abs(a64 - b64).max(initial=0.0)) if a64.shape == b64.shape else float("inf")
        rows.append({"output": name, "max_abs_error": err, "tolerance": tol, "ok": err <= tol,
                     "shape": list(a64.shape)})
    return rows


def compare_outputs(reference: str, candidate: str, input_shapes: dict[str, list[int]] | None = None,
                    seed: int = 0) -> list[dict]:
    """Run both ONNX files in onnxruntime on the same random inputs; one row per output."""
    feeds = random_feeds(reference, input_shapes, seed)
    names, ref = run_onnxruntime(reference, feeds)
    _, out = run_onnxruntime(candidate, feeds)
    return compare(names, ref, out)
