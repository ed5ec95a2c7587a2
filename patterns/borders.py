"""Recognizing "pad, then overwrite every border with a per-channel constant".

This is how DBB's BN-and-pad layer reaches a graph: a zero Pad followed by
in-place writes to the four border slices (setitem or slice + copy_ in FX,
ScatterND in ONNX, slice_scatter in Relax).  Every adapter replays the writes it
found on a NaN-filled array and lets `border_fill` decide what they amount to:
ONNX and Relax on the padded tensor itself (static shapes), FX through
`border_fill_of_writes`, whose writes are relative to the ends and so hold at
every input size.
"""

from __future__ import annotations

import numpy as np

from .affine import Declined, Pads

__all__ = ["border_fill", "border_fill_of_writes"]


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
