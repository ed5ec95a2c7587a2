"""Size and index arithmetic computed at run time, read symbolically.

With dynamic shapes the torch exporters write DBB's border assignments as ScatterNDs whose indices come
from Shape -> Gather -> Range -> Add / Unsqueeze / Expand / Concat.  To judge such a write for *every*
input size, each tensor of that arithmetic is read as a `Sym`: its shape, and its entries as integer
linear expressions (`Lin`) in the dims of one tensor (symbols `d0`, `d1`, ...) and in the entry's own
position along each axis (`#0`, `#1`, ...).  Whatever leaves this fragment is unknown (None), and an
unknown never becomes a fact: the caller declines.

Two facts are used besides arithmetic: every dim is >= 0, and in a run that does not fail, broadcasting
a static size s > 1 against a dim gives s (the dim is 1 or s; one known to be >= 2 is s, and `Algebra`
records that).  So a judgement holds for every input on which the graph runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import numpy as np

__all__ = ["Lin", "Sym", "Algebra"]

_TABLE_LIMIT = 1 << 16  # entries of a constant kept after compression (larger: values unknown)
_INT_MAX = 1 << 62  # a slice end at least this large means "to the end"


class Lin:
    """const + sum(coef * symbol), immutable; a symbol is a dim (`d0`) or a position (`#0`), both >= 0."""

    __slots__ = ("const", "terms")

    def __init__(self, const=0, terms=None):
        self.const = const
        self.terms = tuple(sorted((k, c) for k, c in (terms or {}).items() if c))

    @staticmethod
    def of(v) -> Lin:
        return v if isinstance(v, Lin) else Lin(v)

    def __add__(self, other) -> Lin:
        other, terms = Lin.of(other), dict(self.terms)
        for k, c in other.terms:
            terms[k] = terms.get(k, 0) + c
        return Lin(self.const + other.const, terms)

    __radd__ = __add__

    def scale(self, k) -> Lin:
        return Lin(self.const * k, {s: c * k for s, c in self.terms})

    def __neg__(self) -> Lin:
        return self.scale(-1)

    def __sub__(self, other) -> Lin:
        return self + -Lin.of(other)

    def __eq__(self, other) -> bool:
        other = Lin(other) if isinstance(other, (int, float)) else other
        return isinstance(other, Lin) and self.const == other.const and self.terms == other.terms

    def __hash__(self):
        return hash((self.const, self.terms))

    def __repr__(self):
        return " + ".join([f"{c}*{k}" for k, c in self.terms] + [str(self.const)])

    @property
    def number(self):
        """The value when it is one for every input, else None."""
        return None if self.terms else self.const

    def subs(self, values: dict) -> Lin:
        """Every symbol in `values` replaced by its Lin (all at once)."""
        out = Lin(self.const)
        for k, c in self.terms:
            out = out + (values[k].scale(c) if k in values else Lin(0, {k: c}))
        return out

    def uses(self, symbol: str) -> bool:
        return any(k == symbol for k, _ in self.terms)

    def positions(self) -> list[tuple[int, int]]:
        """(axis, coef) of the position symbols."""
        return [(int(k[1:]), c) for k, c in self.terms if k.startswith("#")]

    def without_positions(self) -> Lin:
        return Lin(self.const, {k: c for k, c in self.terms if not k.startswith("#")})

    def nonnegative(self) -> bool:
        """>= 0 for every value of the symbols (all >= 0)."""
        return self.const >= 0 and all(c > 0 for _, c in self.terms)


@dataclass(frozen=True, eq=False)
class Sym:
    """A tensor of sizes or indices: `shape` (a Lin or None per axis) and `table`, an object array of
    Lin | None with one dim per axis, that dim 1 (entries then name the position `#axis`) or the axis's
    static size.  `table` None: the values are unknown (a data tensor whose shape alone is read)."""

    shape: tuple
    table: np.ndarray | None

    @property
    def rank(self) -> int:
        return len(self.shape)


def pos(axis: int) -> Lin:
    return Lin(0, {f"#{axis}": 1})


def _apply(fn, *tables) -> np.ndarray:
    """fn on the entries of broadcast tables; None where an entry is None or fn gives None."""
    out = np.frompyfunc(lambda *a: None if any(v is None for v in a) else fn(*a), len(tables), 1)(*tables)
    return out if isinstance(out, np.ndarray) else _cell(out)


def _cell(value) -> np.ndarray:
    cell = np.empty((), object)
    cell[()] = value
    return cell


def _take(table: np.ndarray, index, axis: int) -> np.ndarray:
    out = np.take(table, index, axis=axis)
    return out if isinstance(out, np.ndarray) else _cell(out)


def _single(value, rank: int) -> np.ndarray:
    return _cell(value).reshape((1,) * rank)


def _rename(table: np.ndarray, values: dict) -> np.ndarray:
    """Position symbols renamed or fixed: `values` maps an axis to a Lin (a new position or a number)."""
    subs = {f"#{axis}": v for axis, v in values.items()}
    if not subs or all(e is None or not e.terms for e in table.flat):  # numbers only: nothing to rename
        return table
    return _apply(lambda e: e.subs(subs) if e.terms else e, table)


def _varies(table: np.ndarray, axis: int) -> bool:
    return table.shape[axis] > 1 or any(e is None or e.terms and e.uses(f"#{axis}") for e in table.flat)


def _materialize(table: np.ndarray, axis: int, n: int) -> np.ndarray:
    """The table with all n entries along `axis` written out (positions on it replaced by numbers)."""
    if table.shape[axis] == n:
        return table
    parts = [_rename(table, {axis: Lin(j)}) for j in range(n)]
    return np.concatenate(parts, axis=axis) if parts else _take(table, [], axis)


def _affine_fit(a: np.ndarray) -> Lin | None:
    """An integer array as c + sum(k_i * #i) when it is exactly that (an arange along an axis)."""
    first = a.reshape(-1)[0].item() if a.size else 0
    terms, grid = {}, np.full(a.shape, first, dtype=np.int64)
    for axis, n in enumerate(a.shape):
        if n > 1:
            step = a[(0,) * axis + (1,) + (0,) * (a.ndim - axis - 1)].item() - first
            terms[f"#{axis}"] = step
            grid = grid + step * np.arange(n).reshape((1,) * axis + (n,) + (1,) * (a.ndim - axis - 1))
    return Lin(int(first), terms) if a.size and np.array_equal(grid, a) else None


class Algebra:
    """The operations on `Sym`s, and the dims a run that does not fail must have (`bound`)."""

    def __init__(self):
        self.bound: dict[str, Lin] = {}

    # -- facts about dims
    def resolve(self, d: Lin | None) -> Lin | None:
        return None if d is None else d.subs(self.bound) if self.bound else d

    def static(self, d: Lin | None):
        d = self.resolve(d)
        return None if d is None else d.number

    def same(self, a: Lin | None, b: Lin | None) -> bool:
        return a is not None and b is not None and self.resolve(a) == self.resolve(b)

    def nonneg(self, d: Lin | None) -> bool:
        return d is not None and self.resolve(d).nonnegative()

    def _bdim(self, a: Lin | None, b: Lin | None) -> Lin | None:
        """The broadcast of two dims in a run that does not fail."""
        if self.same(a, b):
            return a
        sa, sb = self.static(a), self.static(b)
        if sa == 1 or sb == 1:
            return b if sa == 1 else a
        if (sa is None) == (sb is None):
            return None  # two unknowns, or two different numbers (the graph fails)
        s, d = (sa, b) if sa is not None else (sb, a)
        self._bind(d, s)
        return Lin(s)

    def _bind(self, d: Lin | None, s: int) -> None:
        """d broadcasts against a static s > 1: d is 1 or s, so a d known to be >= 2 is s."""
        d = self.resolve(d)
        if d is None or not (d - 2).nonnegative() or len(d.terms) != 1 or d.terms[0][0].startswith("#"):
            return
        (name, coef), rest = d.terms[0], s - d.const
        if rest % coef == 0 and rest // coef >= 0:
            self.bound[name] = Lin(rest // coef)

    # -- building Syms
    def make(self, shape, table) -> Sym:
        """A Sym with positions on static size-1 axes fixed at 0."""
        shape = tuple(shape)
        if table is not None:
            table = _rename(table, {i: Lin(0) for i, d in enumerate(shape) if self.static(d) == 1})
        return Sym(shape, table)

    @staticmethod
    def unknown(rank: int) -> Sym:
        return Sym((None,) * rank, None)

    def constant(self, array) -> Sym:
        a = np.asarray(array)
        shape = tuple(Lin(int(d)) for d in a.shape)
        if a.dtype.kind not in "biuf":
            return Sym(shape, None)
        for axis in range(a.ndim):  # equal along an axis: one entry stands for all
            if a.shape[axis] > 1 and (a == a.take([0], axis=axis)).all():
                a = a.take([0], axis=axis)
        if a.dtype.kind in "biu":
            fit = _affine_fit(a.astype(np.int64))
            if fit is not None:
                return Sym(shape, _single(fit, a.ndim))
        if a.size > _TABLE_LIMIT:
            return Sym(shape, None)
        kind = float if a.dtype.kind == "f" else int
        return Sym(shape, _apply(lambda v: Lin(kind(v)), a.astype(object)))

    def scalar(self, s: Sym | None) -> Lin | None:
        """The single entry of a one-element Sym."""
        if s is None or s.table is None or any(self.static(d) != 1 for d in s.shape):
            return None
        return s.table.reshape(-1)[0]

    def entries(self, s: Sym | None) -> list | None:
        """The entries of a 1-D Sym of static length (a shape vector), each a Lin or None."""
        n = None if s is None or s.rank != 1 else self.static(s.shape[0])
        if n is None:
            return None
        return [None] * n if s.table is None else list(_materialize(s.table, 0, n))

    # -- ops
    def shape_of(self, s: Sym, start: int = 0, end: int | None = None) -> Sym:
        dims = list(s.shape)[start:end]
        table = np.empty(len(dims), object)
        table[:] = [self.resolve(d) for d in dims]
        return Sym((Lin(len(dims)),), table)

    def align(self, s: Sym, rank: int) -> Sym:
        """Leading size-1 axes up to `rank` (broadcasting from the right)."""
        k = rank - s.rank
        if k <= 0:
            return s
        table = None if s.table is None else \
            _rename(s.table.reshape((1,) * k + s.table.shape), {i: pos(i + k) for i in range(s.rank)})
        return Sym((Lin(1),) * k + s.shape, table)

    def _spread(self, s: Sym, dims) -> np.ndarray | None:
        """s's table on the broadcast dims; None where an entry would depend on how a dim broadcast."""
        if s.table is None:
            return None
        for i, (d, r) in enumerate(zip(s.shape, dims)):
            if not self.same(d, r) and self.static(d) != 1 and _varies(s.table, i):
                return None
        return s.table

    def elementwise(self, fn, *syms: Sym) -> Sym:
        rank = max(s.rank for s in syms)
        syms = [self.align(s, rank) for s in syms]
        dims = [reduce(self._bdim, [s.shape[i] for s in syms]) for i in range(rank)]
        tables = [self._spread(s, dims) for s in syms]
        if any(t is None for t in tables):
            return self.make(dims, None)
        for i in range(rank):  # a static axis written out in one table is written out in all
            n = max(t.shape[i] for t in tables)
            tables = [_materialize(t, i, n) for t in tables] if n > 1 else tables
        return self.make(dims, _apply(fn, *tables))

    def expand(self, s: Sym, dims: list) -> Sym:
        rank = max(s.rank, len(dims))
        s, dims = self.align(s, rank), [Lin(1)] * (rank - len(dims)) + list(dims)
        out = [self._bdim(a, b) for a, b in zip(s.shape, dims)]
        return self.make(out, self._spread(s, out))

    def equal(self, a: Lin, b: Lin) -> Lin | None:
        diff = self.resolve(a - b)
        if diff.number is not None:
            return Lin(int(diff.number == 0))
        return Lin(0) if (diff - 1).nonnegative() or (-diff - 1).nonnegative() else None

    def range(self, start: Lin | None, limit: Lin | None, delta: Lin | None) -> Sym:
        if start is None or limit is None or delta is None or delta.number is None:
            return self.unknown(1)
        if start.number is not None and limit.number is not None:
            return self.constant(np.arange(start.number, limit.number, delta.number))
        n = limit - start
        if delta.number != 1 or not self.nonneg(n):
            return self.unknown(1)
        return self.make((n,), _single(start + pos(0), 1))

    def pad(self, s: Sym, pads: list[tuple[int, int]]) -> Sym:
        return Sym(tuple(None if d is None else d + b + e for d, (b, e) in zip(s.shape, pads)), None)

    def gather(self, s: Sym, index: np.ndarray, axis: int) -> Sym:
        index, n = np.asarray(index, dtype=np.int64), self.static(s.shape[axis])
        shape = s.shape[:axis] + tuple(Lin(int(d)) for d in index.shape) + s.shape[axis + 1:]
        if s.table is None:
            return Sym(shape, None)
        if n is None:  # a symbolic axis: only a single index at or past 0
            if index.ndim or index < 0:
                return Sym(shape, None)
            table = _take(_rename(s.table, {axis: Lin(int(index))}), 0, axis)
            return self.make(shape, _rename(table, {i + 1: pos(i) for i in range(axis, s.rank - 1)}))
        table = _take(_materialize(s.table, axis, n), np.where(index < 0, index + n, index), axis)
        shift = index.ndim - 1
        return self.make(shape, _rename(table, {i: pos(i + shift) for i in range(axis + 1, s.rank)}))

    def slice(self, s: Sym, starts: list, ends: list, axes: list[int], steps: list) -> Sym:
        shape, table = list(s.shape), s.table
        for start, end, axis, step in zip(starts, ends, axes, steps):
            d = shape[axis]
            if step is None or step.number != 1:
                return Sym(tuple(shape[:axis] + [None] + shape[axis + 1:]), None)
            b, e = self._index(start, d), self._index(end, d)
            n = e - b if b is not None and e is not None and self.nonneg(e - b) else None
            shape[axis] = n
            if table is None:
                continue
            if table.shape[axis] > 1:  # written out: the bounds must be numbers
                ok = b is not None and n is not None and b.number is not None and n.number is not None
                table = _take(table, list(range(b.number, b.number + n.number)), axis) if ok else None
            elif b is not None:
                table = _rename(table, {axis: pos(axis) + b})
            elif _varies(table, axis):
                table = None
        return self.make(shape, table)

    def _index(self, v: Lin | None, d: Lin | None) -> Lin | None:
        """A Slice bound in [0, d] as ONNX clamps it, when that needs no clamping to know."""
        if v is None:
            return None
        if v.number is not None and v.number >= _INT_MAX:
            return d
        if v.number is not None and v.number < 0:
            v = None if d is None else d + v
        if v is not None and v.number == 0:
            return v
        return v if self.nonneg(v) and d is not None and self.nonneg(d - v) else None

    def unsqueeze(self, s: Sym, axes: list[int]) -> Sym:
        rank = s.rank + len(axes)
        new = sorted(a % rank for a in axes)
        old = [i for i in range(rank) if i not in new]
        shape = [Lin(1)] * rank
        for i, j in enumerate(old):
            shape[j] = s.shape[i]
        if s.table is None:
            return Sym(tuple(shape), None)
        table_shape = [1] * rank
        for i, j in enumerate(old):
            table_shape[j] = s.table.shape[i]
        table = _rename(s.table.reshape(table_shape), {i: pos(j) for i, j in enumerate(old)})
        return Sym(tuple(shape), table)

    def squeeze(self, s: Sym, axes: list[int] | None) -> Sym:
        axes = [i for i, d in enumerate(s.shape) if self.static(d) == 1] if axes is None else \
            [a % s.rank for a in axes]
        if any(self.static(s.shape[a]) != 1 for a in axes):
            return self.unknown(s.rank - len(axes))
        keep = [i for i in range(s.rank) if i not in axes]
        shape = tuple(s.shape[i] for i in keep)
        if s.table is None:
            return Sym(shape, None)
        table = s.table.reshape([s.table.shape[i] for i in keep])
        return Sym(shape, _rename(table, {i: pos(j) for j, i in enumerate(keep)}))

    def transpose(self, s: Sym, perm: list[int]) -> Sym:
        shape = tuple(s.shape[p] for p in perm)
        if s.table is None:
            return Sym(shape, None)
        return Sym(shape, _rename(s.table.transpose(perm), {p: pos(i) for i, p in enumerate(perm)}))

    def concat(self, syms: list[Sym], axis: int) -> Sym:
        rank = syms[0].rank
        axis %= rank
        sizes = [self.static(s.shape[axis]) for s in syms]
        shape = [next((s.shape[i] for s in syms if s.shape[i] is not None), None) for i in range(rank)]
        shape[axis] = None if None in sizes else Lin(sum(sizes))
        if None in sizes or any(s.rank != rank or s.table is None for s in syms):
            return Sym(tuple(shape), None)
        tables = [_materialize(s.table, axis, n) for s, n in zip(syms, sizes)]
        for i in range(rank):
            n = max(t.shape[i] for t in tables) if i != axis else 0
            if n > 1:
                tables = [_materialize(t, i, n) for t in tables]
        target = [max(t.shape[i] for t in tables) for i in range(rank)]
        tables = [np.broadcast_to(t, target[:axis] + [t.shape[axis]] + target[axis + 1:]) for t in tables]
        return self.make(shape, np.concatenate(tables, axis=axis))

    def reshape(self, s: Sym, dims: list, allowzero: bool = False) -> Sym:
        dims = [s.shape[i] if d is not None and d.number == 0 and not allowzero and i < s.rank else d
                for i, d in enumerate(dims)]
        minus = [i for i, d in enumerate(dims) if d is not None and d.number == -1]
        moved = self._moved_axes(s, dims, minus)
        if moved is not None:  # only size-1 axes come or go: the same entries, re-indexed
            out = list(dims)
            for i, j in moved.items():
                out[j] = s.shape[i]
            if s.table is None:
                return Sym(tuple(out), None)
            table_shape = [1] * len(dims)
            for i, j in moved.items():
                table_shape[j] = s.table.shape[i]
            return self.make(out, _rename(s.table.reshape(table_shape), {i: pos(j) for i, j in moved.items()}))
        out = [self._inferred(s.shape, dims, i) if i in minus else d for i, d in enumerate(dims)]
        if s.table is None:
            return Sym(tuple(out), None)
        live = [i for i in range(s.rank) if _varies(s.table, i)]
        if not live:  # one value everywhere
            return self.make(out, _single(s.table.reshape(-1)[0], len(out)))
        # an entry keeps its coordinate on a live axis when that axis and the product of the axes after it agree
        if len(dims) == s.rank and all(self.same(s.shape[i], dims[i]) and
                                       self._same_product(s.shape[i + 1:], dims[i + 1:]) for i in live):
            return self.make(out, s.table)
        return Sym(tuple(out), None)

    def _moved_axes(self, s: Sym, dims: list, minus: list[int]) -> dict | None:
        """source axis -> target axis when the two shapes differ only by static size-1 axes."""
        src = [i for i, d in enumerate(s.shape) if self.static(d) != 1]
        dst = [j for j, d in enumerate(dims) if self.static(d) != 1 or j in minus]
        if len(src) != len(dst) or len(minus) > 1:
            return None
        if all(j in minus or self.same(s.shape[i], dims[j]) for i, j in zip(src, dst)):
            return dict(zip(src, dst))
        return None

    def _inferred(self, shape, dims, i: int) -> Lin | None:
        """The dim a -1 at `i` stands for: all elements over the other dims, when that divides exactly."""
        total, rest = self._product(shape), self._product(dims[:i] + dims[i + 1:])
        if total is None or rest is None or not rest.number:
            return Lin(1) if self._same_product([total], [rest]) else None
        k = rest.number
        exact = total.const % k == 0 and all(c % k == 0 for _, c in total.terms)
        return Lin(total.const // k, {n: c // k for n, c in total.terms}) if exact else None

    def _same_product(self, a, b) -> bool:
        pa, pb = self._product(a), self._product(b)
        return pa is not None and pb is not None and self.same(pa, pb)

    def _product(self, dims) -> Lin | None:
        """The product of dims when at most one of them is symbolic."""
        out, symbolic = Lin(1), False
        for d in dims:
            d = self.resolve(d)
            if d is None or (d.number is None and symbolic):
                return None
            symbolic = symbolic or d.number is None
            out = out.scale(d.number) if d.number is not None else d.scale(out.number)
        return out


def split_last(s: Sym, n: int) -> list[np.ndarray]:
    """The tables of s[..., j] for j < n (the last axis has static size n)."""
    return [_take(_materialize(s.table, s.rank - 1, n), j, -1) for j in range(n)]


def varies(table: np.ndarray, axis: int) -> bool:
    """Whether entries may differ along `axis`."""
    return _varies(table, axis)


def as_lin(table: np.ndarray) -> Lin | None:
    """A table as one Lin of the positions: entries written out along an axis are folded back into `#axis`
    when they step by a constant."""
    if table.size == 0 or any(e is None for e in table.flat):
        return None
    first, out = table.reshape(-1)[0], table.reshape(-1)[0]
    for axis, n in enumerate(table.shape):
        if n > 1:
            step = (table[(0,) * axis + (1,) + (0,) * (table.ndim - axis - 1)] - first).number
            if step is None:
                return None
            out = out + pos(axis).scale(step)
    fixed = {f"#{axis}": None for axis, n in enumerate(table.shape) if n > 1}
    for index in np.ndindex(*table.shape):
        expected = out.subs({k: Lin(index[int(k[1:])]) for k in fixed})
        if table[index] != expected:
            return None
    return out
