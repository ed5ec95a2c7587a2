"""Recognizing "pad, then overwrite every border with a per-channel constant".

This is how DBB's BN-and-pad layer reaches a graph: a zero Pad followed by
in-place writes to the four border slices (setitem or slice + copy_ in FX,
ScatterND in ONNX, slice_scatter in Relax).  Every adapter replays the writes it
found on a NaN-filled array and lets `border_fill` decide what they amount to:
ONNX and Relax on the padded tensor itself (static shapes), FX through
`border_fill_of_writes`, whose writes are relative to the ends and so hold at
every input size.  Where sizes and indices are computed at run time (ONNX with
dynamic shapes), a write is read symbolically (`patterns.shapes`): `scatter_write`
says which box it writes and with what, `band` turns each side of the box into a
slice relative to the ends, or declines.
"""

from __future__ import annotations

import numpy as np

from .affine import Declined, Pads
from .shapes import Algebra, Lin, Sym, as_lin, split_last, varies

__all__ = ["border_fill", "border_fill_of_writes", "scatter_write", "band"]


def border_fill(filled: np.ndarray, pads: Pads) -> np.ndarray:
    """Per-channel fill value of a replayed [N, C, *spatial] array, or Declined.

    Every border element must have been written, no interior element, and each
    channel's border must hold a single value.
    """
    shape = filled.shape
    interior = tuple([slice(None), slice(None)] + [slice(b, n - e) for (b, e), n in zip(pads, shape[2:])])
    border = np.ones(shape, bool)
    border[interior] = False
    if np.isnan(filled[border]).any() or not np.isnan(filled[~border]).all():
        raise Declined("border writes do not cover exactly the padded border")
    values = np.moveaxis(filled, 1, 0).reshape(shape[1], -1)
    mask = np.moveaxis(border, 1, 0).reshape(shape[1], -1)
    fill = np.array([row[m][0] for row, m in zip(values, mask)])
    if not all(np.all(row[m] == f) for row, m, f in zip(values, mask, fill)):
        raise Declined("border is not filled with one value per channel")
    return fill


def border_fill_of_writes(writes, pads: Pads, channels: int) -> np.ndarray:
    """Per-channel fill of writes `(index, values[C])` into a [N, C, *spatial] tensor padded by `pads`,
    whatever its size, or Declined.  Each index is `[:, :, s_1, ...]` with every s_d whole, `0:begin`
    or `-end:`: such writes cover the same bands at every input size, so replaying them on the
    smallest tensor with an interior (one element per dim) decides for all sizes."""
    rank = len(pads)
    probe = np.full((1, channels) + tuple(b + 1 + e for b, e in pads), np.nan)
    for index, values in writes:
        if not _relative_to_ends(index, pads):
            raise Declined("in-place write to the padded tensor is not exactly a border")
        probe[index] = np.asarray(values, dtype=np.float64).reshape((1, channels) + (1,) * rank)
    return border_fill(probe, pads)


def _relative_to_ends(index, pads: Pads) -> bool:
    if not isinstance(index, tuple) or len(index) != len(pads) + 2:
        return False
    if any(not isinstance(s, slice) or s != slice(None) for s in index[:2]):
        return False
    for s, (b, e) in zip(index[2:], pads):
        if not isinstance(s, slice) or s.step not in (None, 1):
            return False
        if s != slice(None) and not (b and s.start in (None, 0) and s.stop == b) \
                and not (e and s.start == -e and s.stop is None):
            return False
    return True


def scatter_write(alg: Algebra, data: Sym, indices: Sym, updates: Sym, channel_axis: int):
    """What ScatterND(data, indices, updates) writes: per data axis the `(offset, extent)` of the box, and the
    values, one per channel of `channel_axis` (or one for all).  Declined unless every index is an offset plus
    the position along an axis of its own (a box, each element written once) and the values are constants
    that differ only between channels."""
    q = indices.rank - 1
    m = alg.static(indices.shape[-1]) if q >= 0 else None
    if indices.table is None or m is None or m > data.rank:
        raise Declined("border write at positions computed in a way repfuse cannot follow")
    box, walks = [], {}  # walks: index axis -> the data axis it walks
    for j, table in enumerate(split_last(indices, m)):
        e = as_lin(table)
        moves = None if e is None else e.positions()
        if moves is None or len(moves) > 1 or moves and (moves[0][1] != 1 or moves[0][0] in walks):
            raise Declined("border write index is not an offset plus a position")
        if moves:
            walks[moves[0][0]] = j
        box.append((e.without_positions(), indices.shape[moves[0][0]] if moves else Lin(1)))
    if any(alg.static(indices.shape[a]) != 1 for a in range(q) if a not in walks):
        raise Declined("border write writes an element more than once")
    box += [(Lin(0), data.shape[j]) for j in range(m, data.rank)]
    for (offset, extent), size in zip(box, data.shape):
        if extent is None or size is None:
            raise Declined("border write's extent is not known at every size")
        if not alg.nonneg(offset) or not alg.nonneg(size - offset - extent):
            raise Declined("border write may reach outside the tensor")
    if channel_axis >= m:
        along = q + channel_axis - m
    else:
        along = next((a for a, j in walks.items() if j == channel_axis), None)
    return box, _channel_values(updates, along, q + data.rank - m)


def _channel_values(updates: Sym, along: int | None, rank: int) -> np.ndarray:
    t = updates.table
    if t is None or updates.rank != rank:
        raise Declined("border value is not a constant")
    if any(varies(t, i) for i in range(rank) if i != along):
        raise Declined("border value is not one per channel")
    values = [None if e is None else e.number for e in t.reshape(-1)]
    if any(v is None for v in values):
        raise Declined("border value is not a constant")
    return np.asarray(values, dtype=np.float64)


def band(alg: Algebra, offset: Lin, extent: Lin, size: Lin) -> slice:
    """One side of a written box as a slice that holds at every size: whole, `0:e` or `-e:`."""
    o, e, n = (alg.resolve(v) for v in (offset, extent, size))
    if o == 0 and e == n:
        return slice(None)
    if e.number is not None and o == 0:
        return slice(0, e.number)
    if e.number is not None and o + e == n:
        return slice(-e.number, None)
    raise Declined("border write is not at a fixed distance from the ends at every size")
