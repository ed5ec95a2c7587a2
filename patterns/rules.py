"""The rewrites repfuse runs, by stable name, in the order every adapter applies them.

The name is the only key: CLI `--disable/--enable`, the Python `disable=`/`enable=`
options, report rows and test ids all use it.  The order matters:

1. `constant_folding` first, so weight slicing, masks and fake-quantized weights are
   plain constants when the other rules look for constant weights;
2. `affine` (branch merging, BatchNorm/pad/pool folding) before the rules below,
   because they read its output: a dynamic conv's terms and a dead channel's
   producer are one conv only once their BatchNorms are folded;
3. `dynamic_conv` aggregates K weighted convs into one;
4. `dead_channels` removes constant channels (after BN folding, so a zero BN gamma
   shows as zero weights);
5. `ghost_concat` (off by default: see its entry).

`run_to_fixed_point` is the one driver every adapter uses: it runs `affine` again after a
rule that changed the graph, and repeats the list until a round changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping


@dataclass(frozen=True)
class Rule:
    name: str
    default: bool
    summary: str


RULES: tuple[Rule, ...] = (
    Rule("constant_folding", True, "evaluate computations that read only parameters (weight slicing, masks, "
                                   "fake-quantized weights, transposes of constants)"),
    Rule("affine", True, "merge parallel branches and fold BatchNorm, per-channel scales, zero pads and "
                         "average pools into one conv per region"),
    Rule("dynamic_conv", True, "sum_k pi_k(x) * conv(x, W_k) with per-sample scalars pi_k -> one conv with "
                               "the aggregated kernel sum_k pi_k W_k"),
    Rule("dead_channels", True, "remove output channels that are constant (all-zero weights) from their "
                                "producer and every consumer"),
    Rule("ghost_concat", False, "concat(y, depthwise(y)) -> one depthwise conv with two outputs per channel "
                                "(off by default: slower than the concat on the CPU backends measured)"),
)

NAMES = tuple(r.name for r in RULES)


def enabled(disable: Iterable[str] = (), enable: Iterable[str] = ()) -> frozenset[str]:
    """The rule names to run: the defaults, minus `disable`, plus `enable`; unknown names raise ValueError."""
    disable, enable = set(disable), set(enable)
    unknown = sorted((disable | enable) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown rule {', '.join(map(repr, unknown))}; the rules are: {', '.join(NAMES)}")
    both = sorted(disable & enable)
    if both:
        raise ValueError(f"rule {', '.join(map(repr, both))} is both enabled and disabled")
    return frozenset(r.name for r in RULES if (r.default or r.name in enable) and r.name not in disable)


def run_to_fixed_point(steps: Mapping[str, Callable[[], bool]], rules: frozenset[str],
                       after_change: Callable[[], None] = lambda: None, max_rounds: int = 4) -> None:
    """Apply the enabled rules in RULES order, each step returning whether it changed the graph,
    until a round changes nothing (at most `max_rounds` rounds).  After any other rule changes the
    graph, `affine` runs again to fold what it exposed; `after_change` tidies after every change."""
    for _ in range(max_rounds):
        changed = False
        for name in NAMES:
            if name in rules and steps[name]():
                changed = True
                after_change()
                if name != "affine" and "affine" in rules and steps["affine"]():
                    after_change()
        if not changed:
            return
