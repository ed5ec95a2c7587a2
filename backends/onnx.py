"""The ONNX pipeline behind `repfuse optimize` and `repfuse.optimize_onnx`.

load -> onnxsim (optional; a failure is a warning) -> shape inference ->
repfuse fusion to a fixed point -> dead-code removal -> topological sort ->
onnx.checker -> atomic save.  Every user mistake raises InputError with one
line that names the problem; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (registers ir.passes.common)

from ..passes import onnx as onnxpass
from ..passes import onnx_write
from ..patterns.report import FusionReport
from ..patterns import rules as R

__all__ = ["InputError", "CheckSkipped", "CheckFailed", "report_json", "load", "optimize", "optimize_onnx", "save", "staged", "compare_outputs",
           "MIN_OPSET", "upgrade_opset"]

MIN_OPSET = 11
_PROTOBUF_LIMIT = 2**31 - 1
_SIMPLIFY_LIMIT = 1_800_000_000  # onnxsim serializes the model into one protobuf


class InputError(Exception):
    """A problem with what the user gave us (file, path, opset): reported in one line."""


Loaded = "onnx.ModelProto | ir.Model"  # a ModelProto when it fits one protobuf, else a lazy onnx_ir Model


def load(path: str | os.PathLike, warn: Callable[[str], None] | None = None):
    """Read a model for `optimize`: a ModelProto (weights in memory) when it fits one protobuf,
    else an onnx_ir Model whose external weights stay memory-mapped.  An opset older than MIN_OPSET
    is converted (`upgrade_opset`; `warn` says so)."""
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
        raise InputError(f"{path}: not a readable ONNX model (truncated or corrupt?): {first_line(e)}") from None
    return upgrade_opset(model, str(path), warn)


def upgrade_opset(model, name: str = "model", warn: Callable[[str], None] | None = None):
    """The model at opset MIN_OPSET when it is older (onnx.version_converter, said in a warning), else as is;
    InputError when the converter cannot, or for an opset newer than this onnx knows."""
    opset = check_opset(model, name, convertible=True)
    if opset >= MIN_OPSET:
        return model
    if not isinstance(model, onnx.ModelProto):
        raise InputError(f"{name}: uses opset {opset}; repfuse needs {MIN_OPSET} or newer, and a model this "
                         "large cannot go through onnx.version_converter in memory")
    try:
        converted = onnx.version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(converted)
    except Exception as e:
        raise InputError(f"{name}: uses opset {opset}; onnx.version_converter could not convert it to "
                         f"{MIN_OPSET}: {first_line(e)}") from None
    (warn or (lambda m: warnings.warn(m, stacklevel=3)))(
        f"{name}: converted from opset {opset} to {MIN_OPSET} with onnx.version_converter")
    return converted


def node_count(model) -> int:
    return len(model.graph.node) if isinstance(model, onnx.ModelProto) else len(model.graph)


def _on_disk_bytes(path: Path) -> int:
    """The model file plus the data files beside it (an upper bound on its weights)."""
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob("*.data") if p.is_file())


def check_opset(model, name: str = "model", convertible: bool = False) -> int:
    """The model's default-domain opset; InputError when repfuse cannot take it (older than MIN_OPSET only
    when not `convertible`)."""
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
    if opset < MIN_OPSET and not convertible:
        raise InputError(f"{name}: uses opset {opset}; repfuse needs {MIN_OPSET} or newer "
                         f"(convert it with onnx.version_converter.convert_version)")
    return opset


def _tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def simplify(proto: onnx.ModelProto, warn: Callable[[str], None], isolate: bool = False) -> onnx.ModelProto:
    """onnxsim's constant folding and shape inference; on any failure warn once and keep the model.

    Initializers that are also graph inputs (overridable defaults) are handed to onnxsim as plain
    inputs, so it neither folds nor removes them, and restored afterwards.  `isolate`: run onnxsim
    in a forked child, so that Ctrl-C stops it at once (its C++ core holds off Python's signal
    handling for as long as it runs) and a crash in it is only a warning."""
    try:
        onnxsim = import_onnxsim()
    except ImportError:
        warn("onnxsim is not installed (pip install 'repfuse[onnx]'); continuing without simplification")
        return _infer_shapes(proto)
    inputs = {i.name for i in proto.graph.input}
    defaults = [t for t in proto.graph.initializer if t.name in inputs]
    try:
        if isolate and hasattr(os, "fork"):
            simplified, ok = _simplify_in_child(proto, defaults)
        else:
            simplified, ok = _simplify(onnxsim, proto, defaults)
        if ok:
            kept = {i.name for i in simplified.graph.input}
            if all(t.name in kept for t in defaults):
                simplified.graph.initializer.extend(defaults)
                return simplified
            warn("onnxsim dropped an overridable input; continuing without simplification")
        else:
            warn("onnxsim could not validate its result; continuing without simplification")
    except KeyboardInterrupt:
        raise
    except Exception as e:
        warn(f"onnxsim failed ({first_line(e)}); continuing without simplification")
    return _infer_shapes(proto)


def import_onnxsim():
    """onnxsim, imported without torch when torch is not loaded yet.

    onnxsim's package __init__ imports its quantization and export helpers, which import torch when it
    is installed (+1 s per CLI run); each of them guards that import, and `simplify` needs none of them."""
    if "torch" in sys.modules:
        import onnxsim
        return onnxsim
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is in place
    try:
        import onnxsim
    finally:
        del sys.modules["torch"]
    return onnxsim


# onnxsim's optimizer folds a Pad into the pool after it even when the pads reach the kernel size,
# which onnxruntime refuses to load; repfuse folds pads into the pool's conv form itself
ONNXSIM_SKIPPED = ["fuse_pad_into_pool"]


def _simplify(onnxsim, proto: onnx.ModelProto, defaults: list) -> tuple[onnx.ModelProto, bool]:
    if defaults:  # a copy without them: the caller's model is never modified
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        proto = _drop_initializers(copy, defaults)
    with _quiet_native_output():
        return onnxsim.simplify(proto, skipped_optimizers=ONNXSIM_SKIPPED)


def _drop_initializers(proto: onnx.ModelProto, dropped: list) -> onnx.ModelProto:
    """`proto` (edited in place) without the initializers named in `dropped`."""
    names = {t.name for t in dropped}
    rest = [t for t in proto.graph.initializer if t.name not in names]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(rest)
    return proto


def _simplify_in_child(proto: onnx.ModelProto, defaults: list) -> tuple[onnx.ModelProto, bool]:
    """onnxsim in a forked child (it inherits `proto`); the result comes back serialized through a pipe."""
    import multiprocessing
    import signal

    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        try:
            onnxsim = import_onnxsim()
            model = _drop_initializers(proto, defaults)  # the child's own copy of the parent's memory
            simplified, ok = onnxsim.simplify(model, skipped_optimizers=ONNXSIM_SKIPPED)
            send.send_bytes((b"1" if ok else b"0") + simplified.SerializeToString())
        except BaseException as e:  # noqa: BLE001 - reported to the parent as a failure
            send.send_bytes(b"E" + first_line(e).encode())

    process = ctx.Process(target=child, daemon=True)
    process.start()
    send.close()
    try:
        while not receive.poll(0.05):
            if not process.is_alive() and not receive.poll(0):
                raise RuntimeError(f"onnxsim crashed (exit code {process.exitcode})")
        data = receive.recv_bytes()
    except EOFError:
        raise RuntimeError(f"onnxsim crashed (exit code {process.exitcode})") from None
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receive.close()
    if data[:1] == b"E":
        raise RuntimeError(data[1:].decode(errors="replace"))
    return onnx.load_from_string(data[1:]), data[:1] == b"1"


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
    from ..patterns.report import GraphStats

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
             rules: frozenset[str] | None = None, isolate: bool = False) -> tuple[ir.Model, FusionReport]:
    """Run the pipeline on a loaded model (ModelProto or onnx_ir Model); returns the optimized
    onnx_ir Model and its report.  `rules`: the patterns.rules names to run (default: those on
    by default); `isolate`: onnxsim in a child process (prompt Ctrl-C).  Nothing is checked or
    written yet: see `to_proto` and `save`."""
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    rules = R.enabled() if rules is None else frozenset(rules)
    check_opset(model)
    if isinstance(model, ir.Model):
        if _tensor_bytes(model) <= _SIMPLIFY_LIMIT:
            model = ir.serde.serialize_model(model)
        else:
            warn("model is too large for onnxsim (protobuf limit); fusing without simplification")
            try:  # onnx_ir infers shapes with the large weights left out of the protobuf
                ir.passes.common.ShapeInferencePass()(model)
            except Exception:  # shapes are a help, not a requirement
                pass
    onnxsim_row = R.RuleRow("onnxsim", enabled=False)
    if isinstance(model, onnx.ModelProto):
        before = _proto_stats(model)
        proto = simplify(model, warn, isolate) if simplify_first else _infer_shapes(model)
        if simplify_first:  # onnxsim's own folding (BatchNorm into Conv, shape arithmetic) gets its own row
            simplified = _proto_stats(proto)
            onnxsim_row = R.RuleRow("onnxsim", True, before.total_ops - simplified.total_ops,
                                    f"{before.total_ops:,} -> {simplified.total_ops:,} ops, "
                                    f"{before.convs} -> {simplified.convs} convs")
        model = ir.serde.deserialize_model(proto)
        before.macs = onnxpass.graph_stats(model).macs  # simplification leaves convs and their shapes alone
    else:
        before = onnxpass.graph_stats(model)
    run = onnx_write.run_rules(model, rules, progress=(lambda i, n: progress("fusing", i, n)) if progress else None)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.TopologicalSortPass()(model)
    after = onnxpass.graph_stats(model)
    for key in [k for k in model.metadata_props if k.startswith("onnxsim")]:
        del model.metadata_props[key]  # what an earlier onnxsim run said about the input, not about this model
    report = FusionReport.of(before, after, run)
    report.rules.insert(0, onnxsim_row)  # it runs first
    return model, report


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize and run onnx.checker (models under 2 GB; larger ones are checked from disk by `save`)."""
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    return proto


class CheckFailed(ValueError):
    """optimize_onnx(check=True): the optimized model's outputs differ from the input's.  `.report` has the
    rows (the same JSON report as the CLI's --report)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def report_json(report: FusionReport, source: str | None, output: str | None, check_rows=None,
                check_skipped: str | None = None, warned: list[str] | None = None) -> dict:
    """The JSON report, the same from the CLI (--report) and from optimize_onnx(report=True)."""
    data = report.to_dict()
    data.update(input=source, output=output, check=check_rows, check_skipped=check_skipped, warnings=warned or [])
    return data


def optimize_onnx(model_or_path, simplify: bool = True, disable=(), enable=(), explain: bool = False,
                  check: bool = False, report: bool = False, input_shapes: dict[str, list[int]] | None = None,
                  check_runs: int = 1, rtol: float | None = None, atol: float = 0.0):
    """Optimize an ONNX model (ModelProto, onnx_ir Model or path); returns a new ModelProto, or
    (ModelProto, report dict) with `report=True` (the CLI's --report JSON).

    `disable` / `enable`: rule names (repfuse.patterns.rules.RULES) to switch off or on, a list or one
    name; an unknown name raises InputError.  `input_shapes` ({"x": [1, 3, 224, 224]}) fixes those
    inputs' dims in the result.  `check=True` runs the input and the result in onnxruntime on
    `check_runs` sets of random inputs, as `repfuse optimize --check` does, and raises CheckFailed
    when they differ.  `explain=True` logs the report with every op left alone, by rule and reason
    (logger "repfuse").  The input is never modified.  Models over 2 GB cannot be returned as one
    ModelProto: use the CLI or `optimize` + `save` for those.
    """
    rules = rule_set(disable, enable)
    warned: list[str] = []

    def warn(message: str) -> None:
        warned.append(message)
        warnings.warn(message, stacklevel=3)

    source = str(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else None
    if source is not None:
        model = load(model_or_path, warn)
    elif isinstance(model_or_path, onnx.ModelProto):
        model = upgrade_opset(model_or_path, warn=warn)
    elif isinstance(model_or_path, ir.Model):
        model = upgrade_opset(ir.serde.serialize_model(model_or_path), warn=warn)
    else:
        raise TypeError(f"optimize_onnx takes a path, onnx.ModelProto or onnx_ir.Model, not {type(model_or_path)}")
    shapes = {k: list(v) for k, v in (input_shapes or {}).items()}
    check_input_shapes(model, shapes)
    original = model
    model, fusion = optimize(fix_input_shapes(model, shapes), simplify_first=simplify, rules=rules, warn=warn)
    if explain:
        logging.getLogger("repfuse").warning("repfuse.optimize_onnx:\n%s", fusion.table(explain=True))
    proto = to_proto(model)
    proto.metadata_props.add(key="repfuse.regions_fused", value=str(len(fusion.regions)))
    rows = skipped = None
    if check:
        rows, skipped = _check_in_memory(source, original, proto, shapes, check_runs, rtol, atol)
    data = report_json(fusion, source, None, rows, skipped, warned)
    if rows is not None and not all(r["ok"] for r in rows):
        bad = ", ".join(f"{r['output']} ({r['max_abs_error']:.3g} > {r['tolerance']:.3g})" for r in rows if not r["ok"])
        raise CheckFailed(f"optimize_onnx: the optimized model's outputs differ: {bad}", data)
    return (proto, data) if report else proto


def _check_in_memory(source, original, optimized: onnx.ModelProto, shapes, runs, rtol, atol):
    """compare_outputs on models in memory (written to a temporary folder for onnxruntime); (rows, skip reason)."""
    with tempfile.TemporaryDirectory(prefix="repfuse-check-") as tmp:
        if source is None:
            source = os.path.join(tmp, "input.onnx")
            onnx.save(original if isinstance(original, onnx.ModelProto) else ir.serde.serialize_model(original),
                      source)
        candidate = os.path.join(tmp, "optimized.onnx")
        onnx.save(optimized, candidate)
        try:
            return compare_outputs(source, candidate, shapes, runs=runs, rtol=rtol, atol=atol), None
        except CheckSkipped as e:
            return None, str(e)


def check_writable(out: str | os.PathLike) -> None:
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise InputError(f"{out}: is a directory; give a file name for the output")
    if not parent.is_dir():
        raise InputError(f"{out}: cannot write: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise InputError(f"{out}: cannot write: permission denied")


class Staged:
    """A model written into a temporary folder beside its destination (see `staged`)."""

    def __init__(self, folder: Path, out: Path, external: bool):
        self.out = out
        self.path = folder / out.name  # the written model, runnable where it is
        self.data = folder / (out.name + ".data") if external else None
        self.placed: list[Path] = []

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.data, self.path) if p is not None]

    def commit(self) -> list[Path]:
        """Move the files into place (data file first, model last); returns the placed paths."""
        for p in self.files:
            os.replace(p, self.out.parent / p.name)
            self.placed.append(self.out.parent / p.name)
        return self.placed


@contextlib.contextmanager
def staged(model: ir.Model, out: str | os.PathLike, *, external_data: bool = False):
    """Check and write `model` into a temporary folder beside `out`; yields a `Staged`.  Nothing is
    at `out` until `commit()`; the folder and anything not committed are removed on exit, also on
    an error or Ctrl-C.  Weights go to `<out>.data` when asked, or when the model would not fit one
    protobuf."""
    out = Path(out)
    check_writable(out)
    external = external_data or _tensor_bytes(model) > _SIMPLIFY_LIMIT
    try:
        folder = tempfile.mkdtemp(dir=out.parent if str(out.parent) else ".", prefix=".repfuse-")
    except OSError as e:
        raise InputError(f"{out}: cannot write: {e.strerror or e}") from None
    try:
        stage = Staged(Path(folder), out, external)
        try:
            if external:
                ir.save(model, stage.path, external_data=stage.data.name)
                onnx.checker.check_model(str(stage.path))
            else:
                onnx.save(to_proto(model), str(stage.path))
        except OSError as e:
            raise InputError(f"{out}: cannot write: {e.strerror or e}") from None
        yield stage
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def save(model: ir.Model, out: str | os.PathLike, *, external_data: bool = False) -> list[Path]:
    """Check and write atomically: into a temporary folder beside `out`, then rename into place.

    Weights go to `<out>.data` beside the model when asked, or when the model
    would not fit one protobuf.  Returns the files written.
    """
    with staged(model, out, external_data=external_data) as stage:
        return stage.commit()


# ---------------------------------------------------------------- numeric check

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
                "tensor(int8)": np.int8, "tensor(uint64)": np.uint64, "tensor(uint32)": np.uint32,
                "tensor(uint16)": np.uint16, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}
_ORT_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


class CheckSkipped(Exception):
    """--check cannot run for a reason that is not the user's mistake (e.g. custom-domain ops)."""


def first_line(e: BaseException) -> str:
    """An error's first line (its type's name when it has no text): what one-line messages show."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def parse_input_shapes(specs: list[str]) -> dict[str, list[int]]:
    """['x:1,3,224,224', ...] -> {'x': [1, 3, 224, 224]}; 'x:' is a scalar."""
    shapes = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")] if dims.strip() else []
            if any(d <= 0 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise InputError(f"--input-shape {spec!r}: expected NAME:D1,D2,... with positive sizes "
                             "(e.g. input:1,3,224,224)") from None
    return shapes


def declared_inputs(model) -> dict[str, list | None]:
    """The runtime inputs (not initializers) and their declared dims (int, or None when dynamic);
    None for an input of unknown rank."""
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model), load_external_data=False)
    out: dict[str, list | None] = {}
    if isinstance(model, onnx.ModelProto):
        inits = {t.name for t in model.graph.initializer}
        for v in model.graph.input:
            if v.name in inits:
                continue
            t = v.type.tensor_type
            out[v.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                           for d in t.shape.dim] if t.HasField("shape") else None
    else:
        for v in model.graph.inputs:
            if v.const_value is None:
                out[v.name] = None if v.shape is None else [d if isinstance(d, int) else None for d in v.shape]
    return out


def check_input_shapes(model, shapes: dict[str, list[int]]) -> None:
    """--input-shape must name runtime inputs and fit their rank and static sizes: InputError otherwise."""
    if not shapes:
        return
    declared = declared_inputs(model)
    unknown = sorted(set(shapes) - set(declared))
    if unknown:
        raise InputError(f"--input-shape names unknown inputs: {', '.join(unknown)} "
                         f"(the model's inputs: {', '.join(declared) or 'none'})")
    for name, given in shapes.items():
        dims = declared[name]
        if dims is None:
            continue
        shown = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
        if len(dims) != len(given):
            raise InputError(f"--input-shape {name}: gives {len(given)} dims; the input has rank {len(dims)} {shown}")
        for i, (d, g) in enumerate(zip(dims, given)):
            if d is not None and d != g:
                raise InputError(f"--input-shape {name}: dim {i} is {g}, but the model fixes it at {d} {shown}")


def fix_input_shapes(model, shapes: dict[str, list[int]]):
    """The model with the named inputs' dims fixed to `shapes` (validated by check_input_shapes first), as
    onnxsim's --overwrite-input-shape does: the output keeps them, and shape inference can use them."""
    if not shapes:
        return model
    if isinstance(model, onnx.ModelProto):
        fixed = onnx.ModelProto()
        fixed.CopyFrom(model)  # the caller's model is never modified
        for v in fixed.graph.input:
            if v.name in shapes:
                shape = v.type.tensor_type.shape
                del shape.dim[:]
                for d in shapes[v.name]:
                    shape.dim.add().dim_value = d
        return fixed
    for v in model.graph.inputs:  # a large model, loaded lazily: edited in place (it was loaded for this run)
        if v.name in shapes:
            v.shape = ir.Shape(shapes[v.name])
    return model


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


def random_feeds(path: str, input_shapes: dict[str, list[int]] | None = None, seed: int = 0,
                 session=None, skip: set[str] = frozenset()) -> dict:
    """Random inputs for every runtime input of the model at `path` but those in `skip` (sizes as in
    _concrete_shape): floats standard normal, ints in [0, 4), bools at random.  CheckSkipped for an input
    of a type it cannot generate (strings, sequences, maps)."""
    session = session or _session(path)
    shapes = input_shapes or {}
    proto = onnx.load(str(path), load_external_data=False)
    declared = declared_inputs(proto)
    check_input_shapes(proto, shapes)
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in session.get_inputs():
        if spec.name in skip:
            continue
        dtype = _NUMPY_TYPES.get(spec.type)
        if dtype is None:
            raise CheckSkipped(f"input {spec.name} has type {spec.type}, which the check cannot generate "
                               f"(give it with --check-input {spec.name}=FILE.npy)")
        dims = declared.get(spec.name, spec.shape)
        if dims is None and spec.name not in shapes:
            raise InputError(f"--check: input {spec.name} has no declared shape; give --input-shape {spec.name}:D1,...")
        dims = _concrete_shape(dims or [], shapes.get(spec.name))
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = np.asarray(rng.standard_normal(dims), dtype)
        elif dtype is np.bool_:
            feeds[spec.name] = np.asarray(rng.random(dims) > 0.5)
        else:
            feeds[spec.name] = np.asarray(rng.integers(0, 4, dims), dtype)
    return feeds


def _session(path: str, optimized: bool = False):
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError("--check needs onnxruntime: pip install 'repfuse[onnx]'") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnxruntime(path: str, feeds: dict) -> tuple[list[str], list[np.ndarray]]:
    session = _session(path)
    return [o.name for o in session.get_outputs()], session.run(None, feeds)


def _custom_ops(path: str) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    return sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in _ORT_DOMAINS})


RTOL = 1e-4  # allowed error relative to the largest |output| (1e-2 for float16 outputs)


def compare(names: list[str], reference: list[np.ndarray], candidate: list[np.ndarray], rtol: float | None = None,
            atol: float = 0.0, noise: list[float] | None = None) -> list[dict]:
    """One row per output: max abs error against atol + rtol x max |reference|, or 10x the input model's own
    float noise (`noise`: how far two runs of it differ) where that is larger."""
    rows = []
    for i, (name, a, b) in enumerate(zip(names, reference, candidate)):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = float(np.abs(a64[np.isfinite(a64)]).max(initial=0.0))
        r = rtol if rtol is not None else 1e-2 if np.asarray(a).dtype == np.float16 else RTOL
        floor = 10 * noise[i] if noise else 0.0
        tol = max(atol + r * max(scale, 1e-3), floor)
        if a64.shape != b64.shape:
            err = float("inf")
        elif not np.array_equal(np.isnan(a64), np.isnan(b64)):
            err = float("nan")  # NaN on one side only: never within a tolerance
        else:  # NaN where the input model gives NaN is agreement
            err = _max_abs_diff(a64, b64)
        rows.append({"output": name, "max_abs_error": err, "tolerance": tol, "ok": err <= tol,
                     "shape": list(a64.shape), "noise_floor": noise[i] if noise else None})
    return rows


def noise_floor(path: str, feeds: dict, reference: list[np.ndarray]) -> list[float]:
    """How far the input model's float outputs move when onnxruntime fuses and reorders its own ops: the
    rounding noise any exact rewrite may also show (deep networks with BatchNorm reach 1e-4 of their scale)."""
    try:
        optimized = _session(path, optimized=True).run(None, feeds)
    except Exception:
        return [0.0] * len(reference)
    return [_max_abs_diff(a, b) if np.asarray(a).dtype.kind == "f" and np.shape(a) == np.shape(b) else 0.0
            for a, b in zip(reference, optimized)]


def _max_abs_diff(a, b) -> float:
    """max |a - b| in float64, NaN differences left out."""
    return float(np.nan_to_num(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), nan=0.0).max(initial=0.0))


def load_feeds(specs: list[str]) -> dict[str, np.ndarray]:
    """['x=input.npy', ...] -> {'x': array}; InputError for a file that cannot be read."""
    feeds = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--check-input {spec!r}: expected NAME=FILE.npy")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"--check-input {name}: cannot read {path}: {first_line(e)}") from None
    return feeds


def compare_outputs(reference: str, candidate: str, input_shapes: dict[str, list[int]] | None = None,
                    seed: int = 0, runs: int = 1, rtol: float | None = None, atol: float = 0.0,
                    given: dict[str, np.ndarray] | None = None) -> list[dict]:
    """Run both ONNX files in onnxruntime on the same inputs (`runs` random sets, or the arrays `given`
    for some inputs); one row per output, the worst over the runs.

    IN that onnxruntime cannot load because of custom-domain ops, or an input the check cannot generate:
    CheckSkipped.  IN that it cannot load or run otherwise: InputError (the check cannot run).  OUT that it
    cannot load or run while IN runs: a failed row (repfuse's fault, never the user's)."""
    try:
        session = _session(reference)
    except InputError:
        raise
    except Exception as e:
        custom = _custom_ops(reference)
        if custom:
            raise CheckSkipped(f"onnxruntime cannot run custom-domain ops ({', '.join(custom[:3])})") from None
        raise InputError(f"--check: onnxruntime cannot load the input model: {first_line(e)}") from None
    given = given or {}
    unknown = sorted(set(given) - {i.name for i in session.get_inputs()})
    if unknown:
        raise InputError(f"--check-input names unknown inputs: {', '.join(unknown)}")
    names = [o.name for o in session.get_outputs()]
    all_feeds, refs = [], []
    for run in range(max(1, runs)):
        feeds = {**random_feeds(reference, input_shapes, seed + run, session=session, skip=set(given)), **given}
        try:
            ref = session.run(None, feeds)
        except Exception as e:
            shapes = ", ".join(f"{k}:{','.join(map(str, v.shape))}" for k, v in feeds.items())
            raise InputError(f"--check: onnxruntime cannot run the input model on these inputs ({shapes}); "
                             f"give --input-shape? {first_line(e)}") from None
        all_feeds.append(feeds)
        refs.append(ref)
        if given and len(given) == len(session.get_inputs()):
            break  # every input given: one run is the check
    noise = [max(vals) for vals in zip(*(noise_floor(reference, f, r) for f, r in zip(all_feeds, refs)))]
    del session
    try:
        session = _session(candidate)
        outs = [session.run(None, feeds) for feeds in all_feeds]
    except Exception as e:
        return [{"output": n, "max_abs_error": float("inf"), "tolerance": 0.0, "ok": False, "shape": [],
                 "error": f"onnxruntime cannot run the optimized model: {first_line(e)}"} for n in names]
    rows = [compare(names, ref, out, rtol, atol, noise) for ref, out in zip(refs, outs)]
    return [max(per_output, key=lambda r: (not r["ok"], r["max_abs_error"] / max(r["tolerance"], 1e-300)))
            for per_output in zip(*rows)]
