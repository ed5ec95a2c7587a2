"""One adapter per IR (fx, onnx, relax): a reader (`GraphView` over the IR, recognition as a table) and a
writer (the plan vocabulary of `repfuse.patterns.plan` in the IR)."""
