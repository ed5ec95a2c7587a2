"""The IR-neutral half of repfuse: the affine algebra and cost model, the rules (planners returning plans in
a small vocabulary), the driver that runs them through an IR's adapter, and the report of a run."""

from . import affine, cost, planner
from .affine import AffineConv, Declined

__all__ = ["affine", "cost", "planner", "AffineConv", "Declined"]
