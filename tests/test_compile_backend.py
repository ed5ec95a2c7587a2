"""torch.compile(backend="repfuse"): fuses inference graphs, keeps weights live, passes training through."""

import pytest
import torch
import torch.nn.functional as F

import blocks as B
from repfuse.backends import pytorch as backend


class Recorder:
    """An inner compiler that keeps the graphs it is handed and runs them eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def convs(self):
        return sum(n.target in (torch.conv2d, F.linear) for n in self.graphs[-1].graph.nodes)

    def batchnorms(self):
        return sum(n.target is F.batch_norm for n in self.graphs[-1].graph.nodes)


@pytest.fixture(autouse=True)
def _reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(model, inner):
    return torch.compile(model, backend="repfuse", options={"inner": inner})


def assert_close(a, b):
    assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()


def test_backend_is_registered_by_entry_point():
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    assert "repfuse" in list_backends(exclude_tags=())
    assert lookup_backend("repfuse") is backend.repfuse_backend


def test_eval_no_grad_model_is_fused():
    model = B.randomize(B.TinyRepNet())
    x = torch.randn(2, 3, 32, 32)
    rec = Recorder()
    with torch.no_grad():
        out = compiled(model, rec)(x)
        ref = model(x)
    assert_close(out, ref)
    assert rec.convs() == 7 and rec.batchnorms() == 0


@pytest.mark.parametrize("mode", ["train", "grad"])
def test_training_graph_passes_through_unchanged(mode):
    model = B.randomize(B.RepVGGBlock(8, 8))
    x = torch.randn(2, 8, 9, 9)
    rec = Recorder()
    if mode == "train":
        model.train()
        with torch.no_grad():
            compiled(model, rec)(x)
    else:  # eval BN, but grad enabled and parameters require grad
        compiled(model, rec)(x)
    assert rec.convs() == 2 and rec.batchnorms() == 3


def test_two_instances_get_their_own_weights():
    rec = Recorder()
    m1, m2 = B.randomize(B.RepVGGBlock(8, 8), 1), B.randomize(B.RepVGGBlock(8, 8), 2)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        y1, y2 = compiled(m1, rec)(x), compiled(m2, rec)(x)
        assert_close(y1, m1(x))
        assert_close(y2, m2(x))
        assert (y1 - y2).abs().max() > 1e-2


def test_weights_follow_load_state_dict_and_in_place_edits():
    rec = Recorder()
    model = B.randomize(B.DBB(8, 8), 1)
    x = torch.randn(2, 8, 9, 9)
    f = compiled(model, rec)
    with torch.no_grad():
        f(x)
        model.load_state_dict(B.randomize(B.DBB(8, 8), 7).state_dict())
        assert_close(f(x), model(x))
        model.kxk[0].weight.mul_(3.0)
        assert_close(f(x), model(x))
        model.avg_bn.running_var.add_(1.0)
        assert_close(f(x), model(x))


def test_fused_weights_are_cached_until_a_parameter_changes():
    rec = Recorder()
    model = B.randomize(B.RepVGGBlock(8, 8))
    x = torch.randn(2, 8, 9, 9)
    f = compiled(model, rec)
    with torch.no_grad():
        f(x)
        graph = [g for g in backend.compiled_graphs() if g.original.graph is not None][-1]
        start = graph.recomputes
        for _ in range(3):
            f(x)
        assert graph.recomputes == start
        model.one[1].bias.add_(0.5)
        assert_close(f(x), model(x))
        assert graph.recomputes == start + 1 and not graph._use_fallback  # same plan: still the fused graph
        f(x)
        assert graph.recomputes == start + 1


class ConvBNThenConv(torch.nn.Module):
    """conv-BN (fused) -> relu -> plain conv (nothing to fuse: its weight stays a graph input)."""

    def __init__(self):
        super().__init__()
        self.first = B.conv_bn(4, 8, 3, 1, 1)
        self.second = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.second(F.relu(self.first(x)))


def placeholders(gm):
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


@pytest.mark.parametrize("make", [B.TinyRepNet, B.SharedWeight, ConvBNThenConv])
def test_inner_graph_takes_only_the_inputs_it_reads(make):
    model = B.randomize(make())
    x = torch.randn(2, 3 if make is B.TinyRepNet else 4 if make is ConvBNThenConv else 8, 16, 16)
    rec = Recorder()
    f = compiled(model, rec)
    with torch.no_grad():
        assert_close(f(x), model(x))
        inner = placeholders(rec.graphs[-1])
        assert inner and all(n.users for n in inner)
        graph = backend.compiled_graphs()[-1]
        assert len(inner) < len(placeholders(graph.original)) + len(graph._tensors)
        for i, t in enumerate(list(model.parameters()) + list(model.buffers())):  # every weight, in place
            if t.is_floating_point():
                t.mul_(1.0 + 0.1 * (i % 3))
        assert_close(f(x), model(x))


def test_parameters_outside_fused_regions_are_read_live():
    rec = Recorder()
    model = B.randomize(ConvBNThenConv())
    x = torch.randn(2, 4, 9, 9)
    f = compiled(model, rec)
    with torch.no_grad():
        f(x)
        graph = backend.compiled_graphs()[-1]
        start = graph.recomputes
        model.second.weight.mul_(-2.0)  # not a source of any fused tensor: no recompute needed
        assert_close(f(x), model(x))
        assert graph.recomputes == start
        model.first[1].running_var.mul_(2.0)
        assert_close(f(x), model(x))
        assert graph.recomputes == start + 1


def test_weights_that_break_exactness_fall_back_to_unfused():
    rec = Recorder()
    model = B.randomize(B.BNConv(padding=1))
    with torch.no_grad():  # zero BN shift: BN -> padded conv is exact and fused
        model.bn.running_mean.zero_()
        model.bn.bias.zero_()
    x = torch.randn(2, 4, 9, 9)
    f = compiled(model, rec)
    with torch.no_grad():
        assert_close(f(x), model(x))
        assert rec.batchnorms() == 0
        model.bn.bias.add_(1.0)  # now the border differs: the fused graph would be wrong
        assert_close(f(x), model(x))


@pytest.mark.slow
def test_inner_inductor_matches_eager():
    model = B.randomize(B.RepVGGBlock(8, 16, stride=2))
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        assert_close(torch.compile(model, backend="repfuse")(x), model(x))


@pytest.mark.parametrize("options, message", [
    ({"innr": "eager"}, r"unknown options \['innr'\] \(known: inner, explain, disable, enable, freezing\)"),
    ({"inner": "inductr"}, r"unknown inner compiler 'inductr'"),
    ({"disable": "afine"}, r"repfuse backend: unknown rule 'afine'"),
])
def test_unknown_option_is_a_clear_error(options, message):
    import traceback

    model = B.randomize(B.ConvBN())
    with pytest.raises(ValueError, match=message) as raised:
        with torch.no_grad():
            torch.compile(model, backend="repfuse", options=options)(torch.randn(1, 4, 5, 5))
    shown = "".join(traceback.format_exception(raised.value))
    assert "output_graph.py" not in shown and "convert_frame.py" not in shown  # dynamo's frames cut off


def test_seed_paper_rules_run_in_the_backend_and_follow_weight_edits():
    import rewrite_blocks as RB

    model, rec = RB.DynamicNet(K=4), Recorder()
    f = torch.compile(model, backend="repfuse", options={"inner": rec})
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert_close(f(x), model(x))
        assert sum(n.target is torch.conv2d for n in rec.graphs[-1].graph.nodes) == 3  # stem + 2 aggregated
        for conv in model.dense.convs:
            conv.weight.mul_(1.5)  # in place: the aggregated kernels are recomputed
        assert_close(f(x), model(x))


@pytest.mark.parametrize("options, producer", [({}, 6), ({"disable": ["dead_channels"]}, 8)], ids=["on", "off"])
def test_backend_rule_switches(options, producer):
    import rewrite_blocks as RB

    model, rec = RB.DeadChannels(0.5, 1, 0), Recorder()
    f = torch.compile(model, backend="repfuse", options={"inner": rec, **options})
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert_close(f(x), model(x))
    weights = [v for v in backend.compiled_graphs() if v.graph_module is rec.graphs[-1]][0]._tensors
    assert weights[0].shape[0] == producer


def test_backend_refuses_unknown_rules():
    with pytest.raises(Exception, match="unknown rule"):
        with torch.no_grad():
            torch.compile(torch.nn.Conv2d(3, 3, 1), backend="repfuse", options={"disable": ["bogus"]})(
                torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("how", ["option", "inductor_config"])
def test_freezing_bakes_every_weight_into_the_graph(how):
    from torch._inductor import config

    model = B.randomize(torch.nn.Sequential(B.RepVGGBlock(4, 8), B.RepVGGBlock(8, 8))).eval()
    x = torch.randn(2, 4, 16, 16)
    rec = Recorder()
    options = {"inner": rec, "freezing": True} if how == "option" else {"inner": rec}
    fn = torch.compile(model, backend="repfuse", options=options)
    with torch.no_grad(), config.patch(freezing=how == "inductor_config"):
        want = model(x)
        assert_close(fn(x), want)
        gm = rec.graphs[-1]
        assert rec.convs() == 2 and rec.batchnorms() == 0
        assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == 1  # the image; weights are attributes
        assert [g for g in backend.compiled_graphs() if isinstance(g, backend.FrozenGraph)]
        # like inductor's freezing: an edit after compiling is not seen (the unfrozen backend follows it)
        next(model.parameters()).mul_(2)
        assert_close(fn(x), want)
        assert not torch.allclose(model(x), want)


def test_freezing_with_inductor_matches_eager():
    model = B.randomize(B.RepVGGBlock(4, 4)).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        got = torch.compile(model, backend="repfuse", options={"freezing": True})(x)
        assert_close(got, model(x))
