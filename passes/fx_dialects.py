"""FX's three dialects in one vocabulary: every node read as `Call(op, args)` with named arguments.

Module calls (symbolic_trace), torch-level functional calls (dynamo) and aten calls
(torch.export) name the same op differently and order its arguments differently; the
tables below map each target to one op name and its argument names, so each reader in
`passes.fx.READERS` is written once.  A new target is one `_register` line.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from ..patterns.affine import Declined

aten = torch.ops.aten

__all__ = ["Call", "normalize", "CONV_MODULES", "IN_PLACE", "SHAPE_OF_OTHER"]


@dataclass(frozen=True, eq=False)
class Call:
    """A node in the common vocabulary: `op` and its arguments by name (constants as values)."""

    op: str
    args: dict

    def __getitem__(self, name):
        return self.args.get(name)


# function or aten target -> (op, argument names in order, defaults)
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_BN_TORCH = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_BINARY = ("input", "other")
_UNARY = ("input",)
_FUNCTIONS: dict[Any, tuple[str, tuple, dict]] = {}


def _register(targets, op: str, names: tuple, **defaults) -> None:
    for t in targets:
        _FUNCTIONS[t] = (op, names, defaults)


_register([torch.conv1d, torch.conv2d, torch.conv3d, aten.conv1d.default, aten.conv2d.default,
           aten.conv3d.default], "conv", _CONV_ARGS, stride=1, padding=0, dilation=1, groups=1)
_register([aten.convolution.default], "conv", _CONV_ARGS[:6] + ("transposed", "output_padding", "groups"))
_register([torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d, aten.conv_transpose1d.default,
           aten.conv_transpose2d.input, aten.conv_transpose3d.input], "conv_transpose",
          ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
          stride=1, padding=0, output_padding=0, groups=1, dilation=1)
_register([F.batch_norm], "batch_norm", ("input", "running_mean", "running_var", "weight", "bias", "training",
                                         "momentum", "eps"), training=False, eps=1e-5)
_register([torch.batch_norm, aten.batch_norm.default], "batch_norm", _BN_TORCH)
_register([F.linear, aten.linear.default], "linear", ("input", "weight", "bias"))
_register([aten.addmm.default], "addmm", ("bias", "input", "mat2"), beta=1, alpha=1)
_register([aten.mm.default, torch.matmul, operator.matmul], "matmul", ("input", "mat2"))
_register([F.pad, torch._C._nn.pad, aten.pad.default], "pad", ("input", "pad", "mode", "value"), mode="constant")
_register([aten.constant_pad_nd.default], "pad", ("input", "pad", "value"), mode="constant", value=0)
_register([torch.avg_pool1d, F.avg_pool2d, F.avg_pool3d, aten.avg_pool1d.default, aten.avg_pool2d.default,
           aten.avg_pool3d.default], "avg_pool", _POOL_ARGS, padding=0, ceil_mode=False, count_include_pad=True)
# in-place forms write into their first operand: read only where nothing else sees that write (fx.py)
IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, aten.add_.Tensor, aten.sub_.Tensor,
            aten.mul_.Tensor, aten.div_.Tensor, "add_", "sub_", "mul_", "div_"}
for _op, _targets in {"add": (operator.add, operator.iadd, torch.add, aten.add.Tensor, "add", aten.add_.Tensor, "add_"),
                      "sub": (operator.sub, operator.isub, torch.sub, aten.sub.Tensor, "sub", aten.sub_.Tensor, "sub_"),
                      "mul": (operator.mul, operator.imul, torch.mul, aten.mul.Tensor, "mul", aten.mul_.Tensor, "mul_"),
                      "div": (operator.truediv, operator.itruediv, torch.div, aten.div.Tensor, "div", aten.div_.Tensor,
                              "div_")}.items():
    _register(_targets, _op, _BINARY, alpha=1)
_register([operator.neg, torch.neg, aten.neg.default, "neg"], "neg", _UNARY)
_register([torch.cat, torch.concat, aten.cat.default], "cat", ("tensors", "dim"), dim=0)
_register([torch.clone, aten.clone.default, "clone", "contiguous", aten.alias.default], "identity", _UNARY)
_register([F.dropout], "dropout", ("input", "p", "training"), training=True)
_register([torch.dropout, aten.dropout.default], "dropout", ("input", "p", "train"))
_register([operator.getitem], "getitem", ("input", "index"))
_register([torch.flatten, aten.flatten.using_ints, "flatten"], "regroup", ("input", "start_dim", "end_dim"))
_register([torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default, "reshape", "view"],
          "regroup", ("input", "shape"))
# reshape_as / view_as read `other` for its shape only (passes.fx: not a reader of its value)
SHAPE_OF_OTHER = {aten.reshape_as.default, aten.view_as.default, "reshape_as", "view_as"}
_register(SHAPE_OF_OTHER, "regroup", ("input", "other"))
_register([torch.permute, aten.permute.default, "permute"], "permute", ("input", "dims"))
_register([torch.transpose, torch.swapaxes, aten.transpose.int, "transpose", "swapaxes"], "transpose",
          ("input", "dim0", "dim1"))
_register([F.hardtanh, aten.hardtanh.default], "clamp", ("input", "min_val", "max_val"), min_val=-1.0, max_val=1.0)
_register([torch.clamp, aten.clamp.default, "clamp"], "clamp", ("input", "min", "max"))
for _fn, _targets in {"relu": (F.relu, torch.relu, aten.relu.default, "relu"), "relu6": (F.relu6,),
                      "sigmoid": (F.sigmoid, torch.sigmoid, aten.sigmoid.default, "sigmoid"),
                      "hardsigmoid": (F.hardsigmoid, aten.hardsigmoid.default),
                      "hardswish": (F.hardswish, aten.hardswish.default), "silu": (F.silu, aten.silu.default),
                      "tanh": (torch.tanh, aten.tanh.default, "tanh")}.items():
    _register(_targets, "activation", _UNARY, fn=_fn)
_ALIASES = {"min_val": "min", "max_val": "max", "train": "training", "running_mean": "mean", "running_var": "var"}

CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_TRANSPOSE_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid",
                       nn.Hardswish: "hardswish", nn.SiLU: "silu", nn.Tanh: "tanh"}
_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)


def _module_tensor(t):
    if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
        raise Declined("weights require grad while grad is enabled (training graph)")
    return None if t is None else t.detach()


def _module_call(mod: nn.Module, x) -> Call | None:
    t = type(mod)
    if t in CONV_MODULES:
        if mod.padding_mode != "zeros":
            raise Declined(f"padding_mode={mod.padding_mode!r}")
        return Call("conv", dict(input=x, weight=_module_tensor(mod.weight), bias=_module_tensor(mod.bias),
                                 stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups))
    if t in _CONV_TRANSPOSE_MODULES:  # a call that passes output_size is declined by the reader (fx.py)
        return Call("conv_transpose", dict(input=x, weight=_module_tensor(mod.weight), bias=_module_tensor(mod.bias),
                                           stride=mod.stride, padding=mod.padding, output_padding=mod.output_padding,
                                           groups=mod.groups, dilation=mod.dilation))
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        if mod.training or mod.running_mean is None:
            raise Declined("BatchNorm uses batch statistics (training mode or no running stats)")
        return Call("batch_norm", dict(input=x, mean=_module_tensor(mod.running_mean), var=mod.running_var.detach(),
                                       weight=_module_tensor(mod.weight), bias=_module_tensor(mod.bias),
                                       training=False, eps=mod.eps))
    if t is nn.Linear:
        return Call("linear", dict(input=x, weight=_module_tensor(mod.weight), bias=_module_tensor(mod.bias)))
    if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        return Call("avg_pool", dict(input=x, kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding,
                                     ceil_mode=mod.ceil_mode, count_include_pad=mod.count_include_pad,
                                     divisor_override=getattr(mod, "divisor_override", None)))
    if isinstance(mod, _PAD_MODULES):
        return Call("pad", dict(input=x, pad=mod.padding, mode="constant", value=float(getattr(mod, "value", 0.0))))
    if t is nn.Identity or (isinstance(mod, nn.modules.dropout._DropoutNd) and not mod.training):
        return Call("identity", dict(input=x))
    if t in ACTIVATION_MODULES:
        return Call("activation", dict(input=x, fn=ACTIVATION_MODULES[t]))
    if t is nn.Hardtanh:
        return Call("clamp", dict(input=x, min=mod.min_val, max=mod.max_val))
    return None


def normalize(node: fx.Node, gm: nn.Module) -> Call | None:
    """The node in the common vocabulary, or None when it is not an op repfuse reads."""
    if node.op == "call_module":
        return _module_call(gm.get_submodule(node.target), node.args[0] if node.args else None)
    if node.op not in ("call_function", "call_method"):
        return None
    try:
        entry = _FUNCTIONS.get(node.target)
    except TypeError:  # unhashable target
        return None
    if entry is None:
        return None
    op, names, defaults = entry
    args = dict(defaults)
    args.update(zip(names, node.args))
    args.update({k: v for k, v in node.kwargs.items()})
    return Call(op, {_ALIASES.get(k, k): v for k, v in args.items()})
