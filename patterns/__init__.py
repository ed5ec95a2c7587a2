"""The IR-neutral algebra of repfuse: affine convolutions, their rules, the cost model and the planner."""

from . import affine, cost, planner
from .affine import AffineConv, Declined

__all__ = ["affine", "cost", "planner", "AffineConv", "Declined"]
