"""The rules and the driver with no IR at all: a graph as a dict of descriptions.

Each graph is also evaluated op by op with torch (the unfused reference); a plan's
replacement terms are evaluated the same way and must agree, and the plan's structure
(which values, which reasons, which rule) is asserted directly.
"""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repfuse.patterns import affine as affine
from repfuse.patterns import plan as P
from repfuse.patterns import rules as R
from repfuse.patterns.affine import Declined
from repfuse.patterns.planner import Affine, Concat, Layout, Pointwise, Scaled, Sum


class FakeView:
    """GraphView over {value: description} (topological order); an Exception entry is a reader's decline."""

    def __init__(self, nodes: dict, layouts: dict, outputs=(), constants=()):
        self.nodes, self.layouts, self.outputs, self.constants = nodes, layouts, set(outputs), set(constants)

    def values(self):
        return list(self.nodes)

    def describe(self, v):
        d = self.nodes.get(v)
        if isinstance(d, Exception):
            raise d
        return d

    def readers(self, v):
        if v in self.outputs:
            return None
        return [u for u, d in self.nodes.items() if v in _inputs(d)]

    def single_consumer(self, v):
        readers = self.readers(v)
        return readers is not None and len(readers) == 1

    def layout(self, v):
        return self.layouts.get(v)

    def foldable(self, v):
        return v in self.constants

    label = kind = staticmethod(str)


def _inputs(d) -> tuple:
    if isinstance(d, (Affine, Scaled, Pointwise)):
        return (d.input,) + ((d.scale,) if isinstance(d, Scaled) else ())
    return tuple(getattr(d, "inputs", ()))


def apply_op(op: affine.AffineConv, x: torch.Tensor) -> torch.Tensor:
    """One AffineConv with torch: zero pad, then conv (float64)."""
    flat = [p for pair in reversed(op.pads) for p in pair]
    return F.conv2d(F.pad(x, flat), torch.from_numpy(op.weight), torch.from_numpy(op.bias), op.stride, 0,
                    op.dilation, op.groups)


def evaluate(view: FakeView, inputs: dict) -> dict:
    """Every value of the fake graph, op by op (the unfused reference)."""
    env = dict(inputs)
    for v, d in view.nodes.items():
        if isinstance(d, Affine):
            env[v] = apply_op(d.op, env[d.input])
        elif isinstance(d, Sum):
            env[v] = sum(w * env[u] for u, w in zip(d.inputs, d.weights))
        elif isinstance(d, Concat):
            env[v] = torch.cat([env[u] for u in d.inputs], 1)
        elif isinstance(d, Scaled):
            env[v] = env[d.input] * env[d.scale]
        elif isinstance(d, Pointwise):
            env[v] = torch.relu(env[d.input])
    return env


def evaluate_term(term, env: dict) -> torch.Tensor:
    if isinstance(term, P.Apply):
        return apply_op(term.op, evaluate_term(term.input, env))
    if isinstance(term, P.Relu):
        return torch.relu(evaluate_term(term.input, env))
    if isinstance(term, P.BatchedConv):
        x = evaluate_term(term.input, env)
        pi = torch.cat([env[s].reshape(-1, 1) for s in term.scales], 1).numpy()  # [N, K]
        outs = []
        for n in range(x.shape[0]):
            w = np.tensordot(pi[n], term.weights, 1) + term.static.weight  # [O, I/g, *k]
            b = pi[n] @ term.biases + term.static.bias  # [O]
            op = affine.AffineConv(w, b, term.static.stride, term.static.pads, term.static.dilation, term.static.groups)
            outs.append(apply_op(op, x[n:n + 1]))
        return torch.cat(outs)
    return env[term]


def conv(rng, cin, cout, k=3, pad=1, groups=1, bias=True):
    return affine.conv(rng.standard_normal((cout, cin // groups, k, k)), rng.standard_normal(cout) if bias else None,
                       1, pad, 1, groups)


def bn(rng, c):
    return affine.batchnorm(rng.standard_normal(c), rng.uniform(0.5, 2, c), rng.standard_normal(c),
                            rng.standard_normal(c), 1e-5, 2)


def close(a, b):
    assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-9 * max(1.0, b.abs().max().item())


X = torch.randn(2, 4, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_repvgg_branches_fuse_to_one_conv():
    rng = np.random.default_rng(0)
    nodes = {"c3": Affine("x", conv(rng, 4, 4)), "b3": Affine("c3", bn(rng, 4)),
             "c1": Affine("x", conv(rng, 4, 4, 1, 0)), "b1": Affine("c1", bn(rng, 4)), "bi": Affine("x", bn(rng, 4)),
             "s": Sum(("b3", "b1"), (1.0, 1.0)), "y": Sum(("s", "bi"), (1.0, 1.0))}
    view = FakeView(nodes, {"x": Layout(4, 2)}, outputs=["y"])
    plan = planner_rule(view)
    [edit] = plan.edits
    assert edit.value == "y" and edit.term.input == "x" and set(edit.erase) == set(nodes)
    assert edit.term.op.kernel == (3, 3) and P.lower(edit.term.op)[0][0] == "conv"
    close(evaluate_term(edit.term, {"x": X}), evaluate(view, {"x": X})["y"])


def planner_rule(view):
    return R.RULES[R.NAMES.index("affine")].plan(view)


def test_padded_conv_after_biased_1x1_is_declined_with_reason():
    rng = np.random.default_rng(1)
    view = FakeView({"a": Affine("x", conv(rng, 4, 4, 1, 0)), "y": Affine("a", conv(rng, 4, 4, 3, 1))},
                    {"x": Layout(4, 2)}, outputs=["y"])
    plan = planner_rule(view)
    assert plan.edits == [] and "bias" in plan.declines["y"]


def test_dense_1x1_plus_depthwise_3x3_costs_more_and_is_declined():
    rng = np.random.default_rng(2)
    view = FakeView({"d": Affine("x", conv(rng, 4, 4, 1, 0)), "w": Affine("x", conv(rng, 4, 4, 3, 1, groups=4)),
                     "y": Sum(("d", "w"), (1.0, 1.0))}, {"x": Layout(4, 2)}, outputs=["y"])
    plan = planner_rule(view)
    assert plan.edits == [] and "MACs" in plan.declines["y"]


def test_a_value_read_twice_bounds_the_region():
    rng = np.random.default_rng(3)
    nodes = {"c": Affine("x", conv(rng, 4, 4)), "b": Affine("c", bn(rng, 4)), "d": Affine("c", conv(rng, 4, 4, 1, 0)),
             "y": Sum(("b", "d"), (1.0, 1.0))}
    view = FakeView(nodes, {"x": Layout(4, 2), "c": Layout(4, 2)}, outputs=["y"])
    [edit] = planner_rule(view).edits
    assert edit.term.input == "c" and "c" not in edit.erase  # c has two readers: it stays, b + d fuse over it
    close(evaluate_term(edit.term, evaluate(view, {"x": X})), evaluate(view, {"x": X})["y"])


@pytest.mark.parametrize("chain, fuses", [(("mul", "mul"), True), (("mul", "add"), False)])
def test_per_channel_chain_is_rewritten_only_when_it_saves_a_pass(chain, fuses):
    c = 4
    ops = {"mul": affine.per_channel(np.arange(1.0, c + 1), np.zeros(c), 2),
           "add": affine.per_channel(np.ones(c), np.arange(c) + 0.5, 2)}
    view = FakeView({"a": Affine("x", ops[chain[0]]), "y": Affine("a", ops[chain[1]])}, {"x": Layout(c, 2)},
                    outputs=["y"])
    edits = planner_rule(view).edits
    assert bool(edits) == fuses
    if fuses:
        assert P.lower(edits[0].term.op)[0][0] == "scale_shift"  # never a new conv
        close(evaluate_term(edits[0].term, {"x": X}), evaluate(view, {"x": X})["y"])


def test_reader_decline_is_kept_with_its_reason():
    view = FakeView({"y": Declined("reflect padding")}, {"x": Layout(4, 2)}, outputs=["y"])
    assert planner_rule(view).declines == {"y": "reflect padding"}


def test_dynamic_conv_becomes_one_batched_conv():
    rng = np.random.default_rng(4)
    nodes = {"c0": Affine("x", conv(rng, 4, 4)), "s0": Scaled("c0", "p0"),
             "c1": Affine("x", conv(rng, 4, 4, 1, 0)), "s1": Scaled("c1", "p1"),
             "y": Sum(("s0", "s1"), (1.0, 1.0)), "z": Affine("y", bn(rng, 4))}
    view = FakeView(nodes, {"x": Layout(4, 2)}, outputs=["z"])
    [edit] = R.RULES[R.NAMES.index("dynamic_conv")].plan(view).edits
    assert isinstance(edit.term, P.BatchedConv) and edit.value == "z" and edit.term.scales == ("p0", "p1")
    env = {"x": X, "p0": torch.rand(2, 1, 1, 1, dtype=torch.float64), "p1": torch.rand(2, 1, 1, 1, dtype=torch.float64)}
    close(evaluate_term(edit.term, env), evaluate(view, env)["z"])


def test_dead_channel_leaves_producer_and_reader():
    rng = np.random.default_rng(5)
    producer = conv(rng, 4, 4, 1, 0)
    producer.weight[2] = 0  # channel 2 is the constant b[2]
    reader = conv(rng, 4, 3, 1, 0)
    view = FakeView({"a": Affine("x", producer), "y": Affine("a", reader)}, {"x": Layout(4, 2), "a": Layout(4, 2),
                                                                             "y": Layout(3, 2)}, outputs=["y"])
    plan = R.RULES[R.NAMES.index("dead_channels")].plan(view)
    replaced = {e.value: e for e in plan.edits if isinstance(e, P.Replace)}
    assert plan.count == 1 and plan.all_or_nothing and replaced["a"].term.op.out_channels == 3
    assert [(e.value, e.channels) for e in plan.edits if isinstance(e, P.Resize)] == [("a", 3)]
    env = {"x": X}
    env["a"] = evaluate_term(replaced["a"].term, env)
    close(evaluate_term(replaced["y"].term, env), evaluate(view, {"x": X})["y"])


def test_ghost_concat_plan_rewrites_the_concat_and_its_reader():
    rng = np.random.default_rng(6)
    nodes = {"y": Pointwise("x", None), "d": Affine("y", conv(rng, 4, 4, 3, 1, groups=4)),
             "c": Concat(("y", "d")), "z": Affine("c", conv(rng, 8, 5, 1, 0))}
    view = FakeView(nodes, {"x": Layout(4, 2), "y": Layout(4, 2), "c": Layout(8, 2)}, outputs=["z"])
    plan = R.RULES[R.NAMES.index("ghost_concat")].plan(view)
    assert [e.value for e in plan.edits] == ["c", "z"] and plan.all_or_nothing
    env = evaluate(view, {"x": X})
    env["c"] = evaluate_term(plan.edits[0].term, env)  # interleaved channels
    close(evaluate_term(plan.edits[1].term, env), evaluate(view, {"x": X})["z"])


def test_constant_folding_folds_the_outermost_constant():
    view = FakeView({"w": None, "wt": None, "y": None}, {}, outputs=["y"], constants=["w", "wt"])
    view.nodes = {"w": Affine("p", None), "wt": Affine("w", None), "y": Affine("wt", None)}
    edits = R.fold_constants(view).edits
    assert [(e.value, type(e.term)) for e in edits] == [("wt", P.Constant)]


class RecordingAdapter:
    """An Adapter that writes nothing but the edits it was given (and can refuse some)."""

    def __init__(self, view, refuse=None):
        self._view, self.refuse, self.written = view, refuse, []

    def view(self):
        return self._view

    def cannot_write(self, view, edit):
        return self.refuse(edit) if self.refuse else None

    def write(self, view, rule, edits):
        self.written.append((rule, [e.value for e in edits]))
        self._view = FakeView({}, {})  # the graph is now fused: nothing more to do


def test_driver_names_the_rule_of_every_decline_and_of_every_write():
    rng = np.random.default_rng(7)
    view = FakeView({"a": Affine("x", conv(rng, 4, 4, 1, 0)), "y": Affine("a", conv(rng, 4, 4, 3, 1)),
                     "z": Declined("circular padding")}, {"x": Layout(4, 2)}, outputs=["y", "z"])
    run = R.run(RecordingAdapter(view), R.enabled())
    reasons = {(d.rule, d.node): d.reason for d in run.declines.values()}
    assert reasons[("affine", "z")] == "circular padding" and "bias" in reasons[("affine", "y")]
    assert not any(rule == "dynamic_conv" for rule, _ in reasons)  # a reader's decline belongs to the rule reading
    assert not run.modified


def test_driver_records_writer_refusals_and_keeps_all_or_nothing_plans_whole():
    rng = np.random.default_rng(8)
    producer = conv(rng, 4, 4, 1, 0)
    producer.weight[1] = 0
    view = FakeView({"a": Affine("x", producer), "y": Affine("a", conv(rng, 4, 3, 1, 0))},
                    {"x": Layout(4, 2), "a": Layout(4, 2), "y": Layout(3, 2)}, outputs=["y"])
    adapter = RecordingAdapter(view, refuse=lambda e: "not here" if e.value == "y" else None)
    run = R.run(adapter, frozenset({"dead_channels"}))
    assert adapter.written == [] and run.rules["dead_channels"].applied == 0
    assert {(d.rule, d.node, d.reason) for d in run.declines.values()} == {("dead_channels", "y", "not here")}


def test_driver_warns_at_the_round_cap(caplog):
    class Endless(RecordingAdapter):
        def write(self, view, rule, edits):
            self.written.append(rule)  # the view never changes: the rule applies every round

    rng = np.random.default_rng(9)
    view = FakeView({"a": Affine("x", conv(rng, 4, 4)), "y": Affine("a", bn(rng, 4))}, {"x": Layout(4, 2)},
                    outputs=["y"])
    adapter = Endless(view)
    with caplog.at_level(logging.WARNING, logger="repfuse"):
        R.run(adapter, frozenset({"affine"}), max_rounds=3)
    assert adapter.written == ["affine"] * 3 and "3 rounds" in caplog.text
