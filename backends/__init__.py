"""How users reach the passes: `repfuse.deploy` and the torch.compile backend (pytorch), the `repfuse` command
line and ONNX API (cli, onnx), the Relax pass and pipeline (tvm)."""
