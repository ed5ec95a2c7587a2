"""Cost model: fuse a region only when the fused op is not more expensive.

Costs are in multiply-accumulates per position of the region's source tensor,
so ops behind a stride count for less.  Writing a tensor costs MEMORY_PASS
MAC-equivalents per element: a BatchNorm or an Add over a feature map is
memory-bound, and fusing it away saves more than its one MAC per element.
"""

from __future__ import annotations

import numpy as np

from .affine import AffineConv
from .plan import lower, written_steps

MEMORY_PASS = 4.0


def density(stride: tuple[int, ...]) -> float:
    """Output positions per source position for an op at this cumulative stride."""
    return 1.0 / float(np.prod(stride)) if stride else 1.0


def op_cost(op: AffineConv, cumulative_stride: tuple[int, ...]) -> float:
    """One affine op (conv, BN, scale, pad...) whose output sits at `cumulative_stride`."""
    return (op.macs_per_output() + MEMORY_PASS * op.out_channels) * density(cumulative_stride)


def fused_cost(op: AffineConv) -> float:
    """What the op a region fuses into costs as every IR writes it (`plan.lower`): per-channel ops are
    elementwise passes, linear layers dense."""
    kind = lower(op)[0][0]
    if kind == "scale_shift":
        return written_steps(op) * elementwise_cost(op.out_channels, ())
    if kind == "linear":
        return op.out_channels * op.in_channels + MEMORY_PASS * op.out_channels
    return op_cost(op, op.stride)


def elementwise_cost(channels: int, cumulative_stride: tuple[int, ...]) -> float:
    """An Add / Sub / Concat / Pad writing `channels` maps at `cumulative_stride`."""
    return (1.0 + MEMORY_PASS) * channels * density(cumulative_stride)
