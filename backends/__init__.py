"""How users reach the passes: torch.compile backend and deploy (pytorch), CLI and TVM to come."""
