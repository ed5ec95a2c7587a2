"""The fusion report: what a repfuse run changed, printable as a table and as JSON."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

from .plan import Decline
from .rules import RegionRow, RuleRow

__all__ = ["GraphStats", "FusionReport", "RegionRow", "RuleRow", "Decline"]

_COMPACT_KINDS = 6  # op types in the default table
_STAGES = ("onnxsim",)  # rows of tools that run before the rules (their detail says what they did)


@dataclass
class GraphStats:
    ops: Counter = field(default_factory=Counter)  # op type -> count
    convs: int = 0  # conv and linear ops
    macs: int = 0  # multiply-accumulates per sample (batch 1)
    params: int = 0  # elements of constant tensors the graph reads

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())


@dataclass
class FusionReport:
    before: GraphStats
    after: GraphStats
    regions: list[RegionRow] = field(default_factory=list)
    declined: list[Decline] = field(default_factory=list)
    note: str = ""  # e.g. why a graph was passed through unchanged
    file_bytes: tuple[int, int] | None = None  # model file sizes (ONNX), when known
    rules: list[RuleRow] = field(default_factory=list)  # one row per rule, in patterns.rules order

    @classmethod
    def of(cls, before: GraphStats, after: GraphStats, run, **more) -> "FusionReport":
        """The report of a `patterns.rules.run`."""
        return cls(before, after, run.regions, list(run.declines.values()), rules=list(run.rules.values()), **more)

    @property
    def changed(self) -> bool:
        return bool(self.regions) or any(r.applied for r in self.rules)

    def to_dict(self) -> dict:
        def stats(s: GraphStats) -> dict:  # not asdict: it would rebuild the Counter from (key, count) pairs
            return {"ops": dict(s.ops), "convs": s.convs, "macs": s.macs, "params": s.params}

        return {"before": stats(self.before), "after": stats(self.after),
                "regions": [asdict(r) for r in self.regions],
                "declined": [asdict(d) for d in self.declined],
                "note": self.note, "file_bytes": list(self.file_bytes) if self.file_bytes else None,
                "rules": [asdict(r) for r in self.rules]}

    def table(self, explain: bool = False, verbose: bool = False) -> str:
        """The report as text.  Default: at most 20 lines (totals, the op types that changed most, one line of
        rules); `verbose`: every op type, a row per rule and per fused region; `explain`: verbose, and every
        op left alone by rule and reason."""
        verbose = verbose or explain
        b, a = self.before, self.after
        rows = [("ops", b.total_ops, a.total_ops), ("conv + linear ops", b.convs, a.convs),
                ("MACs / sample", b.macs, a.macs), ("parameters", b.params, a.params)]
        if self.file_bytes:
            rows.append(("file bytes", *self.file_bytes))
        kinds = sorted(set(b.ops) | set(a.ops), key=lambda k: (-b.ops.get(k, 0), k))
        hidden = 0
        if not verbose:  # the op types that changed most
            changed = sorted((k for k in kinds if b.ops.get(k, 0) != a.ops.get(k, 0)),
                             key=lambda k: -abs(b.ops.get(k, 0) - a.ops.get(k, 0)))
            hidden = len(kinds) - min(len(changed), _COMPACT_KINDS)
            kinds = [k for k in kinds if k in changed[:_COMPACT_KINDS]]
        rows += [(f"  {k}", b.ops.get(k, 0), a.ops.get(k, 0)) for k in kinds]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'':{width}}  {'before':>14}  {'after':>14}  {'ratio':>6}"]
        for name, x, y in rows:
            ratio = f"{y / x:.2f}" if x else "-"
            lines.append(f"{name:{width}}  {x:>14,}  {y:>14,}  {ratio:>6}")
        if hidden:
            lines.append(f"  ({hidden} more op types, unchanged or changed less: --verbose)")
        if self.rules and verbose:
            lines.append("rules:")
            for r in self.rules:
                state = f"{r.applied:>5}" if r.enabled else "  off"
                lines.append(f"  {r.name:<17}{state}  {r.detail}".rstrip())
        elif self.rules:
            stages = [r for r in self.rules if r.name in _STAGES and r.enabled]  # tools run before the rules
            lines += [f"{r.name}: {r.detail}" for r in stages]
            rules = [r for r in self.rules if r.name not in _STAGES]
            on = ", ".join(f"{r.name} {r.applied}" for r in rules if r.enabled)
            off = ", ".join(r.name for r in rules if not r.enabled)
            lines.append(f"rules: {on}" + (f"; off: {off}" if off else ""))
        lines.append(f"regions fused: {len(self.regions)}" + ("" if verbose or not self.regions else " (--verbose lists them)"))
        if verbose:
            for r in self.regions:
                lines.append(f"  {r.root} <- {r.source}: {r.ops} ops ({r.kinds}) -> {r.fused}")
        if self.note:
            lines.append(self.note)
        if explain and self.declined:
            lines.append(f"left alone: {len(self.declined)} (by rule and reason)")
            groups = defaultdict(list)
            for d in self.declined:
                groups[(d.rule, d.reason)].append(d.node)
            for (rule, reason), nodes in groups.items():
                shown = ", ".join(nodes[:6]) + (f", ... ({len(nodes)} in all)" if len(nodes) > 6 else "")
                lines.append(f"  {rule}: {reason}: {shown}")
        elif self.declined and not verbose:
            lines.append(f"left alone: {len(self.declined)} ops (--explain says why)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
