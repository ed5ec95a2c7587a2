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
    model = B.randomize(B.RepVGGBlock())
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
    m1, m2 = B.randomize(B.RepVGGBlock(), 1), B.randomize(B.RepVGGBlock(), 2)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        y1, y2 = compiled(m1, rec)(x), compiled(m2, rec)(x)
        assert_close(y1, m1(x))
        assert_close(y2, m2(x))
        assert (y1 - y2).abs().max() > 1e-2


def test_weights_follow_load_state_dict_and_in_place_edits():
    rec = Recorder()
    model = B.randomize(B.DBBBlock(), 1)
    x = torch.randn(2, 8, 9, 9)
    f = compiled(model, rec)
    with torch.no_grad():
        f(x)
        model.load_state_dict(B.randomize(B.DBBBlock(), 7).state_dict())
        assert_close(f(x), model(x))
        model.kxk[0].weight.mul_(3.0)
        assert_close(f(x), model(x))
        model.avg_bn.running_var.add_(1.0)
        assert_close(f(x), model(x))


def test_fused_weights_are_cached_until_a_parameter_changes():
    rec = Recorder()
    model = B.randomize(B.RepVGGBlock())
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
        assert graph.recomputes == start + 1
        f(x)
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


def test_unknown_option_is_a_clear_error():
    model = B.randomize(B.ConvBN())
    with pytest.raises(Exception, match="unknown options"):
        with torch.no_grad():
            torch.compile(model, backend="repfuse", options={"innr": "eager"})(torch.randn(1, 4, 5, 5))
