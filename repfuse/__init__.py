"""repfuse: exact structural re-parameterization for deployment graphs.

Entry points (each imports its framework only when used):
  repfuse.deploy(model, example_inputs)        PyTorch -> fused torch.fx.GraphModule
  torch.compile(model, backend="repfuse")      registered through an entry point
  repfuse.optimize_onnx(model_or_path)          ONNX -> optimized onnx.ModelProto
  repfuse optimize IN.onnx -o OUT.onnx          the command line (python -m repfuse)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["deploy", "TraceError", "ShapeGuardError", "optimize_onnx", "__version__"]


def __getattr__(name: str):
    if name in ("deploy", "TraceError", "ShapeGuardError"):
        try:
            from .backends import pytorch
        except ImportError as e:  # torch missing
            raise ImportError(f"repfuse.{name} needs PyTorch: pip install 'repfuse[torch]' ({e})") from None
        return getattr(pytorch, name)
    if name == "optimize_onnx":
        try:
            from .backends import onnx
        except ImportError as e:
            raise ImportError(f"repfuse.optimize_onnx needs {e.name}: pip install 'repfuse[onnx]'") from None
        return onnx.optimize_onnx
    raise AttributeError(f"module 'repfuse' has no attribute {name!r}")
