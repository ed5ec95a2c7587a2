"""Training-form networks from the re-parameterization papers, each with its paper's own deploy form.

    from zoo import NETWORKS                 # with examples/ on sys.path
    net = NETWORKS["dbb-resnet18"]
    model = net.build()                      # training form, random weights, random BN statistics, eval()
    reference = net.to_deploy(model)         # the paper's conversion, written without repfuse (or None)

No pretrained weights: every network is randomly initialized and its BatchNorm
statistics randomized (`common.randomize`), so folding mistakes show in the numbers.

`kind` says what repfuse needs to reach the reference: "branches" (merging
branches and folding BatchNorm, the core rewrite) or "rewrite" (a seed-paper
rewrite beyond branch merging: dynamic-conv aggregation, dead channels,
weight slicing, Ghost concat).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Network", "NETWORKS"]


@dataclass(frozen=True)
class Network:
    name: str
    module: str  # file in this folder
    kind: str  # "branches" | "rewrite"
    kwargs: dict = field(default_factory=dict)
    seed: int = 0
    bn_gain: float = 1.0  # extra BatchNorm gamma gain for deep nets whose signal fades with the default draw

    def _mod(self):
        return importlib.import_module(f"{__name__}.{self.module}")

    def build(self, **overrides):
        """The training form in eval mode, with random weights and BatchNorm statistics."""
        import torch

        from .common import randomize

        module = self._mod()
        own = getattr(module, "randomize", randomize)  # e.g. the pruned net re-applies its zeroed channels
        model = own(module.build(**{**self.kwargs, **overrides}), seed=self.seed)
        if self.bn_gain != 1.0:
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                        m.weight.mul_(self.bn_gain)
        return model

    @property
    def to_deploy(self) -> Callable | None:
        return getattr(self._mod(), "to_deploy", None)

    @property
    def input_size(self) -> tuple:
        return tuple(self._mod().INPUT_SIZE)


NETWORKS: dict[str, Network] = {n.name: n for n in [
    # bn_gain keeps outputs input-dependent and finite through each net's depth (measured at 64 and 224)
    Network("repvgg-a0", "repvgg", "branches", {"variant": "A0"}, bn_gain=1.5),
    Network("repvgg-b0", "repvgg", "branches", {"variant": "B0"}, bn_gain=1.5),
    Network("acnet-resnet18", "acnet", "branches", bn_gain=1.5),
    Network("dbb-resnet18", "dbb", "branches", bn_gain=1.5),
    Network("mobileone-s0", "mobileone", "branches", bn_gain=1.1),
    Network("repghostnet-1.0x", "repghost", "branches", bn_gain=2.0),
    Network("ghostnet-1.0x", "ghostnet", "rewrite", bn_gain=2.5),
    Network("dynamic-mobilenetv2", "dynamic_conv", "rewrite"),
    Network("drconv-net", "drconv", "rewrite"),
    Network("nas-supernet", "nas_supernet", "rewrite"),
    Network("pruned-resnet", "pruned_resnet", "rewrite"),
]}
