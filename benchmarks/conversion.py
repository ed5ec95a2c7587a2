"""How long conversion takes: repfuse.deploy, `repfuse optimize` and torch.compile, against their peers.

One table per section on stdout (progress on stderr); --only picks sections, --json keeps every number.

deploy   Zoo networks (training form, random weights, eval) and timm models, input batch 2 x 64x64
         (timm: the corpus size and arguments): repfuse.deploy(model, x) against torch.export.export
         static and with Dim.AUTO on every dim (deploy's default), and timm's reparameterize_model.
         One warm-up call, then the median of --repeats, under torch.no_grad() as inside deploy.
         capture: the capture deploy used (symbolic_trace, its fast path, or torch.export).
onnx     The training form exported once (dynamo=False, opset 17, batch/height/width dynamic), then
         each tool on that file in a fresh process, since start-up and imports are part of the wait:
         `repfuse optimize IN -o OUT -q`, `python -m onnxsim IN OUT` (its CLI, which also prints a
         model summary), onnxsim.simplify + onnx.save (`python -c`), `python -m onnxslim IN OUT`,
         onnxscript.optimizer.optimize (`python -c`).  Min wall seconds of --repeats (one run once a
         tool has used 10 s); nodes and Convs of each output.
growth   repfuse optimize and onnxsim (`python -c`) on onnx_peers.synthetic_chain of --sizes nodes;
         the slope of log(seconds) on log(nodes), raw and net of each tool's time on a one-block chain
         (start-up and imports, which flatten the raw slope).
imports  `import repfuse`, its onnx / pytorch / tvm backends and the CLI's main(["--help"]) in fresh
         interpreters: wall seconds, the module's cumulative time and the heaviest import outside
         repfuse (one `-X importtime` run), whether torch and onnx got imported.
compile  (--compile or --only compile; minutes a network)  a: torch.compile(training, backend=
         "repfuse"); b: torch.compile(training); c: torch.compile(repfuse.deploy(training, x)) (deploy
         seconds apart); d: torch.compile(hand_fused); c/d-frozen: with inductor's freezing; guards
         only: a backend returning a precomputed output, i.e. dynamo's per-call cost (floor of a =
         d + guards only).  Compile time: first call, each variant alone after torch._dynamo.reset(),
         inductor caches in a fresh folder (a kernel two variants share is built once).  Latency: all
         compiled again side by side, harness.interleaved for about 10 s, median; 1 torch thread
         (2 threads on a shared 2-core machine are erratic); torch.no_grad().
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import ZOO, describe, fmt, interleaved, log, max_abs_error, stdout_to_stderr, zoo_case  # noqa: E402
from onnx_peers import LINEAR_SLOPE, growth, loglog_slope, op_counts, synthetic_chain  # noqa: E402

SECTIONS = ["deploy", "onnx", "growth", "imports", "compile"]
TIMM_DEFAULT = ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repghostnet_050", "resnet18"]
SIZES_DEFAULT = [1000, 2500, 5000, 10000, 20000]
COMPILE_DEFAULT = ["repvgg-a0", "mobileone-s0"]
QUICK = {"networks": ["repvgg-a0", "mobileone-s0"], "timm": ["repvgg_a0"], "sizes": [1000, 2500], "repeats": 1}
SEED, BATCH, SIZE = 0, 2, 64
TOOL_BUDGET_S = 10.0  # no further repeat of a fresh-process run once that tool has used this much
PY = sys.executable


# ================================================================ helpers

@contextlib.contextmanager
def quiet():
    """No autograd (as inside deploy), and what torch and the tools print goes to stderr."""
    with torch.no_grad(), stdout_to_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_s(fn, repeats: int) -> float:
    """Median wall seconds of `repeats` calls, after one untimed call (lazy imports, caches)."""
    fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def fresh(argv: list[str], repeats: int) -> tuple[list[float], subprocess.CompletedProcess]:
    """Wall seconds of each run of a command (a fresh interpreter every time), and the last run."""
    times = []
    for _ in range(repeats):
        if sum(times) >= TOOL_BUDGET_S:
            break
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise RuntimeError(f"exit {proc.returncode}: {tail[:200]}")
    return times, proc


def repfuse_cli() -> list[str]:
    """The `repfuse` console script next to this interpreter (else python -m repfuse)."""
    script = Path(PY).parent / "repfuse"
    return [str(script)] if script.exists() else [PY, "-m", "repfuse"]


def ratio(a, b):
    return a / b if a is not None and b else None


def table(title: str, header: list[str], rows: list[list], left: int = 2) -> None:
    """A markdown table under a heading; columns after the first `left` are right-aligned."""
    print(f"\n### {title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * left + "---:|" * (len(header) - left))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


# ================================================================ 1. deploy

def deploy_row(label: str, model, x: torch.Tensor, repeats: int, convert=None) -> dict:
    import repfuse

    auto = {d: torch.export.Dim.AUTO for d in range(x.dim())}
    calls = {  # inputs are cloned: a failed dynamic capture leaves marks on the tensors it was given
        "deploy": lambda: repfuse.deploy(model, x),
        "export_static": lambda: torch.export.export(model, (x.clone(),)),
        "export_dynamic": lambda: torch.export.export(model, (x.clone(),), dynamic_shapes=(auto,)),
    }
    if convert is not None:
        calls["timm"] = lambda: convert(model)
    row = {"model": label, "input": list(x.shape), "errors": {}}
    for key, fn in calls.items():
        log(f"   {label}: {key} ...")
        try:
            with quiet():
                row[f"{key}_s"] = median_s(fn, repeats)
        except Exception as e:
            row[f"{key}_s"], row["errors"][key] = None, describe(e)
            log(traceback.format_exc())
    d = row["deploy_s"]
    if d is not None:
        with quiet():
            gm = repfuse.deploy(model, x)
        aten = any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)  # export's dialect
        row["capture"] = "torch.export" if aten else "symbolic_trace"
    for key in ("export_static", "export_dynamic", "timm"):
        row[f"deploy_over_{key}"] = ratio(d, row.get(f"{key}_s"))
    return row


def deploy_jobs(args):
    """(label, build function, input shape, conversion or None) for every zoo network and timm model."""
    for name in args.networks:
        net = ZOO[name]
        yield name, net.build, (BATCH, net.input_size[1], SIZE, SIZE), None
    if args.timm:
        from zoo.timm_corpus import CORPUS, build, timm_convert

        specs = {m.name: m for m in CORPUS}
        for name in args.timm:
            spec = specs.get(name)
            size, kwargs = (spec.size, dict(spec.kwargs)) if spec else (SIZE, {})
            make = lambda name=name, kwargs=kwargs: build(name, seed=SEED, **kwargs)  # noqa: E731
            yield f"timm {name}", make, (BATCH, 3, size, size), timm_convert


def section_deploy(args, work: Path, problems: list[str]) -> list[dict]:
    rows = []
    for label, make, shape, convert in deploy_jobs(args):
        log(f"== deploy: {label}")
        try:
            torch.manual_seed(SEED)
            model, x = make(), torch.randn(*shape)
        except Exception as e:
            log(traceback.format_exc())
            rows.append({"model": label, "errors": {"build": describe(e)}})
            continue
        rows.append(deploy_row(label, model, x, args.repeats, convert))
    problems += [f"deploy {r['model']}: {', '.join(r['errors'])}" for r in rows
                 if {"deploy", "build"} & set(r["errors"])]
    return rows


def print_deploy(rows: list[dict], args) -> None:
    keys = ["deploy_s", "export_static_s", "export_dynamic_s", "timm_s",
            "deploy_over_export_static", "deploy_over_export_dynamic", "deploy_over_timm"]
    table(f"deploy: seconds (median of {args.repeats} after a warm-up call)",
          ["model", "input", "capture", "deploy", "export static", "export dynamic", "timm convert",
           "deploy / static", "deploy / dynamic", "deploy / timm"],
          [[r["model"], "x".join(map(str, r.get("input", []))), r.get("capture", "-")] + [fmt(r.get(k), ".2f") for k in keys]
           for r in rows])
    for r in rows:
        for key, error in r["errors"].items():
            print(f"note: {r['model']} {key} failed: {error}")


# ================================================================ 2. onnx optimize

ONNXSIM_API = "import sys, onnx, onnxsim; m, ok = onnxsim.simplify(sys.argv[1]); onnx.save(m, sys.argv[2])"
ONNXSCRIPT = ("import sys, onnx, onnxscript.optimizer as o; m = onnx.load(sys.argv[1]); r = o.optimize(m); "
              "onnx.save(m if r is None else r, sys.argv[2])")
PEERS = ["onnxsim-cli", "onnxsim", "onnxslim", "onnxscript"]


def run_tool(tool: str, src: Path, dst: Path, repeats: int) -> dict:
    """One tool on one file in fresh processes: seconds, output node and Conv counts, or a note."""
    s, d = str(src), str(dst)
    module, argv = {"repfuse": ("repfuse", repfuse_cli() + ["optimize", s, "-o", d, "-q"]),
                    "onnxsim-cli": ("onnxsim", [PY, "-m", "onnxsim", s, d]),
                    "onnxsim": ("onnxsim", [PY, "-c", ONNXSIM_API, s, d]),
                    "onnxslim": ("onnxslim", [PY, "-m", "onnxslim", s, d]),
                    "onnxscript": ("onnxscript", [PY, "-c", ONNXSCRIPT, s, d])}[tool]
    row = {"tool": tool, "seconds": None, "note": None}
    if importlib.util.find_spec(module) is None:
        row["note"] = f"{module} is not installed"
        return row
    log(f"   {src.stem}: {tool} ...")
    try:
        times, _ = fresh(argv, repeats)
        row["seconds"], row["all_s"] = min(times), times
        row["nodes"], row["convs"], _ = op_counts(dst)
    except Exception as e:
        row["note"] = describe(e)
    return row


def section_onnx(args, work: Path, problems: list[str]) -> list[dict]:
    results = []
    for name in args.networks:
        log(f"== onnx: {name}")
        net, src = ZOO[name], work / f"{name}.onnx"
        try:
            torch.manual_seed(SEED)
            model, x = net.build(), torch.randn(BATCH, net.input_size[1], SIZE, SIZE)
            with quiet():
                torch.onnx.export(model, (x,), str(src), dynamo=False, opset_version=17, input_names=["x"],
                                  dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
        except Exception as e:
            problems.append(f"onnx {name}: export failed")
            results.append({"network": name, "error": describe(e)})
            continue
        tools = {t: run_tool(t, src, work / f"{name}.{t}.onnx", args.repeats) for t in ["repfuse"] + PEERS}
        if tools["repfuse"]["seconds"] is None:
            problems.append(f"onnx {name}: repfuse optimize failed")
        for tool in PEERS:
            tools[tool]["repfuse_over"] = ratio(tools["repfuse"]["seconds"], tools[tool]["seconds"])
        nodes, convs, _ = op_counts(src)
        results.append({"network": name, "input_nodes": nodes, "input_convs": convs, "tools": tools})
    return results


def print_onnx(results: list[dict], args) -> None:
    rows = []
    for res in results:
        if "error" in res:
            rows.append([res["network"], "export", "-", "-", "-", "-", "FAILED: " + res["error"]])
            continue
        rows.append([res["network"], "(input)", "-", res["input_nodes"], res["input_convs"], "-", ""])
        rows += [["", tool, fmt(r["seconds"], ".2f"), fmt(r.get("nodes"), "d"), fmt(r.get("convs"), "d"),
                  fmt(r.get("repfuse_over"), ".2f"), r["note"] or ""] for tool, r in res["tools"].items()]
    table(f"onnx optimize: fresh-process wall seconds (min of {args.repeats}), nodes and Convs out",
          ["network", "tool", "seconds", "nodes", "Conv", "repfuse / tool", "note"], rows)
    print("\nonnxsim-cli: `python -m onnxsim IN OUT` (with its model summary); onnxsim: simplify + save only")


# ================================================================ 3. growth

def section_growth(args, work: Path, problems: list[str]) -> dict:
    rows = []
    for target in [8] + args.sizes:  # 8 nodes (one block): each tool's start-up and import time
        path = work / f"chain{target}.onnx"
        onnx.save(synthetic_chain(target, seed=SEED), path)
        row = {"nodes": op_counts(path)[0]}
        log(f"== growth: {row['nodes']} nodes")
        for tool in ("repfuse", "onnxsim"):
            r = run_tool(tool, path, work / f"chain{target}.{tool}.onnx", args.repeats)
            row[f"{tool}_s"], row[f"{tool}_note"] = r["seconds"], r["note"]
        if row["repfuse_s"] is None:
            problems.append(f"growth {row['nodes']} nodes: repfuse optimize failed")
        rows.append(row)
    base, rows = rows[0], rows[1:]
    slopes = {}
    for tool in ("repfuse", "onnxsim"):
        good = [r for r in rows if r[f"{tool}_s"]]
        nodes, seconds = [r["nodes"] for r in good], [r[f"{tool}_s"] for r in good]
        slopes[tool] = loglog_slope(nodes, seconds)
        if base[f"{tool}_s"] is not None:
            slopes[f"{tool}_net"] = loglog_slope(nodes, [s - base[f"{tool}_s"] for s in seconds])
    return {"base": base, "rows": rows, "slopes": slopes}


def print_growth(result: dict, args) -> None:
    rows = []
    for r in [result["base"]] + result["rows"]:
        k = r["nodes"] / 1000
        notes = "; ".join(f"{t}: {r[f'{t}_note']}" for t in ("repfuse", "onnxsim") if r[f"{t}_note"])
        rows.append([r["nodes"], fmt(r["repfuse_s"], ".2f"), fmt(ratio(r["repfuse_s"], k), ".3f"),
                     fmt(r["onnxsim_s"], ".2f"), fmt(ratio(r["onnxsim_s"], k), ".3f"), notes])
    table(f"growth: synthetic RepVGG-style chains, fresh-process wall seconds (min of {args.repeats})",
          ["nodes", "repfuse optimize s", "s / 1000 nodes", "onnxsim s", "s / 1000 nodes", "note"], rows, left=0)
    s = result["slopes"]
    print(f"\ngrowth exponent (slope of log s on log nodes, 1.0 linear, up to {LINEAR_SLOPE} about linear; "
          f"net: less the {result['base']['nodes']}-node time): " + ", ".join(
              f"{t} {fmt(s[t], '.2f')}, net {fmt(s.get(t + '_net'), '.2f')} ({growth(s.get(t + '_net'))})"
              for t in ("repfuse", "onnxsim")))
    if args.quick:
        print("(quick sizes: start-up dominates and one run each; the exponents are not meaningful)")


# ================================================================ 4. import time

PROBE = "\nimport sys\nprint('MODULES', 'torch' in sys.modules, 'onnx' in sys.modules)"
CLI_HELP = "from repfuse.backends.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
STARTUP = ("site", "encodings", "__editable__")  # interpreter start-up, not the entry point's imports


def importtime(stderr: str, module: str) -> tuple[float | None, str | None]:
    """The module's cumulative seconds and the heaviest import outside repfuse, from -X importtime."""
    total, heaviest = None, (0.0, None)
    for line in stderr.splitlines():
        parts = line.split("|")  # import time: self [us] | cumulative | name (indented by depth)
        if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        cum, name = int(parts[1]) / 1e6, parts[2].strip()
        if name == module:
            total = cum
        elif not name.startswith(("repfuse",) + STARTUP) and cum > heaviest[0]:
            heaviest = (cum, f"{name} {cum:.2f} s")
    return total, heaviest[1]


def section_imports(args, work: Path, problems: list[str]) -> list[dict]:
    modules = ["repfuse", "repfuse.backends.onnx", "repfuse.backends.pytorch"]
    modules += ["repfuse.backends.tvm"] if importlib.util.find_spec("tvm") is not None else []
    entries = {f"import {m}": (m, f"import {m}") for m in modules}
    entries["repfuse --help (cli main, as the script runs it)"] = ("repfuse.backends.cli", CLI_HELP)
    rows = []
    for label, (module, code) in entries.items():
        log(f"== imports: {label}")
        row = {"entry": label}
        try:
            times, proc = fresh([PY, "-c", code + PROBE], args.repeats)
            flags = [ln.split()[1:] for ln in proc.stdout.splitlines() if ln.startswith("MODULES")][-1]
            row.update(wall_s=min(times), torch=flags[0] == "True", onnx=flags[1] == "True")
            _, proc = fresh([PY, "-X", "importtime", "-c", code], 1)
            row["import_s"], row["heaviest"] = importtime(proc.stderr, module)
        except Exception as e:
            row["error"] = describe(e)
            problems.append(f"imports: {label}")
        rows.append(row)
    return rows


def print_imports(rows: list[dict], args) -> None:
    yes = {True: "yes", False: "no", None: "-"}
    table(f"imports: fresh interpreter, wall seconds (min of {args.repeats}); import s: -X importtime",
          ["entry point", "wall s", "import s", "torch imported", "onnx imported", "heaviest other import"],
          [[r["entry"], fmt(r.get("wall_s"), ".2f"), fmt(r.get("import_s"), ".2f"), yes[r.get("torch")],
            yes[r.get("onnx")], r.get("heaviest") or r.get("error") or "-"] for r in rows], left=1)


# ================================================================ 5. compile

def compile_variants(train, hand, x) -> dict:
    """name -> a function giving (deploy seconds or 0, the compiled callable)."""
    import repfuse

    def fixed_backend(gm, example_inputs):
        out = gm(*example_inputs)  # computed once: the compiled function costs only dynamo's guards
        return lambda *args: out

    def recipe(**options):
        t0 = time.perf_counter()
        gm = repfuse.deploy(train, x)  # a new GraphModule class each time: c and c-frozen share no code
        return time.perf_counter() - t0, torch.compile(gm, options=options or None)

    # freezing as a compile option holds for every (re)compile of that variant, not only the first call
    return {"a repfuse backend": lambda: (0.0, torch.compile(train, backend="repfuse")),
            "b inductor on training": lambda: (0.0, torch.compile(train)),
            "c deploy + inductor": recipe,
            "d hand-fused + inductor": lambda: (0.0, torch.compile(hand)),
            "c-frozen": lambda: recipe(freezing=True),
            "d-frozen": lambda: (0.0, torch.compile(hand, options={"freezing": True})),
            "guards only": lambda: (0.0, torch.compile(train, backend=fixed_backend))}


def compile_network(name: str) -> dict:
    case = zoo_case(name, SEED, SIZE)
    train, hand = case.model, case.checked_reference()
    torch.manual_seed(SEED)
    x = torch.randn(BATCH, case.x.shape[1], SIZE, SIZE)
    ref = train(x)
    variants = compile_variants(train, hand, x)
    rows = {v: {"variant": v} for v in variants}
    for v, make in variants.items():  # compile time: each variant alone after a reset
        log(f"== compile {name}: {v} (cold) ...")
        torch._dynamo.reset()
        rows[v]["deploy_s"], fn = make()
        rows[v]["first_call_s"] = timed(lambda: fn(x))
    torch._dynamo.reset()  # the reset dropped the compiled code: compile all again, side by side
    calls = {}
    for v, make in variants.items():
        log(f"== compile {name}: {v} (again, for latency) ...")
        fn = make()[1]
        rows[v]["max_abs_err"] = None if v == "guards only" else max_abs_error(fn(x), ref)
        calls[v] = lambda fn=fn: fn(x)
    samples, rounds = interleaved(calls, warmup=3, budget_s=10.0, min_rounds=10, max_rounds=200)
    for v, s in samples.items():
        rows[v]["median_ms"] = statistics.median(s)
    med = {v: r["median_ms"] for v, r in rows.items()}
    floor = med["d hand-fused + inductor"] + med["guards only"]
    first = {v: r["first_call_s"] for v, r in rows.items()}
    return {"network": name, "input": list(x.shape), "rounds": rounds, "tolerance": case.tol,
            "rows": list(rows.values()), "floor_ms": floor,
            "compile_a_over_b": ratio(first["a repfuse backend"], first["b inductor on training"]),
            "a_over_floor": ratio(med["a repfuse backend"], floor),
            "c_over_d": ratio(med["c deploy + inductor"], med["d hand-fused + inductor"]),
            "c_over_d_frozen": ratio(med["c-frozen"], med["d-frozen"])}


def section_compile(args, work: Path, problems: list[str]) -> list[dict]:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-cache")  # no cache from earlier runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = []
    with quiet():
        # one-time costs (inductor's imports, the C++ toolchain probe) must not land on variant a
        tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
        for backend in ("repfuse", "inductor"):
            torch.compile(copy.deepcopy(tiny), backend=backend)(torch.randn(1, 3, 8, 8))
        for name in args.compile_networks:
            try:
                results.append(compile_network(name))
            except Exception as e:
                log(traceback.format_exc())
                problems.append(f"compile {name}")
                results.append({"network": name, "error": describe(e)})
    torch.set_num_threads(threads)
    return results


def print_compile(results: list[dict], args) -> None:
    for res in results:
        if "error" in res:
            print(f"\ncompile {res['network']}: FAILED: {res['error']}")
            continue
        table(f"compile {res['network']}: first-call s after torch._dynamo.reset(), latency median ms of "
              f"{res['rounds']} interleaved rounds (batch {BATCH}, {SIZE}x{SIZE}, 1 thread)",
              ["variant", "deploy s", "first call s", "median ms", "max abs err"],
              [[r["variant"], fmt(r["deploy_s"] or None, ".2f"), f"{r['first_call_s']:.2f}",
                f"{r['median_ms']:.3f}", fmt(r["max_abs_err"], ".1e")] for r in res["rows"]], left=1)
        print(f"\nfloor of a (d + guards only) {res['floor_ms']:.3f} ms; compile time a / b "
              f"{fmt(res['compile_a_over_b'], '.2f')}; latency a / floor {fmt(res['a_over_floor'], '.3f')}, "
              f"c / d {fmt(res['c_over_d'], '.3f')}, c-frozen / d-frozen {fmt(res['c_over_d_frozen'], '.3f')}; "
              f"error tolerance {res['tolerance']:.1e}")


# ================================================================ main

RUN = {"deploy": (section_deploy, print_deploy), "onnx": (section_onnx, print_onnx),
       "growth": (section_growth, print_growth), "imports": (section_imports, print_imports),
       "compile": (section_compile, print_compile)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    p.add_argument("--only", help=f"comma-separated sections out of {','.join(SECTIONS)} (default: all but compile)")
    p.add_argument("--networks", help="comma-separated zoo networks (default: all)")
    p.add_argument("--timm", help=f"comma-separated timm models, or none (default {','.join(TIMM_DEFAULT)})")
    p.add_argument("--sizes", help=f"growth sizes in nodes (default {','.join(map(str, SIZES_DEFAULT))})")
    p.add_argument("--repeats", type=int, help="timed repeats of each measurement (default 3)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile section (slow)")
    p.add_argument("--compile-networks", help=f"zoo networks for compile (default {','.join(COMPILE_DEFAULT)})")
    p.add_argument("--workdir", help="keep the ONNX files here (default: a temporary folder)")
    p.add_argument("--json", metavar="FILE", help="also write every raw number as JSON")
    args = p.parse_args()
    quick = QUICK if args.quick else {}
    split = lambda s: [] if s in ("", "none") else s.split(",")  # noqa: E731
    args.sections = split(args.only) if args.only else SECTIONS[:4] + ["compile"] * args.compile
    args.networks = split(args.networks) if args.networks is not None else quick.get("networks", list(ZOO))
    args.timm = split(args.timm) if args.timm is not None else quick.get("timm", TIMM_DEFAULT)
    args.sizes = [int(n) for n in split(args.sizes)] if args.sizes else quick.get("sizes", SIZES_DEFAULT)
    args.repeats = args.repeats or quick.get("repeats", 3)
    args.compile_networks = split(args.compile_networks) if args.compile_networks else COMPILE_DEFAULT
    bad = [s for s in args.sections if s not in SECTIONS]
    bad += [n for n in args.networks + args.compile_networks if n not in ZOO]
    if bad:
        p.error(f"unknown section(s) or network(s): {', '.join(bad)}")
    return args


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    try:  # timm needs a torchvision stand-in next to the CPU torch before it imports
        from zoo.timm_corpus import import_timm

        import_timm()
    except Exception as e:
        log(f"timm unavailable: {describe(e)}")
    tools = harness.versions("torch", "onnx", "onnxruntime", "onnxsim", "onnxslim", "onnxscript", "timm", "repfuse")
    print(f"# Conversion time ({'quick' if args.quick else 'full'} run: {', '.join(args.sections)})\n")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in tools.items()) + f"; {harness.machine()}")
    problems: list[str] = []
    out = {"versions": tools, "machine": harness.machine(), "repeats": args.repeats, "quick": args.quick}
    with harness.workdir(args.workdir, "conversion-") as work:
        for section in SECTIONS:  # in this order, whatever the order of --only
            if section in args.sections:
                measure, report = RUN[section]
                out[section] = measure(args, work, problems)
                report(out[section], args)
                sys.stdout.flush()
    out["wall_s"] = time.perf_counter() - started
    print(f"\ntotal benchmark wall time {out['wall_s']:.0f} s")
    if args.json:
        harness.write_json(args.json, out)
    return harness.exit_code(problems)


if __name__ == "__main__":
    sys.exit(main())
