"""timm's models as a real-world corpus: the families with their own `reparameterize`/`fuse`, and plain CNNs.

    from zoo.timm_corpus import CORPUS, build, timm_convert
    model = build("repvgg_a0")            # random weights, random BN statistics, eval()
    reference = timm_convert(model)       # timm.utils.model.reparameterize_model on a copy

timm is installed without its dependencies (`pip install --no-deps timm pyyaml
huggingface_hub safetensors`): torchvision's wheel does not load next to the CPU
torch, and timm needs only a few of its names to build models.  `import_timm()`
gives it a minimal stand-in when the real torchvision cannot be imported.
"""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import sys
import types
from dataclasses import dataclass

__all__ = ["Model", "CORPUS", "import_timm", "build", "timm_convert"]


@dataclass(frozen=True)
class Model:
    name: str  # timm.create_model name
    family: str
    kind: str  # "reparam": the family has its own reparameterize/fuse; "plain": a CNN with nothing to merge
    size: int = 64  # input height and width (a second size, size + 32, checks shape independence)
    fixed_size: bool = False  # the model only runs at `size` (attention biases per position): the second input
    #                           differs in batch only
    kwargs: tuple = ()  # extra create_model arguments, as (key, value) pairs
    exporter: str = ""  # torch.onnx.export's exporter for the ONNX column when not the corpus default
    tvm: bool = False  # in the TVM subset run by CI
    slow: bool = False  # over a few seconds per IR on 2 cores: only in the full corpus run


CORPUS: list[Model] = [
    Model("repvgg_a0", "byobnet RepVGG", "reparam", tvm=True),
    Model("mobileone_s0", "byobnet MobileOne", "reparam", tvm=True),
    Model("fastvit_t8", "FastViT", "reparam"),
    Model("repvit_m0_9", "RepViT", "reparam"),
    Model("repghostnet_050", "RepGhostNet", "reparam", tvm=True),
    Model("ghostnet_100", "GhostNet v1", "reparam"),
    Model("ghostnetv2_100", "GhostNet v2", "reparam"),
    Model("ghostnetv3_100", "GhostNet v3", "reparam", slow=True),
    # TorchScript's export of LeViT's reshape_as reads the linear's output with Shape(): left unfused there
    Model("levit_128s", "LeViT", "reparam", kwargs=(("img_size", 64),), fixed_size=True, exporter="dynamo"),
    Model("efficientvit_m0", "EfficientViT (MSRA)", "reparam", kwargs=(("img_size", 64),), fixed_size=True),
    Model("efficientvit_b0", "EfficientViT (MIT)", "reparam"),
    Model("hgnetv2_b0", "HGNetV2", "reparam"),
    Model("shvit_s1", "SHViT", "reparam", fixed_size=True),  # torch.export bounds its H, W by the example
    Model("starnet_s050", "StarNet", "reparam"),
    Model("gernet_s", "GerNet", "reparam"),
    Model("mobilenetv4_conv_small", "MobileNetV4", "reparam"),
    Model("resnet18", "ResNet", "plain", tvm=True),
    Model("densenet121", "DenseNet", "plain", slow=True),
    Model("efficientnet_b0", "EfficientNet", "plain"),
    Model("mobilenetv3_small_100", "MobileNetV3", "plain"),
    Model("regnetx_002", "RegNet", "plain"),
    Model("convnext_atto", "ConvNeXt", "plain"),
]


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec reads it
    return module


def _stand_in_torchvision() -> None:
    """Register a minimal `torchvision` in sys.modules: the names timm reads when it builds models."""
    import torch
    from torch import nn

    class FrozenBatchNorm2d(nn.Module):
        """BatchNorm2d with fixed statistics and affine parameters (torchvision.ops.misc's semantics)."""

        def __init__(self, num_features: int, eps: float = 1e-5):
            super().__init__()
            self.eps = eps
            for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
                self.register_buffer(name, torch.full((num_features,), value))

        def forward(self, x):
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    class InterpolationMode:  # the enum's names only: the corpus runs no transforms
        NEAREST, BILINEAR, BICUBIC, BOX, HAMMING, LANCZOS = (
            "nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")

    def unavailable(name: str):
        """A class timm may subclass or name at import time, which cannot be instantiated."""
        if name.startswith("__"):
            raise AttributeError(name)

        def refuse(self, *args, **kwargs):
            raise RuntimeError(f"the stand-in torchvision has no {name}: install a torchvision built for this torch")

        return type(name, (), {"__init__": refuse})

    modules = {name: _module(name) for name in (
        "torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
        "torchvision.transforms.functional", "torchvision.datasets", "torchvision.utils")}
    modules["torchvision"].__version__ = "0.0.0+stand-in"
    modules["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
    modules["torchvision.transforms.functional"].InterpolationMode = InterpolationMode
    modules["torchvision.transforms"].InterpolationMode = InterpolationMode
    for name in ("torchvision.transforms", "torchvision.transforms.functional", "torchvision.datasets",
                 "torchvision.utils"):
        modules[name].__getattr__ = unavailable
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
        sys.modules[name] = module


def import_timm():
    """timm, importable next to the CPU torch (see the module docstring)."""
    try:
        importlib.import_module("torchvision")
    except Exception:  # missing, or a wheel built for another torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        _stand_in_torchvision()
    import timm

    return timm


def build(name: str, seed: int = 0, **kwargs):
    """timm model `name` in eval mode, randomly initialized, with randomized BatchNorm statistics."""
    import torch

    from .common import randomize

    timm = import_timm()
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    return randomize(model, seed)


def timm_convert(model):
    """timm's own conversion (each family's reparameterize/fuse) applied to a copy of `model`."""
    from timm.utils.model import reparameterize_model

    return reparameterize_model(copy.deepcopy(model)).eval()
