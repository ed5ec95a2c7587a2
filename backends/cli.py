"""The `repfuse` command line (also `python -m repfuse`).

Exit codes: 0 done, 1 --check found different outputs, 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

_EXAMPLES = """\
examples:
  repfuse optimize model.onnx model.opt.onnx          # or -o model.opt.onnx
  repfuse optimize model.onnx -o model.opt.onnx --check --report report.json
  repfuse optimize model.onnx -o out.onnx --check --input-shape input:1,3,224,224
  repfuse optimize big.onnx -o out.onnx --external-data     # weights in out.onnx.data
  repfuse optimize model.onnx --in-place --no-simplify
  repfuse compile model.onnx -o model.so --target llvm --check   # TVM library
  repfuse optimize model.onnx -o out.onnx --disable dead_channels,dynamic_conv
  repfuse optimize --list-rules

what it does:
  onnxsim (constant folding, shape inference), then the rules below, in this
  order, each exact or leaving the graph alone.  Everything else (custom
  domains, Q/DQ regions) is left as it is.

{rules}

exit codes: 0 done, 1 --check found different outputs (OUT is not written),
2 bad input or a check that cannot run.  OUT appears only when the command succeeds.
"""


class Progress:
    """Stage lines on stderr, and a tqdm bar for the region rewrites of large models: the bar only on a
    terminal (a log file gets a line per tenth instead)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._last = -1
        self._bar = None

    def stage(self, text: str) -> None:
        self._close()
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {text}", file=sys.stderr, flush=True)

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self.enabled or total < 20:
            return
        if self.tty:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=f"  {what}", unit="region", file=sys.stderr, leave=False)
            self._bar.update(done - self._bar.n)
            if done >= total:
                self._close()
            return
        tenth = done * 10 // total
        if tenth != self._last:
            print(f"  {what}: {done}/{total}", file=sys.stderr, flush=True)
        self._last = tenth

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


_CHECK_ROWS = 3  # check lines in the compact output before they are summed up in one

_placed: list[Path] = []  # files this command has put in place (for the Ctrl-C message)


def _names(values: list[str]) -> list[str]:
    """['a,b', 'c'] -> ['a', 'b', 'c'] (repeatable, comma-separated options)."""
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def _add_rule_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disable", action="append", default=[], metavar="NAME[,NAME...]",
                   help="switch rules off (repeatable; see --list-rules)")
    p.add_argument("--enable", action="append", default=[], metavar="NAME[,NAME...]",
                   help="switch rules on, e.g. ghost_concat, which is off by default (repeatable)")
    p.add_argument("--list-rules", action="store_true", help="print the rules, their order and defaults, and exit")


def rules_table() -> str:
    from ..patterns.rules import RULES

    import textwrap

    width = max(len(r.name) for r in RULES)
    lines = [f"{'rule':<{width}}  default  what it does (run in this order)"]
    for r in RULES:
        text = textwrap.wrap(r.summary, 90 - width - 11) or [""]
        lines.append(f"{r.name:<{width}}  {'on' if r.default else 'off':<7}  {text[0]}")
        lines += [" " * (width + 11) + more for more in text[1:]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    examples = _EXAMPLES.format(rules=rules_table())
    parser = argparse.ArgumentParser(
        prog="repfuse", description="Fold training-form branches into deployment graphs, exactly.",
        epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"repfuse {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    opt = sub.add_parser("optimize", help="optimize an ONNX file", epilog=examples,
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Rewrite an ONNX model exactly: fold parameter-only computations, fuse "
                                     "affine regions into one Conv or Gemm, aggregate dynamic convs and remove "
                                     "constant channels (see --list-rules).")
    opt.add_argument("input", metavar="IN", nargs="?",
                     help="the ONNX model to optimize (never modified unless --in-place)")
    opt.add_argument("out", metavar="OUT", nargs="?", help="where to write the optimized model (or -o OUT)")
    opt.add_argument("-o", "--output", metavar="OUT", help="where to write the optimized model")
    opt.add_argument("--in-place", action="store_true", help="overwrite IN (only with this flag)")
    opt.add_argument("--check", action="store_true",
                     help="run IN and OUT in onnxruntime on random inputs; exit 1 if outputs differ")
    opt.add_argument("--check-runs", type=int, default=1, metavar="N",
                     help="--check on N sets of random inputs (default 1)")
    opt.add_argument("--check-input", action="append", default=[], metavar="NAME=FILE.npy",
                     help="--check feeds this array to input NAME (repeatable); the other inputs are random")
    opt.add_argument("--rtol", type=float, default=None,
                     help="--check tolerance relative to the largest |output| (default 1e-4; 1e-2 for float16)")
    opt.add_argument("--atol", type=float, default=0.0, help="--check absolute tolerance added to it (default 0)")
    opt.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,...",
                     help="fix an input's dims in OUT, and run --check at them (repeatable; NAME: for a scalar); "
                          "without it, --check gives dynamic dims batch 2, image 224")
    opt.add_argument("--report", metavar="FILE.json", help="write the before/after report as JSON")
    opt.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    opt.add_argument("--external-data", action="store_true",
                     help="store weights in OUT.data beside OUT (automatic above 2 GB)")
    opt.add_argument("-v", "--verbose", action="store_true",
                     help="the full report: every op type, each rule, each fused region")
    opt.add_argument("--explain", action="store_true",
                     help="--verbose, and every op left alone, by rule and reason")
    opt.add_argument("-q", "--quiet", action="store_true", help="print only errors and the check verdict")
    _add_rule_options(opt)

    comp = sub.add_parser("compile", help="optimize an ONNX file and build it into a TVM library",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          description="repfuse optimize, then TVM's ONNX frontend and tvm.compile with the "
                                      "'repfuse' Relax pipeline; writes a shared library for the Relax VM.",
                          epilog="example:\n  repfuse compile model.onnx -o model.so --target llvm --check\n"
                                 "load it with tvm.runtime.load_module and run with tvm.relax.VirtualMachine.")
    comp.add_argument("input", metavar="IN", nargs="?", help="the ONNX model")
    comp.add_argument("out", metavar="OUT.so", nargs="?", help="where to write the library (or -o OUT.so)")
    comp.add_argument("-o", "--output", metavar="OUT.so", help="where to write the library")
    comp.add_argument("--target", default="llvm", help="TVM target (default: llvm)")
    comp.add_argument("--check", action="store_true",
                      help="run IN in onnxruntime and OUT in TVM on random inputs; exit 1 if outputs differ")
    comp.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,...",
                      help="fix an input's dims in the library, and run --check at them (repeatable)")
    comp.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    comp.add_argument("-v", "--verbose", action="store_true",
                      help="the full report: every op type, each rule, each fused region")
    comp.add_argument("--explain", action="store_true",
                      help="--verbose, and every op left alone, by rule and reason")
    comp.add_argument("-q", "--quiet", action="store_true", help="print only errors and the check verdict")
    _add_rule_options(comp)
    return parser


def _version() -> str:
    from repfuse import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in ("optimize", "compile"):
        parser.print_help()
        return 2
    if args.out is not None:  # OUT as onnxsim takes it, or -o OUT
        if args.output is not None and args.output != args.out:
            print(f"repfuse {args.command}: error: two outputs given ({args.out} and -o {args.output})",
                  file=sys.stderr)
            return 2
        args.output = args.out
    if args.list_rules:
        print(rules_table())
        return 0
    if args.input is None:  # IN is optional only so that --list-rules needs none
        print(f"repfuse {args.command}: error: give the input model IN (or --list-rules)", file=sys.stderr)
        return 2
    if args.command == "compile" and not args.output:
        print("repfuse compile: error: give OUT.so (or -o OUT.so)", file=sys.stderr)
        return 2
    try:
        from ..patterns.rules import enabled

        args.rules = enabled(_names(args.disable), _names(args.enable))
    except ValueError as e:
        print(f"repfuse: error: {e}", file=sys.stderr)
        return 2
    _placed.clear()
    previous = _on_sigterm(_raise_terminated)
    try:
        return _optimize(args) if args.command == "optimize" else _compile(args)
    except KeyboardInterrupt as e:  # Ctrl-C, or `kill` (SIGTERM): the staged output is removed on the way out
        done = ", ".join(str(p) for p in _placed)
        what = "terminated" if isinstance(e, _Terminated) else "interrupted"
        print(f"repfuse: {what}; " + (f"already written: {done}" if done else "nothing written"), file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except Exception as e:  # InputError is the user's; anything else is ours, but still one line
        from .onnx import InputError

        if isinstance(e, InputError):
            print(f"repfuse: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, ImportError):
            print(f"repfuse: error: {e} (pip install 'repfuse[onnx]')", file=sys.stderr)
            return 2
        raise
    finally:
        _on_sigterm(previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` (the staged output, the onnxsim child) runs."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def _on_sigterm(handler):
    """Install a SIGTERM handler (main thread only); returns the one it replaced."""
    import signal
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _optimize(args) -> int:
    try:
        from . import onnx as pipeline
    except ImportError as e:
        print(f"repfuse: error: the ONNX path needs {e.name}: pip install 'repfuse[onnx]'", file=sys.stderr)
        return 2
    source = Path(args.input)
    if args.in_place:
        target = Path(args.output) if args.output else source
        if target.resolve() != source.resolve():
            raise pipeline.InputError("--in-place writes IN itself; drop -o or drop --in-place")
    elif not args.output:
        raise pipeline.InputError("give OUT (repfuse optimize IN OUT, or -o OUT; --in-place overwrites IN)")
    else:
        target = Path(args.output)
        if target.exists() and target.resolve() == source.resolve():
            raise pipeline.InputError(f"{target}: OUT is IN; refusing to overwrite the input (use --in-place)")
    shapes = pipeline.parse_input_shapes(args.input_shape)
    given = pipeline.load_feeds(args.check_input)
    if args.check_runs < 1 or (args.rtol is not None and args.rtol < 0) or args.atol < 0:
        raise pipeline.InputError("--check-runs must be 1 or more, --rtol and --atol not negative")
    if (given or args.check_runs != 1 or args.rtol is not None or args.atol) and not args.check:
        raise pipeline.InputError("--check-runs, --check-input, --rtol and --atol set up --check: add --check")
    pipeline.check_writable(target)
    if args.report:
        pipeline.check_writable(args.report)

    progress = Progress(enabled=not args.quiet and sys.stderr.isatty())
    warnings: list[str] = []

    def warn(message: str) -> None:
        if message not in warnings:
            warnings.append(message)
            print(f"repfuse: warning: {message}", file=sys.stderr)

    progress.stage(f"loading {source}")
    model = pipeline.load(source, warn)
    pipeline.check_input_shapes(model, shapes)  # before any work: a wrong shape is the user's mistake
    model = pipeline.fix_input_shapes(model, shapes)
    in_bytes = source.stat().st_size + _data_bytes(source)
    nodes = pipeline.node_count(model)
    if nodes >= 2000 and not args.quiet:
        progress.enabled = True  # large models get stage lines even when stderr is a file
    progress.stage(f"{nodes} nodes; optimizing" + ("" if args.no_simplify else " (onnxsim first)"))
    model, report = pipeline.optimize(model, simplify_first=not args.no_simplify, warn=warn, progress=progress,
                                      rules=args.rules, isolate=True)
    progress.stage(f"writing {target}")

    # OUT is written beside its place and moved there only once everything (the check too) succeeded;
    # with --in-place, IN is therefore still the original while the check runs
    with pipeline.staged(model, target, external_data=args.external_data) as stage:
        report.file_bytes = (in_bytes, sum(p.stat().st_size for p in stage.files))
        status = 0
        check_rows = None
        skipped = None
        if args.check:
            progress.stage("checking with onnxruntime")
            try:
                check_rows = pipeline.compare_outputs(str(source), str(stage.path), shapes, runs=args.check_runs,
                                                      rtol=args.rtol, atol=args.atol, given=given)
            except pipeline.CheckSkipped as e:
                skipped = str(e)
            status = 0 if check_rows is None or all(r["ok"] for r in check_rows) else 1
        if not args.quiet:
            print(report.table(explain=args.explain, verbose=args.verbose))
            print(f"time: {time.perf_counter() - progress.start:.1f} s")
        if skipped:
            print(f"check skipped: {skipped}")
        rows = check_rows or []
        shown = rows if args.verbose or len(rows) <= _CHECK_ROWS else [r for r in rows if not r["ok"]][:_CHECK_ROWS]
        for r in shown:
            verdict = "ok" if r["ok"] else "DIFFERENT"
            noise = f", IN's own float noise {r['noise_floor']:.2g}" if r.get("noise_floor") else ""
            runs = f", {args.check_runs} input sets" if args.check_runs > 1 else ""
            detail = r.get("error") or (f"max |IN - OUT| = {r['max_abs_error']:.3g} "
                                        f"(tolerance {r['tolerance']:.3g}{noise}{runs})")
            print(f"check {r['output']}: {detail} {verdict}")
        if len(shown) < len(rows):  # many outputs: one line for the rest (--verbose lists them all)
            worst = max(rows, key=lambda r: r["max_abs_error"] / max(r["tolerance"], 1e-300))
            bad = sum(not r["ok"] for r in rows)
            print(f"check: {len(rows) - bad} of {len(rows)} outputs ok (closest to its tolerance: {worst['output']}, "
                  f"{worst['max_abs_error']:.3g} of {worst['tolerance']:.3g}; --verbose lists every output)")
        if args.report:
            data = pipeline.report_json(report, str(source), str(target) if status == 0 else None, check_rows,
                                        skipped, warnings)
            tmp = Path(args.report).with_name(Path(args.report).name + ".tmp")
            tmp.write_text(json.dumps(data, indent=2))
            os.replace(tmp, args.report)
            _placed.append(Path(args.report))
        if status:
            print(f"check FAILED: {target} not written", file=sys.stderr)
            return status
        _placed.extend(stage.commit())
    if not args.quiet:
        print(f"wrote {target}")
    return status


def _compile(args) -> int:
    try:
        from . import onnx as pipeline
    except ImportError as e:
        print(f"repfuse: error: the ONNX path needs {e.name}: pip install 'repfuse[onnx]'", file=sys.stderr)
        return 2
    source, target = Path(args.input), Path(args.output)
    if target.exists() and target.resolve() == source.resolve():
        raise pipeline.InputError(f"{target}: OUT is IN; refusing to overwrite the input")
    shapes = pipeline.parse_input_shapes(args.input_shape)
    pipeline.check_writable(target)
    progress = Progress(enabled=not args.quiet and sys.stderr.isatty())
    progress.stage(f"loading {source}")
    model = pipeline.load(source, lambda m: print(f"repfuse: warning: {m}", file=sys.stderr))
    pipeline.check_input_shapes(model, shapes)  # the input is checked before TVM (seconds to import) is loaded
    model = pipeline.fix_input_shapes(model, shapes)
    progress.stage("importing TVM")
    try:
        from . import tvm as tvm_backend
    except ImportError as e:
        print(f"repfuse: error: {e}", file=sys.stderr)
        return 2
    progress.stage("optimizing")
    model, report = pipeline.optimize(model, simplify_first=not args.no_simplify, rules=args.rules, isolate=True,
                                      warn=lambda m: print(f"repfuse: warning: {m}", file=sys.stderr))
    input_names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
    progress.stage(f"building for {args.target} with TVM")
    try:
        tvm_backend.compile_onnx(pipeline.to_proto(model), target, args.target)
    except Exception as e:
        print(f"repfuse: error: TVM could not build {source} for {args.target}: {pipeline.first_line(e)}",
              file=sys.stderr)
        return 2
    if not args.quiet:
        print(report.table(explain=args.explain, verbose=args.verbose))
    status = 0
    if args.check:
        progress.stage("checking: onnxruntime on IN, the TVM library on OUT")
        feeds = pipeline.random_feeds(str(source), shapes)
        names, reference = pipeline.run_onnxruntime(str(source), feeds)
        rows = pipeline.compare(names, reference, tvm_backend.run_library(target, feeds, input_names))
        status = 0 if all(r["ok"] for r in rows) else 1
        for r in rows:
            print(f"check {r['output']}: max |onnxruntime(IN) - TVM(OUT)| = {r['max_abs_error']:.3g} "
                  f"(tolerance {r['tolerance']:.3g}) {'ok' if r['ok'] else 'DIFFERENT'}")
    if not args.quiet:
        print(f"wrote {target}")
    return status


def _data_bytes(model_path: Path) -> int:
    """Bytes of the external data files the model's tensors name (each file once), not whatever .data
    files happen to sit beside it."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:
        return 0
    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(sub)

    files = set()
    for tensor in tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location:
                files.add(model_path.parent / location)
    return sum(f.stat().st_size for f in files if f.is_file())


if __name__ == "__main__":
    raise SystemExit(main())
