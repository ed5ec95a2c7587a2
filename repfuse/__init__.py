"""repfuse: exact structural re-parameterization for deployment graphs.

Entry points (each imports its framework only when used):
  repfuse.deploy(model, example_inputs)        PyTorch -> fused torch.fx.GraphModule
  torch.compile(model, backend="repfuse")      registered through an entry point
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["deploy", "TraceError", "__version__"]


def __getattr__(name: str):
    if name in ("deploy", "TraceError"):
        try:
            from .backends import pytorch
        except ImportError as e:  # torch missing
            raise ImportError(f"repfuse.{name} needs PyTorch: pip install 'repfuse[torch]' ({e})") from None
        return getattr(pytorch, name)
    raise AttributeError(f"module 'repfuse' has no attribute {name!r}")
