"""Recognizing "pad, then overwrite every border with a per-channel constant".

This is how DBB's BN-and-pad layer reaches a graph: a zero Pad followed by
in-place writes to the four border slices (setitem in FX, ScatterND in ONNX,
slice_scatter in Relax).  Each adapter replays the writes it found on a
NaN-filled array of the padded shape; this check decides what they amount to.
"""

from __future__ import annotations

import numpy as np

from .affine import Declined, Pads

__all__ = ["border_fill"]


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
