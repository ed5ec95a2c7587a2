"""repfuse: exact structural re-parameterization for deployment graphs.

Entry points (each imports its framework only when used):
  repfuse.deploy(model, example_inputs)        PyTorch -> fused torch.fx.GraphModule
  torch.compile(model, backend="repfuse")      registered through an entry point
  repfuse.optimize_onnx(model_or_path)          ONNX -> optimized onnx.ModelProto (report=True, check=True)
  repfuse optimize IN.onnx -o OUT.onnx          the command line (python -m repfuse)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = ["deploy", "TraceError", "ShapeGuardError", "optimize_onnx", "CheckFailed", "__version__"]


_LAZY = {"deploy": ("pytorch", "torch"), "TraceError": ("pytorch", "torch"), "ShapeGuardError": ("pytorch", "torch"),
         "optimize_onnx": ("onnx", "onnx"), "CheckFailed": ("onnx", "onnx")}  # name -> (backend module, the extra that installs its framework)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'repfuse' has no attribute {name!r}")
    module, extra = _LAZY[name]
    try:
        backend = importlib.import_module(f"repfuse.backends.{module}")
    except ImportError as e:  # the framework is missing
        raise ImportError(f"repfuse.{name} needs {e.name or extra}: pip install 'repfuse[{extra}]' ({e})") from None
    return getattr(backend, name)


def __dir__():
    return sorted(__all__)  # the public API
