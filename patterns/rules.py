"""The rewrites repfuse runs, by stable name, in the order every IR applies them, and the driver.

The name is the only key: CLI `--disable/--enable`, the Python `disable=`/`enable=`
options, report rows, declines and test ids all use it.  The order matters:

1. `constant_folding` first, so weight slicing, masks and fake-quantized weights are
   plain constants when the other rules look for constant weights;
2. `affine` (branch merging, BatchNorm/pad/pool folding) before the rules below,
   because they read its output: a dynamic conv's terms and a dead channel's
   producer are one conv only once their BatchNorms are folded;
3. `conv_transpose` folds the per-channel ops that `affine` leaves after a transposed conv
   (nothing composes through one) into its weights and bias;
4. `dynamic_conv` aggregates K weighted convs into one;
5. `dead_channels` removes constant channels (after BN folding, so a zero BN gamma
   shows as zero weights);
6. `ghost_concat` (off by default: see its entry).

Each rule is a function GraphView -> RulePlan (patterns.plan); `run` applies them through
an IR's `Adapter` to a fixed point: `affine` runs again after any other rule changed the
graph, and the list repeats until a round changes nothing or the round cap is reached.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from . import channels, dynamic, ghost, planner, transposed
from .plan import Constant, Decline, Replace, RulePlan
from .planner import GraphView

log = logging.getLogger("repfuse")


def fold_constants(view: GraphView) -> RulePlan:
    """The `constant_folding` rule: a value computed from constants only, read by an op that is not,
    becomes one constant (its readers then see constant weights)."""
    edits = []
    for v in view.values():
        if not view.foldable(v):
            continue
        readers = view.readers(v)
        if readers is None or any(not view.foldable(r) for r in readers):
            edits.append(Replace(v, Constant(v), (v,)))

    def summary(written) -> tuple[int, str]:
        kinds = Counter(view.kind(e.value) for e in written)
        listed = ", ".join(f"{k} x{c}" for k, c in kinds.most_common(4))
        return len(written), f"parameter-only values folded ({listed})" if written else ""

    return RulePlan(edits, {}, *summary(edits), summary=summary)


@dataclass(frozen=True)
class Rule:
    name: str
    default: bool
    summary: str
    plan: Callable[[GraphView], RulePlan]


RULES: tuple[Rule, ...] = (
    Rule("constant_folding", True, "evaluate computations that read only parameters (weight slicing, masks, "
                                   "fake-quantized weights, transposes of constants)", fold_constants),
    Rule("affine", True, "merge parallel branches and fold BatchNorm, per-channel scales, zero pads and "
                         "average pools into one conv per region", planner.fuse_regions),
    Rule("conv_transpose", True, "fold BatchNorm and per-channel scales and shifts after a transposed conv into "
                                 "its weights and bias", transposed.fold),
    Rule("dynamic_conv", True, "sum_k pi_k(x) * conv(x, W_k) with per-sample scalars pi_k -> one conv with "
                               "the aggregated kernel sum_k pi_k W_k", dynamic.aggregate),
    Rule("dead_channels", True, "remove output channels that are constant (all-zero weights) from their "
                                "producer and every consumer", channels.remove_dead),
    Rule("ghost_concat", False, "concat(y, depthwise(y)) -> one depthwise conv with two outputs per channel "
                                "(off by default: slower than the concat on the CPU backends measured)",
         ghost.merge),
)

NAMES = tuple(r.name for r in RULES)


def enabled(disable: Iterable[str] = (), enable: Iterable[str] = ()) -> frozenset[str]:
    """The rule names to run: the defaults, minus `disable`, plus `enable`; unknown names raise ValueError.
    One name may be given as a plain string."""
    disable = {disable} if isinstance(disable, str) else set(disable)
    enable = {enable} if isinstance(enable, str) else set(enable)
    unknown = sorted((disable | enable) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown rule {', '.join(map(repr, unknown))}; the rules are: {', '.join(NAMES)}")
    both = sorted(disable & enable)
    if both:
        raise ValueError(f"rule {', '.join(map(repr, both))} is both enabled and disabled")
    return frozenset(r.name for r in RULES if (r.default or r.name in enable) and r.name not in disable)


# ---------------------------------------------------------------- what a run did

@dataclass
class RuleRow:
    """What one rule did in a run."""

    name: str
    enabled: bool = True
    applied: int = 0  # regions fused, dynamic convs aggregated, channels removed, values folded
    detail: str = ""

    def add(self, count: int, detail: str) -> None:
        """Count another application; a later round that changed nothing keeps the earlier detail."""
        self.applied += count
        if not self.detail:
            self.detail = detail
        elif count:
            self.detail = f"{self.detail}; {detail}"


@dataclass
class RegionRow:
    root: str  # the value the fused op replaced
    source: str  # the tensor it reads
    ops: int  # how many ops the region had
    kinds: str  # e.g. "batch_norm x3, conv2d x2, add x2"
    fused: str  # e.g. "conv 64->64 k3x3 s1 g1"


@dataclass
class Run:
    """What `run` did: one row per rule (RULES order), fused regions, declines and a structural signature
    (equal signatures mean the same graph was written: the torch.compile backend compares them)."""

    rules: dict[str, RuleRow]
    regions: list[RegionRow] = field(default_factory=list)
    declines: dict[tuple[str, str], Decline] = field(default_factory=dict)
    signature: list = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return any(r.applied for r in self.rules.values())

    def decline(self, rule: str, node: str, reason: str) -> None:
        self.declines[(rule, node)] = Decline(rule, node, reason)


class Adapter(Protocol):
    """One IR's side of the driver: a fresh view of the graph, and its writer."""

    def view(self) -> GraphView:
        """A view of the graph as it is now."""

    def cannot_write(self, view: GraphView, edit: Replace) -> str | None:
        """Why this IR cannot express the edit, or None."""

    def write(self, view: GraphView, rule: str, edits: list) -> None:
        """Write the edits (Replace and Resize, in order) and remove what died."""


def run(adapter: Adapter, rules: frozenset[str], max_rounds: int = 4) -> Run:
    """Apply the enabled rules in RULES order through `adapter` until a round changes nothing."""
    result = Run({r.name: RuleRow(r.name, r.name in rules) for r in RULES})
    by_name = {r.name: r for r in RULES}

    def step(name: str) -> bool:
        view = adapter.view()
        plan = by_name[name].plan(view)
        for key, reason in plan.declines.items():
            result.decline(name, view.label(key), reason)
        edits, refused = [], []  # refused: the writer's reasons
        for edit in plan.edits:
            reason = adapter.cannot_write(view, edit) if isinstance(edit, Replace) else None
            if reason:
                refused.append(reason)
                result.decline(name, view.label(edit.value), reason)
            else:
                edits.append(edit)
        if refused and plan.all_or_nothing:
            edits = []
        written = [e for e in edits if isinstance(e, Replace)]
        if refused and plan.summary:
            plan.count, plan.detail = plan.summary(written)
        if refused and not written:
            result.rules[name].add(0, f"declined: {refused[0]}")
            return False
        result.rules[name].add(plan.count if written else 0, plan.detail)
        if not written:
            return False
        result.signature.append((name, plan.signature(view.label)))
        roots = {e.value for e in written}
        result.regions += _region_rows(view, [r for r in plan.regions if r.root in roots])
        adapter.write(view, name, edits)
        return True

    for _ in range(max_rounds):
        changed = False
        for name in NAMES:
            if name in rules and step(name):
                changed = True
                if name != "affine" and "affine" in rules:
                    step("affine")
        if not changed:
            return result
    log.warning("repfuse: stopped after %d rounds with rules still applying; the graph is exact but may not "
                "be fully fused", max_rounds)
    return result


def _region_rows(view: GraphView, regions) -> list[RegionRow]:
    from .affine import describe

    rows = []
    for r in regions:
        kinds = Counter(view.kind(n) for n in r.nodes)
        text = ", ".join(f"{k} x{c}" if c > 1 else k for k, c in sorted(kinds.items()))
        rows.append(RegionRow(view.label(r.root), view.label(r.source), len(r.nodes), text, describe(r.op)))
    return rows
