"""The fusion report: what a repfuse run changed, printable as a table and as JSON."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


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
class RegionRow:
    root: str  # name of the node the fused op replaced
    source: str  # name of the tensor it reads
    ops: int  # how many ops the region had
    kinds: str  # e.g. "batch_norm x3, conv2d x2, add x2"
    fused: str  # e.g. "conv 64->64 k3x3 s1 g1"


@dataclass
class RuleRow:
    """What one rule (patterns.rules) did in a run."""

    name: str
    enabled: bool = True
    applied: int = 0  # regions fused, dynamic convs aggregated, channels removed, ops folded
    detail: str = ""

    def add(self, count: int, detail: str) -> None:
        """Count another application; a later round that changed nothing keeps the earlier detail."""
        self.applied += count
        if not self.detail:
            self.detail = detail
        elif count:
            self.detail = f"{self.detail}; {detail}"


@dataclass
class FusionReport:
    before: GraphStats
    after: GraphStats
    regions: list[RegionRow] = field(default_factory=list)
    declined: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)
    note: str = ""  # e.g. why a graph was passed through unchanged
    file_bytes: tuple[int, int] | None = None  # model file sizes (ONNX), when known
    rules: list[RuleRow] = field(default_factory=list)  # one row per rule, in patterns.rules order

    @property
    def changed(self) -> bool:
        return bool(self.regions) or any(r.applied for r in self.rules)

    def to_dict(self) -> dict:
        def stats(s: GraphStats) -> dict:  # not asdict: it would rebuild the Counter from (key, count) pairs
            return {"ops": dict(s.ops), "convs": s.convs, "macs": s.macs, "params": s.params}

        return {"before": stats(self.before), "after": stats(self.after),
                "regions": [asdict(r) for r in self.regions],
                "declined": [{"node": n, "reason": r} for n, r in self.declined],
                "note": self.note, "file_bytes": list(self.file_bytes) if self.file_bytes else None,
                "rules": [asdict(r) for r in self.rules]}

    def table(self, explain: bool = False) -> str:
        b, a = self.before, self.after
        rows = [("ops", b.total_ops, a.total_ops), ("convs", b.convs, a.convs),
                ("MACs / sample", b.macs, a.macs), ("parameters", b.params, a.params)]
        if self.file_bytes:
            rows.append(("file bytes", *self.file_bytes))
        kinds = sorted(set(b.ops) | set(a.ops), key=lambda k: (-b.ops.get(k, 0), k))
        rows += [(f"  {k}", b.ops.get(k, 0), a.ops.get(k, 0)) for k in kinds]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'':{width}}  {'before':>14}  {'after':>14}  {'ratio':>6}"]
        for name, x, y in rows:
            ratio = f"{y / x:.2f}" if x else "-"
            lines.append(f"{name:{width}}  {x:>14,}  {y:>14,}  {ratio:>6}")
        if self.rules:
            lines.append("rules:")
            for r in self.rules:
                state = f"{r.applied:>5}" if r.enabled else "  off"
                lines.append(f"  {r.name:<17}{state}  {r.detail}".rstrip())
        lines.append(f"regions fused: {len(self.regions)}")
        for r in self.regions:
            lines.append(f"  {r.root} <- {r.source}: {r.ops} ops ({r.kinds}) -> {r.fused}")
        if self.note:
            lines.append(self.note)
        if explain and self.declined:
            lines.append(f"left alone: {len(self.declined)}")
            lines.extend(f"  {node}: {reason}" for node, reason in self.declined)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def describe_op(op) -> str:
    """One-line summary of a fused AffineConv."""
    if op.rank == 0:
        return f"linear {op.in_channels}->{op.out_channels}"
    k = "x".join(map(str, op.kernel))
    s = "x".join(map(str, op.stride))
    extra = "" if all(d == 1 for d in op.dilation) else f" d{'x'.join(map(str, op.dilation))}"
    return f"conv {op.in_channels}->{op.out_channels} k{k} s{s} g{op.groups}{extra}"
