"""The Python API a torch user expects: eval-mode results, clear errors that say what is wrong, readable
parameter names, a documented save/load round trip.  Numbers are compared with the model in torch."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import blocks as B
import repfuse


def net():
    return B.randomize(nn.Sequential(B.RepVGGBlock(3, 8), B.RepVGGBlock(8, 8), nn.AdaptiveAvgPool2d(1))).eval()


def close(gm, model, x):
    with torch.no_grad():
        want = model.eval()(x)
        assert float((gm(x) - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_training_mode_model_warns_and_deploys_its_eval_form():
    model = net().train()
    with pytest.warns(UserWarning, match="in training mode; deploying its eval"):
        gm = repfuse.deploy(model, (torch.randn(2, 3, 8, 8),))
    assert model.training  # the caller's model is left as it was
    assert not gm.training
    close(gm, model, torch.randn(3, 3, 10, 8))
    assert gm.meta["repfuse_report"].after.ops["batch_norm"] == 0


@pytest.mark.parametrize("inputs, message", [
    (lambda: (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)), "the example inputs do not match Sequential.forward"),
    (lambda: (), "missing a required argument"),
])
def test_mismatched_example_inputs_are_named(inputs, message):
    with pytest.raises(TypeError, match=message):
        repfuse.deploy(net(), inputs())


def test_a_function_is_refused_with_the_way_out():
    with pytest.raises(TypeError, match=r"takes a torch.nn.Module, not function \(wrap a function in a Module"):
        repfuse.deploy(lambda x: x * 2, (torch.randn(2, 3),))


@pytest.mark.parametrize("capture", ["fast", "export"])
def test_parameter_names_come_from_module_paths(capture, monkeypatch):
    if capture == "export":
        from repfuse.backends import pytorch as backend

        monkeypatch.setattr(backend, "trace", lambda *args: None)
    model = net()
    gm = repfuse.deploy(model, (torch.randn(2, 3, 8, 8),))
    names = [n for n, _ in gm.named_parameters()]
    assert names and all(re.fullmatch(r"layer_[01](_\w+)?_(weight|bias)(_\d+)?", n) for n in names), names
    assert not any("repfuse_c" in n or "L__self" in n for n in names)
    close(gm, model, torch.randn(2, 3, 8, 8))


def test_save_and_load_round_trip(tmp_path):
    """README: torch.save(deployed, path); torch.load(path, weights_only=False)."""
    model = net()
    gm = repfuse.deploy(model, (torch.randn(2, 3, 8, 8),))
    torch.save(gm, tmp_path / "deployed.pt")
    loaded = torch.load(tmp_path / "deployed.pt", weights_only=False)
    x = torch.randn(4, 3, 12, 10)
    close(loaded, model, x)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    assert loaded.meta.get("repfuse_report") is None or loaded.meta["repfuse_report"].after.convs == 2


def test_rule_names_may_be_one_string():
    model = net()
    gm = repfuse.deploy(model, (torch.randn(2, 3, 8, 8),), disable="affine")
    report = gm.meta["repfuse_report"]
    assert report.after.convs == report.before.convs == 4 and report.after.ops["batch_norm"] == 5  # nothing merged
    with pytest.raises(ValueError, match="unknown rule 'afine'"):
        repfuse.deploy(model, (torch.randn(2, 3, 8, 8),), disable="afine")


def test_dir_shows_the_public_api():
    assert {"deploy", "optimize_onnx", "ShapeGuardError", "TraceError", "__version__"} <= set(dir(repfuse))


@pytest.mark.parametrize("capture", ["fast", "export"])
def test_report_regions_name_module_paths(capture, monkeypatch):
    if capture == "export":
        from repfuse.backends import pytorch as backend

        monkeypatch.setattr(backend, "trace", lambda *args: None)
    model = net()
    report = repfuse.deploy(model, (torch.randn(2, 3, 8, 8),)).meta["repfuse_report"]
    roots = [r.root for r in report.regions]
    assert len(roots) == 2 and roots[0].startswith("0/") and roots[1].startswith("1/"), roots
    assert all("L__self" not in r and "L['" not in r for r in roots)
