"""IR adapters (fx; onnx and relax to come) and the fusion report they share."""
