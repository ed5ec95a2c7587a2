"""The papers' official repositories through every repfuse entry point.

    python benchmarks/official.py --repos DIR [--only NAME,...] [--clone] [--budget S] [--inner eager|inductor]

For each network below, the script imports the model file of the paper's own
repository from DIR/<repo> at run time (nothing of theirs is copied into
repfuse), builds a small training-form network with random weights and
randomized BatchNorm statistics (examples/zoo/common.py `randomize`), eval
mode, and converts a copy with the repository's own conversion
(`switch_to_deploy`, `reparameterize`, `repvgg_model_convert`, ...): the
official deploy form.  Then the training form goes through each entry point:

    deploy       repfuse.deploy(model, (x,))                        timed in torch eager
    compile      torch.compile(model, backend="repfuse",            timed against torch.compile(official,
                 options={"inner": INNER})                            backend=INNER)
    onnx-ts      torch.onnx.export(dynamo=False, opset 17) ->       timed in onnxruntime against the same
                 repfuse.backends.onnx.optimize                       export of the official form
    onnx-dynamo  torch.onnx.export(dynamo=True) -> the same         (same)
    tvm-export   torch.export -> relax from_exported_program ->     timed on the Relax VM (llvm, default
                 repfuse.backends.tvm.RepFuse()                       pipeline) against the official form
    tvm-onnx     onnx-ts export -> onnxsim -> relax from_onnx ->    (same, official form imported the same way)
                 RepFuse()

Per network and entry point the table gives conv and BatchNorm counts in that
IR (training form -> official deploy form -> repfuse), the max abs error of
repfuse's output against the torch training form on two random inputs,
relative to max |output| (in brackets: the official form's, through the same
IR), and the latency ratio repfuse / official (the median over interleaved
rounds of the ratio within a round, benchmarks/harness.py; as many rounds as
fit in --budget seconds, at least --rounds; 1 thread everywhere).  GhostNet
and GhostNetV2 ship no deploy conversion: their "official" form is the
training form itself.
Below the table, for every cell where repfuse keeps more convs or BatchNorms
than the official form or its error is above 1e-4, the reasons repfuse gives
(the declines that `explain=True` logs), grouped by rule and reason.

The table goes to stdout, progress to stderr.  One failing entry point is a
cell saying why; a missing repository is one line saying how to get it
(--clone runs `git clone --depth 1` for it).
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")  # read when tvm is first imported

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
from harness import TOLERANCE, describe, interleaved, log, per_round_ratios, stdout_to_stderr  # noqa: E402
from zoo.common import randomize  # noqa: E402

REPOS = {  # folder -> GitHub owner
    "RepVGG": "DingXiaoH",
    "DiverseBranchBlock": "DingXiaoH",
    "ACNet": "DingXiaoH",
    "ml-mobileone": "apple",
    "RepGhost": "ChengpengChen",
    "OREPA_CVPR2022": "JUGGHM",
    "Efficient-AI-Backbones": "huawei-noah",
}
ENTRY_POINTS = ["deploy", "compile", "onnx-ts", "onnx-dynamo", "tvm-export", "tvm-onnx"]


# ================================================================ importing the repositories


_LOADED: list[str] = []  # modules imported from the repositories so far


@contextlib.contextmanager
def repo_imports(*folders: Path):
    """Import with `folders` first on sys.path.  The modules they provide stay in sys.modules
    (torch.compile imports a model's modules by name) until the next network's imports, which
    forget them first: the repositories reuse names (convnet_utils, resnet, model, dbb_transforms)."""
    for name in _LOADED:
        sys.modules.pop(name, None)
    _LOADED.clear()
    paths = [str(f) for f in folders]
    sys.path[:0] = paths
    before = set(sys.modules)
    try:
        yield
    finally:
        for p in paths:
            sys.path.remove(p)
        for name in set(sys.modules) - before:
            spec = getattr(sys.modules[name], "__spec__", None)
            where = [getattr(spec, "origin", None) or ""]
            where += list(getattr(spec, "submodule_search_locations", None) or [])  # namespace packages
            if any(str(w).startswith(tuple(paths)) for w in where):
                _LOADED.append(name)


def load_file(path: Path, name: str):
    """Import one model file under a unique module name (its siblings come from sys.path)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def stand_in(name: str, **attrs):
    """A placeholder module for an import an old repository needs but this environment lacks
    (only while `name` cannot be imported for real)."""
    try:
        importlib.import_module(name)
        real = True
    except Exception:
        real = False
    if real:
        yield
        return
    added = []
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        saved = sys.modules.get(sub)
        module = types.ModuleType(sub)
        if i == len(parts):
            module.__dict__.update(attrs)
        sys.modules[sub] = module
        if i > 1:
            setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], module)
        added.append((sub, saved))
    log(f"   (stand-in module {name} for an import missing here)")
    try:
        yield
    finally:
        for sub, saved in added:
            if saved is None:
                sys.modules.pop(sub, None)
            else:
                sys.modules[sub] = saved


def call_each(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """The repositories' convert loop: `m.<method>()` for every module that has it, walking
    `model.modules()` lazily as their scripts do (a block that drops its children is not descended)."""
    for m in model.modules():
        if hasattr(m, method) and callable(getattr(m, method)):
            getattr(m, method)()
    return model


# ================================================================ the networks


@dataclass
class Network:
    name: str
    repo: str
    size: int  # input is 1x3xSIZExSIZE
    build: Callable[[Path], tuple]  # repo dir -> (training form, conversion of a copy or None)
    what: str = ""


def build_repvgg(root: Path):
    with repo_imports(root), stdout_to_stderr():
        m = load_file(root / "repvgg.py", "official_repvgg")
        return m.create_RepVGG_A0(deploy=False), lambda model: m.repvgg_model_convert(model, do_copy=True)


def build_dbb(root: Path):
    with repo_imports(root), stdout_to_stderr():
        utils = importlib.import_module("convnet_utils")
        utils.switch_conv_bn_impl("DBB")
        utils.switch_deploy_flag(False)
        model = importlib.import_module("resnet").create_Res18()
    return model, lambda model: call_each(copy.deepcopy(model), "switch_to_deploy")  # as convert.py


def build_acnet(root: Path):
    with repo_imports(root), stdout_to_stderr():
        acnet_builder = importlib.import_module("acnet.acnet_builder")
        resnet = importlib.import_module("base_model.resnet")
        ACBlock = importlib.import_module("acnet.acb").ACBlock
        # acnet_builder passes use_last_bn=, which this ACBlock does not take: drop it
        acnet_builder.ACBlock = lambda *a, use_last_bn=False, **k: ACBlock(*a, **k)
        builder = acnet_builder.ACNetBuilder(base_config=None, deploy=False)
        model = resnet.create_ResNet18(types.SimpleNamespace(deps=None), builder)

    def convert(model):
        model = copy.deepcopy(model)
        for m in model.modules():
            if isinstance(m, ACBlock):
                m.switch_to_deploy()
        return model

    return model, convert


def build_mobileone(root: Path):
    with repo_imports(root):
        m = load_file(root / "mobileone.py", "official_mobileone")
    return m.mobileone(variant="s0"), m.reparameterize_model


def build_repghost(root: Path):
    with repo_imports(root / "model"):
        m = load_file(root / "model" / "repghost.py", "official_repghost")
    return m.repghostnet_0_5x(), lambda model: m.repghost_model_convert(model, do_copy=True)


def build_orepa(root: Path):
    with repo_imports(root), stdout_to_stderr(), stand_in("imp"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        utils = importlib.import_module("convnet_utils")
        utils.switch_conv_bn_impl("OREPA")
        utils.switch_deploy_flag(False)
        model = load_file(root / "models" / "resnet.py", "official_orepa_resnet").create_Res18()
    return model, lambda model: call_each(copy.deepcopy(model), "switch_to_deploy")  # as convert.py


def build_ghostnet(root: Path):
    folder = root / "ghostnet_pytorch"
    with repo_imports(folder):
        m = load_file(folder / "ghostnet.py", "official_ghostnet")
    return m.ghostnet(width=1.0), None


def _register_model(fn):
    return fn


def build_ghostnetv2(root: Path):
    folder = root / "ghostnetv2_pytorch" / "model"
    with repo_imports(folder), stand_in("timm.models.registry", register_model=_register_model):
        m = load_file(folder / "ghostnetv2_torch.py", "official_ghostnetv2")
    return m.ghostnetv2(num_classes=1000, width=1.0, dropout=0.2, args=None), None


def build_ghostnetv3(root: Path):
    folder = root / "ghostnetv3_pytorch"
    with repo_imports(folder), stand_in("timm.models.registry", register_model=_register_model):
        m = load_file(folder / "ghostnetv3.py", "official_ghostnetv3")

    def convert(model):
        model = copy.deepcopy(model)
        model.reparameterize()
        return model

    return m.ghostnetv3(width=1.0), convert


NETWORKS = [
    Network("repvgg-a0", "RepVGG", 64, build_repvgg, "repvgg.py create_RepVGG_A0; repvgg_model_convert"),
    Network("dbb-resnet18", "DiverseBranchBlock", 64, build_dbb,
            "convnet_utils (DBB) + resnet.create_Res18; switch_to_deploy"),
    Network("acnet-resnet18", "ACNet", 224, build_acnet,
            "ACNetBuilder + base_model/resnet.create_ResNet18 (its GAP is AvgPool 7: 224 input); "
            "ACBlock.switch_to_deploy"),
    Network("mobileone-s0", "ml-mobileone", 64, build_mobileone, "mobileone(variant='s0'); reparameterize_model"),
    Network("repghostnet-0.5x", "RepGhost", 64, build_repghost, "repghostnet_0_5x; repghost_model_convert"),
    Network("orepa-resnet18", "OREPA_CVPR2022", 64, build_orepa,
            "convnet_utils (OREPA) + models/resnet.create_Res18; switch_to_deploy"),
    Network("ghostnet-1.0x", "Efficient-AI-Backbones", 64, build_ghostnet, "ghostnet_pytorch: no conversion"),
    Network("ghostnetv2-1.0x", "Efficient-AI-Backbones", 64, build_ghostnetv2, "ghostnetv2_torch: no conversion"),
    Network("ghostnetv3-1.0x", "Efficient-AI-Backbones", 64, build_ghostnetv3, "ghostnetv3; reparameterize"),
]


# ================================================================ counting convs and BatchNorms


def _name(target) -> str:
    return getattr(target, "__name__", None) or str(target)


def fx_counts(gm) -> tuple[int, int]:
    """(convs, BatchNorms) called in an FX graph (aten, torch functions or modules)."""
    convs = bns = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, torch.fx.GraphModule):
                c, b = fx_counts(mod)
                convs, bns = convs + c, bns + b
                continue
            convs += isinstance(mod, torch.nn.modules.conv._ConvNd)
            bns += isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)
        elif node.op in ("call_function", "call_method"):
            name = _name(node.target)
            convs += name.split(".")[0] in ("conv1d", "conv2d", "conv3d", "convolution", "_convolution")
            bns += "batch_norm" in name
    return convs, bns


def onnx_counts(proto) -> tuple[int, int]:
    ops = Counter(n.op_type for n in proto.graph.node)
    return ops["Conv"], ops["BatchNormalization"]


def relax_counts(mod) -> tuple[int, int]:
    import tvm
    from tvm import relax

    ops = Counter()

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            ops[expr.op.name] += 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return ops["relax.nn.conv2d"] + ops["relax.nn.conv1d"], ops["relax.nn.batch_norm"]


# ================================================================ one network through every entry point


@dataclass
class Row:
    entry: str
    counts: dict = field(default_factory=dict)  # "train" / "official" / "repfuse" -> (convs, BNs)
    err: float | None = None  # repfuse vs torch training form, relative
    official_err: float | None = None
    ratio: float | None = None  # repfuse / official latency
    error: str | None = None  # the entry point failed
    stage: str = ""  # the step running (named in a failure)
    note: str = ""
    declines: list = field(default_factory=list)  # patterns.plan.Decline

    def above_official(self) -> list[str]:
        o, r = self.counts.get("official"), self.counts.get("repfuse")
        if o is None or r is None:
            return []
        return [what for i, what in enumerate(("convs", "BNs")) if r[i] > o[i]]


@dataclass
class Case:
    net: Network
    model: torch.nn.Module
    official: torch.nn.Module
    xs: list  # random inputs; xs[0] is the example and timing input
    refs: list  # the training form's outputs (float64)
    scale: float  # max |output|
    rounds: int
    budget: float
    inner: str
    fx: dict = field(default_factory=dict)  # "train" / "official" -> FX counts of a static torch.export

    def rel_err(self, outputs) -> float:
        return max(float(np.abs(np.asarray(o, dtype=np.float64) - r).max()) for o, r in zip(outputs, self.refs)) \
            / self.scale

    def time(self, repfuse_call, official_call) -> float:
        samples, _ = interleaved({"repfuse": repfuse_call, "official": official_call}, warmup=3, rounds=None,
                                 budget_s=self.budget, min_rounds=self.rounds, max_rounds=1000)
        return float(np.median(per_round_ratios(samples["repfuse"], samples["official"])))


def numpy_of(out):
    """The first output as numpy (torch tensor, TVM tensor, or a tuple / TVM array of them)."""
    if isinstance(out, torch.Tensor):
        return out.detach().numpy()
    return out.numpy() if hasattr(out, "numpy") else numpy_of(out[0])


def run_deploy(case: Case, row: Row) -> None:
    import repfuse

    # a clone: a capture that fails leaves torch's dynamic-dim marks on the example tensor
    x = case.xs[0].clone()
    row.stage = "repfuse.deploy"
    try:
        gm = repfuse.deploy(case.model, (x,))
    except repfuse.TraceError as e:
        row.note = f"default capture failed ({short(describe(e))}); counted with dynamic_shapes=(None,)"
        gm = repfuse.deploy(case.model, (case.xs[0].clone(),), dynamic_shapes=(None,))
    report = gm.meta["repfuse_report"]
    row.declines = list(report.declined)
    row.counts = {**case.fx, "repfuse": fx_counts(gm)}
    row.stage = "run"
    with torch.no_grad():
        row.err = case.rel_err([numpy_of(gm(xi)) for xi in case.xs])
        row.official_err = case.rel_err([numpy_of(case.official(xi)) for xi in case.xs])
        x = case.xs[0]
        row.ratio = case.time(lambda: gm(x), lambda: case.official(x))


def run_compile(case: Case, row: Row) -> None:
    from repfuse.backends.pytorch import compiled_graphs

    row.stage = "torch.compile"
    torch._dynamo.reset()
    known = {id(g) for g in compiled_graphs()}
    compiled = torch.compile(case.model, backend="repfuse", options={"inner": case.inner})
    official = torch.compile(case.official, backend=case.inner)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = [numpy_of(compiled(x)) for x in case.xs]
        official_outs = [numpy_of(official(x)) for x in case.xs]
        graphs = [g for g in compiled_graphs() if id(g) not in known]
        row.err, row.official_err = case.rel_err(outs), case.rel_err(official_outs)
        x = case.xs[0]
        row.ratio = case.time(lambda: compiled(x), lambda: official(x))
    fused = [g for g in graphs if g.changed]
    if not fused:
        row.note = "no graph fused (every graph passed through)"
        return
    for g in fused:
        row.declines += list(g.report.declined)
    train = tuple(map(sum, zip(*(fx_counts(g.original) for g in fused))))
    row.counts = {"train": train, "repfuse": tuple(map(sum, zip(*(fx_counts(g.graph_module) for g in fused))))}
    if "official" in case.fx:
        row.counts["official"] = case.fx["official"]
    whole = case.fx.get("train")
    if whole is not None and train != whole:
        row.note = f"fused graphs hold {train} of the model's {whole} (graph breaks)"
    if any(g._use_fallback for g in fused):
        row.note += " unfused fallback ran"
    if any(g.recomputes for g in fused):
        row.note += " fused weights recomputed between calls"


def export_onnx(model, x, dynamo: bool):
    import onnx

    with warnings.catch_warnings(), stdout_to_stderr(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(model, (x,), dynamo=True, input_names=["input"],
                                     output_names=["output"], verbose=False).model_proto
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "export.onnx"
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["output"])
            return onnx.load(str(path))


def ort_session(proto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_onnx(case: Case, row: Row, dynamo: bool) -> None:
    from repfuse.backends import onnx as ronnx

    row.stage = "export"
    train = export_onnx(case.model, case.xs[0], dynamo)
    official = export_onnx(case.official, case.xs[0], dynamo)
    row.stage = "repfuse"
    with stdout_to_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, report = ronnx.optimize(train)
    fused = ronnx.to_proto(model)
    row.declines = list(report.declined)
    row.counts = {"train": onnx_counts(train), "official": onnx_counts(official), "repfuse": onnx_counts(fused)}
    row.stage = "onnxruntime"
    sessions = {"repfuse": ort_session(fused), "official": ort_session(official)}
    name = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    row.err = case.rel_err([sessions["repfuse"].run(None, {name["repfuse"]: x.numpy()})[0] for x in case.xs])
    row.official_err = case.rel_err([sessions["official"].run(None, {name["official"]: x.numpy()})[0]
                                     for x in case.xs])
    feed = case.xs[0].numpy()
    row.ratio = case.time(lambda: sessions["repfuse"].run(None, {name["repfuse"]: feed}),
                          lambda: sessions["official"].run(None, {name["official"]: feed}))


def relax_from_torch(model, x, row: Row):
    from tvm.relax.frontend.torch import from_exported_program

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=False)


def relax_from_onnx(model, x, row: Row):
    import onnxsim
    from tvm.relax.frontend.onnx import from_onnx

    try:
        proto = export_onnx(model, x, dynamo=False)
    except Exception as e:
        row.note = f"dynamo export (TorchScript export failed: {short(describe(e))})"
        proto = export_onnx(model, x, dynamo=True)
    with stdout_to_stderr():
        simplified, ok = onnxsim.simplify(proto)
    if not ok:
        raise RuntimeError("onnxsim could not validate its result")
    return from_onnx(simplified, shape_dict={"input": list(x.shape)}, keep_params_in_input=False)


def relax_main(mod):
    import tvm
    from tvm import relax

    with stdout_to_stderr():
        executable = tvm.compile(mod, target="llvm", relax_pipeline="default")
    return relax.VirtualMachine(executable, tvm.cpu())["main"]


def run_tvm(case: Case, row: Row, importer) -> None:
    import tvm

    from repfuse.backends.tvm import RepFuse

    row.stage = "import"
    train, official = importer(case.model, case.xs[0], row), importer(case.official, case.xs[0], row)
    row.stage = "RepFuse"
    repfuse_pass = RepFuse()
    fused = repfuse_pass(train)
    row.declines = list(repfuse_pass.last_declines)
    row.counts = {"train": relax_counts(train), "official": relax_counts(official), "repfuse": relax_counts(fused)}
    row.stage = "tvm.compile and run"
    mains = {"repfuse": relax_main(fused), "official": relax_main(official)}
    inputs = [tvm.runtime.tensor(x.numpy()) for x in case.xs]
    row.err = case.rel_err([numpy_of(mains["repfuse"](t)) for t in inputs])
    row.official_err = case.rel_err([numpy_of(mains["official"](t)) for t in inputs])
    row.ratio = case.time(lambda: mains["repfuse"](inputs[0]), lambda: mains["official"](inputs[0]))


RUNNERS = {
    "deploy": run_deploy,
    "compile": run_compile,
    "onnx-ts": lambda case, row: run_onnx(case, row, dynamo=False),
    "onnx-dynamo": lambda case, row: run_onnx(case, row, dynamo=True),
    "tvm-export": lambda case, row: run_tvm(case, row, relax_from_torch),
    "tvm-onnx": lambda case, row: run_tvm(case, row, relax_from_onnx),
}


def build_case(net: Network, root: Path, args) -> tuple[Case | None, str]:
    """The training form, its official deploy form and the inputs; (None, reason) if that failed."""
    torch.manual_seed(args.seed)
    try:
        model, convert = net.build(root)
    except Exception as e:
        log(traceback.format_exc())
        return None, "build failed: " + describe(e)
    model = randomize(model, seed=args.seed).eval()
    g = torch.Generator().manual_seed(args.seed)
    xs = [torch.randn(1, 3, net.size, net.size, generator=g) for _ in range(2)]
    with torch.no_grad():
        refs = [numpy_of(model(x)).astype(np.float64) for x in xs]
        try:
            with stdout_to_stderr():
                official = (convert(model) if convert else model).eval()
        except Exception as e:
            log(traceback.format_exc())
            return None, "official conversion failed: " + describe(e)
    scale = max(float(np.abs(r).max()) for r in refs)
    case = Case(net, model, official, xs, refs, scale, args.rounds, args.budget, args.inner)
    for form, module in (("train", model), ("official", official)):
        try:  # before any entry point: a failed Dim.AUTO capture leaves marks on inputs (see run_deploy)
            case.fx[form] = fx_counts(torch.export.export(module, (xs[0],)).graph_module)
        except Exception as e:
            log(f"   torch.export of the {form} form failed: {describe(e)}")
    with torch.no_grad():
        err = case.rel_err([numpy_of(official(x)) for x in xs])
    if convert is None:
        official_note = "no deploy conversion in the repository: 'official' is the training form"
    else:
        official_note = f"official deploy form vs training form in torch: {err:.1e}"
        if err > TOLERANCE:
            official_note += " (ABOVE the tolerance)"
    return case, official_note


# ================================================================ the report


def short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def fmt_counts(row: Row, i: int) -> str:
    c = row.counts
    if not c:
        return "-"
    cell = " → ".join(str(c[k][i]) if k in c else "?" for k in ("train", "official", "repfuse"))
    return f"**{cell}** ▲" if ("convs", "BNs")[i] in row.above_official() else cell


def fmt_err(row: Row) -> str:
    if row.err is None:
        return "-"
    cell = f"{row.err:.1e} ({row.official_err:.1e})" if row.official_err is not None else f"{row.err:.1e}"
    return cell + (" MISMATCH" if not row.err <= TOLERANCE else "")


def table(results: list[tuple[Network, str, list[Row]]]) -> str:
    lines = ["| network | entry point | convs: train → official → repfuse | BNs: train → official → repfuse "
             "| rel. error repfuse (official) | latency repfuse / official | note |",
             "| --- | --- | --- | --- | --- | ---: | --- |"]
    for net, _, rows in results:
        for row in rows:
            if row.error is not None:
                lines.append(f"| {net.name} | {row.entry} | - | - | - | - | FAILED: {short(row.error, 160)} |")
                continue
            ratio = "-" if row.ratio is None else f"{row.ratio:.3f}"
            lines.append(f"| {net.name} | {row.entry} | {fmt_counts(row, 0)} | {fmt_counts(row, 1)} | {fmt_err(row)} "
                         f"| {ratio} | {row.note} |")
    return "\n".join(lines)


def reasons(results) -> str:
    """The declines behind every cell where repfuse is above the official form or not exact."""
    out = []
    for net, _, rows in results:
        for row in rows:
            above = row.above_official()
            bad = row.err is not None and not row.err <= TOLERANCE
            if not (above or bad):
                continue
            what = ", ".join(above + (["error above tolerance"] if bad else []))
            out.append(f"- {net.name} / {row.entry} ({what}):")
            groups = Counter((d.rule, d.reason) for d in row.declines)
            for (rule, reason), n in groups.most_common(8):
                out.append(f"  - {rule}: {reason} ({n}x)")
            if not groups:
                out.append("  - (repfuse reports no decline)")
    return "\n".join(out)


# ================================================================ main


def find_repos(folder: Path, names: set[str], clone: bool) -> dict[str, Path | None]:
    found = {}
    for name in sorted(names):
        path = folder / name
        if not path.is_dir() and clone:
            url = f"https://github.com/{REPOS[name]}/{name}"
            log(f"cloning {url} ...")
            folder.mkdir(parents=True, exist_ok=True)
            try:
                subprocess.run(["git", "clone", "--depth", "1", url, str(path)], check=False)
            except OSError as e:
                log(f"git clone failed: {describe(e)}")
        if path.is_dir():
            found[name] = path
        else:
            found[name] = None
            log(f"missing {path}: get it with `git clone --depth 1 https://github.com/{REPOS[name]}/{name} {path}` "
                f"(or rerun with --clone); its rows are skipped")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog="networks: " + ", ".join(n.name for n in NETWORKS)
        + ". Repositories: " + ", ".join(f"{o}/{r}" for r, o in REPOS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repos", required=True, type=Path,
                        help="folder holding the official repositories, one subfolder each, named as the repo")
    parser.add_argument("--only", default="", help="comma-separated network names (default: all)")
    parser.add_argument("--entry", default="", help=f"comma-separated entry points (default: {','.join(ENTRY_POINTS)})")
    parser.add_argument("--clone", action="store_true", help="git clone --depth 1 the missing repositories first")
    parser.add_argument("--budget", type=float, default=4.0,
                        help="seconds of timing rounds per entry point (default 4)")
    parser.add_argument("--rounds", type=int, default=10, help="at least this many timing rounds (default 10)")
    parser.add_argument("--inner", default="eager", choices=["eager", "inductor"],
                        help="inner compiler of the compile entry point, also used for the official form "
                             "(default eager: inductor compiles take minutes on small machines)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--explain", action="store_true", help="log every decline of every entry point to stderr")
    args = parser.parse_args()

    known = {n.name: n for n in NETWORKS}
    only = [s for s in args.only.split(",") if s]
    unknown = [s for s in only if s not in known]
    entries = [s for s in args.entry.split(",") if s] or ENTRY_POINTS
    if unknown or set(entries) - set(ENTRY_POINTS):
        parser.error(f"unknown network or entry point: {', '.join(unknown + sorted(set(entries) - set(ENTRY_POINTS)))}")
    nets = [known[s] for s in only] if only else NETWORKS
    repos = find_repos(args.repos.resolve(), {n.repo for n in nets}, args.clone)
    torch.set_num_threads(1)

    results = []
    for net in nets:
        if repos[net.repo] is None:
            results.append((net, f"skipped: {net.repo} is missing", []))
            continue
        log(f"== {net.name} ({net.repo}: {net.what})")
        case, note = build_case(net, repos[net.repo], args)
        if case is None:
            log(f"   {note}")
            results.append((net, note, []))
            continue
        log(f"   {note}")
        rows = []
        for entry in entries:
            log(f"   {entry} ...")
            row = Row(entry)
            try:
                RUNNERS[entry](case, row)
            except Exception as e:
                log(traceback.format_exc())
                row.error = f"{row.stage}: {describe(e)}" if row.stage else describe(e)
            if args.explain and row.declines:
                log("\n".join(f"     {d.rule}: {d.reason}: {d.node}" for d in row.declines))
            log(f"     counts {row.counts} err {row.err} ratio {row.ratio} {row.error or ''}")
            rows.append(row)
        results.append((net, note, rows))

    print(table(results))
    print()
    for net, note, _ in results:
        print(f"- {net.name} ({net.repo}): {note}")
    details = reasons(results)
    if details:
        print("\nWhere repfuse keeps more than the official form, or differs (rule: reason (count)):\n")
        print(details)
    return 0 if any(rows for _, _, rows in results) else 1


if __name__ == "__main__":
    sys.exit(main())
