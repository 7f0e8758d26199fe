"""fxprune.flops (fxprune.report): dense = fvcore, effective = hand counts on toy models, report schema."""
import importlib
import json
import math

import pytest
import timm
import torch
import torch.nn.utils.parametrize as parametrize
from fvcore.nn import FlopCountAnalysis
from torch import nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.report import FlopCountError, FlopReport, flops, register_flop_handle
from fxprune.report import handles as handles_module
from hyperflux_models import WeightMask


def fvcore_total(model, inputs):
    """Plain fvcore, without fxprune's handles."""
    return FlopCountAnalysis(model, inputs).unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()


# ---------------------------------------------------------------------------------------------
# dense == fvcore on real models

TIMM_CASES = [("resnet18", {}, 32), ("mobilenetv3_small_050", {}, 32), ("efficientnet_b0", {}, 32),
              ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, 32)]


@pytest.mark.parametrize("name,kwargs,size", TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_dense_equals_fvcore_on_timm(name, kwargs, size):
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    report = flops(model, x, name=name)
    assert report.effective == report.dense and report.saved == 0.0
    if name.startswith("vit"):  # fvcore alone misses attention: 2 blocks x 3 heads x L=S=5 x (64 + 64)
        assert report.dense - fvcore_total(model, (x,)) == 2 * 3 * 5 * 5 * 128
        assert "aten::scaled_dot_product_attention" not in report.unsupported_ops
    else:  # no op with an extra handle: plain fvcore agrees
        assert report.dense == fvcore_total(model, (x,))
    assert sum(c.dense for k, c in report.by_module(depth=1).items() if k) <= report.dense


def test_pyg_gcn_with_edge_index():
    from fxprune.app.models import build

    model, inputs = build("pyg:GCN", [(40, 12)])
    report = flops(model, inputs)
    assert report.dense == fvcore_total(model, inputs) > 0
    assert report.input_shapes == [[40, 12], [2, 2 * 40 * 4]]
    assert any(op.startswith("aten::scatter") for op in report.unsupported_ops)  # listed, not hidden


def test_torch_compile_wrapper_is_counted_through_orig_mod():
    model = _toy()
    x = torch.randn(2, 3, 8, 8)
    plain = flops(model, x)
    compiled = flops(torch.compile(model), x)
    assert compiled.dense == plain.dense and compiled.by_module() == plain.by_module()
    model.compile()  # in place: nn.Module.compile
    assert flops(model, x).dense == plain.dense


# ---------------------------------------------------------------------------------------------
# effective == hand counts

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


def _toy():
    torch.manual_seed(0)
    return Toy().eval()


CONV = 2 * (8 * 3 * 3 * 3) * (6 * 6)  # batch 2: 15552 MACs
FC = 2 * (8 * 6 * 6) * 10  # 5760 MACs


def test_statically_sparse_conv_and_linear():
    model = _toy()
    with torch.no_grad():
        model.conv.weight[:4] = 0  # half the filters
        model.fc.weight[:, : 72] = 0  # a quarter of the weights
    r = flops(model, torch.randn(2, 3, 8, 8))
    assert r.dense == CONV + FC
    assert r.effective == pytest.approx(CONV / 2 + FC * 3 / 4)
    assert r.by_module()["conv"] == (CONV, pytest.approx(CONV / 2))
    assert r.by_module()["fc"] == (FC, pytest.approx(FC * 3 / 4))
    assert r.by_operator()["conv"].effective == pytest.approx(CONV / 2)
    assert r.saved == pytest.approx(1 - (CONV / 2 + FC * 3 / 4) / (CONV + FC))


def test_parametrized_gate_counts_effective_weight():
    model = _toy().train()
    mask = torch.ones_like(model.conv.weight)
    mask.view(-1)[::3] = 0  # 72 of 216 weights closed
    parametrize.register_parametrization(model.conv, "weight", WeightMask(mask))
    r = flops(model, torch.randn(2, 3, 8, 8), unit="flop")
    assert r.dense == 2 * (CONV + FC)
    assert r.effective == pytest.approx(2 * (CONV * 144 / 216 + FC))
    assert r.unsupported_ops.get("aten::mul") == 1  # the gate's multiply is listed, not counted
    assert model.training and model.conv.training  # flags restored


class FakeExPruneConv(nn.Module):
    """Speaks the ExPrune op protocol: declares it skipped ``skip`` of its MACs plus ``overhead``."""

    def __init__(self, conv, skip, overhead=0.0):
        super().__init__()
        self.conv, self.skip, self.overhead = conv, skip, overhead
        self.reset_stats()

    def reset_stats(self):
        self.dense = self.effective = 0.0

    def mac_counts(self):
        return self.dense, self.effective

    def forward(self, x):
        y = self.conv(x)
        macs = x.shape[0] * self.conv.weight.numel() * y.shape[-1] * y.shape[-2]
        self.dense += macs
        self.effective += macs * (1 - self.skip) + self.overhead
        return y


def test_exprune_op_records_are_applied():
    model = _toy()
    model.conv = FakeExPruneConv(model.conv, skip=0.25, overhead=100)
    r = flops(model, torch.randn(2, 3, 8, 8))
    assert r.dense == CONV + FC
    assert r.effective == pytest.approx(CONV * 0.75 + 100 + FC)
    assert r.by_module()["conv"].effective == pytest.approx(CONV * 0.75 + 100)
    assert r.by_operator()["conv"].effective == pytest.approx(CONV * 0.75 + 100)
    assert r.exprune_ops == {"conv": (CONV, CONV * 0.75 + 100)}


def test_exprune_op_that_prunes_nothing_costs_its_declared_overhead():
    model = _toy()
    model.conv = FakeExPruneConv(model.conv, skip=0.0, overhead=36)
    r = flops(model, torch.randn(2, 3, 8, 8))
    assert r.effective == r.dense + 36


class _OpaqueConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        return torch.nn.functional.conv2d(x, w)


class OpaqueExPruneConv(FakeExPruneConv):
    """The conv runs inside a custom autograd Function: fvcore sees prim::PythonOp, counts 0."""

    def forward(self, x):
        y = _OpaqueConv.apply(x, self.conv.weight)
        macs = x.shape[0] * self.conv.weight.numel() * y.shape[-1] * y.shape[-2]
        self.dense += macs
        self.effective += macs * (1 - self.skip)
        return y


def test_exprune_op_fvcore_cannot_see_is_counted_from_its_records():
    model = _toy()
    model.conv = OpaqueExPruneConv(model.conv, skip=0.5)
    with torch.no_grad():
        model.conv.conv.weight[:4] = 0  # the op's records win: zeros are not counted twice
    r = flops(model, torch.randn(2, 3, 8, 8))
    assert "prim::PythonOp._OpaqueConv" in r.unsupported_ops
    assert r.dense == CONV + FC and r.effective == CONV / 2 + FC
    assert r.by_operator()["exprune"] == (CONV, CONV / 2)
    assert r.notes


def test_only_innermost_exprune_ops_are_read():
    class Runtime(nn.Module):  # a container that also aggregates mac_counts
        def __init__(self, op):
            super().__init__()
            self.op = op

        def reset_stats(self):
            self.op.reset_stats()

        def mac_counts(self):
            return self.op.mac_counts()

        def forward(self, x):
            return self.op(x)

    class Aggregator(nn.Module):  # holds plain references to the ops, is never called
        def __init__(self, ops):
            super().__init__()
            self.ops = ops

        def reset_stats(self):
            for op in self.ops.values():
                op.reset_stats()

        def mac_counts(self):
            return tuple(map(sum, zip(*(op.mac_counts() for op in self.ops.values()))))

    model = _toy()
    model.conv = Runtime(FakeExPruneConv(model.conv, skip=0.5))
    model.runtime = Aggregator({"conv": model.conv.op})
    r = flops(model, torch.randn(2, 3, 8, 8))
    assert list(r.exprune_ops) == ["conv.op"] and r.effective == CONV / 2 + FC
    assert r.dense == CONV + FC and not r.notes


class TwoConvs(nn.Module):
    """conv2 -> relu is an ExPrune site (conv1 reduces over the model input: no site)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


CONV2 = 2 * (8 * 8 * 3 * 3) * (8 * 8)  # batch 2: 73728 MACs


def test_wrapped_model_that_prunes_nothing():
    config = fxprune.ExPruneConfig(k=4)  # the safe setting: T = -inf, no test runs, nothing skipped
    torch.manual_seed(0)
    model = TwoConvs().eval()
    x = torch.randn(2, 3, 8, 8)
    wrapped = fxprune.wrap(model, x, exprune=config)
    r = flops(wrapped, x)
    overhead = sum(c.effective - c.dense for c in r.exprune_ops.values())
    assert list(r.exprune_ops) == ["conv2.exprune"] and r.exprune_ops["conv2.exprune"] == (CONV2, CONV2)
    assert r.dense == flops(model, x).dense
    assert r.effective == pytest.approx(r.dense + overhead)
    assert r.effective == r.dense and r.by_module()["conv2.exprune"] == (CONV2, CONV2)


def test_hyperflux_gates_close_weights():
    config = fxprune.HyperfluxConfig(0.5, pruning_steps=10)
    model = _toy()
    x = torch.randn(2, 3, 8, 8)
    wrapped = fxprune.wrap(model, x, hyperflux=config)
    assert flops(wrapped, x).effective == CONV + FC  # all gates open
    gates = {name: getattr(wrapped, name).parametrizations.weight[0] for name in ("conv", "fc")}
    with torch.no_grad():
        gates["conv"].scores.score[:4] = -1.0  # close half the filters
        gates["fc"].scores.score[:, :72] = -1.0  # and a quarter of the fc weights
    r = flops(wrapped, x)
    assert r.dense == CONV + FC and r.effective == pytest.approx(CONV / 2 + FC * 3 / 4)
    assert not any("StraightThrough" in op for op in r.unsupported_ops)  # the gate is declared free


def test_sdpa_handle_hand_count():
    class Attn(nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 6)
    assert flops(Attn(), (q, k, v)).dense == 2 * 4 * 5 * 7 * (8 + 6)


def test_register_flop_handle(monkeypatch):
    monkeypatch.setattr(handles_module, "REGISTERED_HANDLES", {})  # registrations end with the test
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)).eval()
    x = torch.randn(1, 3, 10, 10)
    assert "aten::max_pool2d" in flops(model, x).unsupported_ops
    # one comparison per window element beyond the first: 4 channels x 4 x 4 outputs x 3
    register_flop_handle("aten::max_pool2d", lambda inputs, outputs: 4 * 4 * 4 * 3)
    r = flops(model, x)
    assert "aten::max_pool2d" not in r.unsupported_ops and r.by_operator()["max_pool2d"].dense == 192
    with pytest.raises(ConfigError):
        register_flop_handle("max_pool2d", None)


# ---------------------------------------------------------------------------------------------
# report API and schema

SCHEMA_KEYS = {"schema", "model", "input_shapes", "unit", "dense", "effective", "saved", "by_module",
               "by_operator", "unsupported_ops", "exprune_ops", "notes"}


@pytest.fixture(scope="module")
def sparse_report():
    model = _toy()
    with torch.no_grad():
        model.conv.weight[:2] = 0
    return flops(model, torch.randn(2, 3, 8, 8), name="toy")


def test_json_schema_is_stable(sparse_report):
    d = json.loads(sparse_report.to_json())
    assert set(d) == SCHEMA_KEYS
    assert d["schema"] == "fxprune.flops/1" and d["model"] == "toy" and d["unit"] == "mac"
    assert d["input_shapes"] == [[2, 3, 8, 8]]
    assert d["dense"] == CONV + FC and d["effective"] == pytest.approx(CONV * 0.75 + FC)
    assert set(d["by_module"]) == {"", "conv", "fc"}
    assert d["by_module"]["conv"] == {"type": "Conv2d", "dense": CONV, "effective": CONV * 0.75}
    assert set(d["by_operator"]) == {"conv", "linear"}
    assert all(set(v) == {"dense", "effective"} for v in d["by_operator"].values())
    again = FlopReport.from_dict(d)
    assert again.to_dict() == d
    assert json.loads(sparse_report.with_unit("flop").to_json())["dense"] == 2 * (CONV + FC)


def test_renderings(sparse_report, tmp_path):
    table = sparse_report.table(depth=1)
    assert "dense MACs" in table and "effective MACs" in table and "saved" in table
    assert "not measured time" in table and " conv " in table
    assert "| `conv`" in sparse_report.to_markdown()
    rows = sparse_report.to_csv().splitlines()
    assert rows[0] == "module,type,depth,unit,dense,effective,saved" and len(rows) == 4
    assert list(sparse_report.by_module(depth=0)) == [""]
    png = sparse_report.plot(str(tmp_path / "bars.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_before_after(sparse_report, tmp_path):
    before = flops(_toy(), torch.randn(2, 3, 8, 8), name="dense toy")
    path = tmp_path / "before.json"
    path.write_text(before.with_unit("flop").to_json())
    cmp = sparse_report.compare(str(path))  # units are converted to the after report's
    rows = {k: (b, a) for k, b, a in cmp.rows(depth=None)}
    assert rows["conv"][0] == (CONV, CONV) and rows["conv"][1] == (CONV, CONV * 0.75)
    assert "-25.0%" in cmp.table()
    assert set(json.loads(cmp.to_json())) == {"schema", "unit", "before", "after"}


def test_errors():
    with pytest.raises(ConfigError, match="unknown unit"):
        flops(_toy(), torch.randn(2, 3, 8, 8), unit="gflop")

    class ReturnsObject(nn.Module):
        def forward(self, x):
            return object()

    with pytest.raises(FlopCountError, match="ReturnsObject"):
        flops(ReturnsObject(), torch.randn(1))
    with pytest.raises(FlopCountError, match="example inputs"):
        flops(_toy(), torch.randn(2, 5, 8, 8))


def test_fxprune_flops_is_callable_even_after_submodule_import():
    for module in ("fxprune.report", "fxprune.report.count", "fxprune.report.flop_report"):
        importlib.import_module(module)
    r = fxprune.flops(_toy(), torch.randn(2, 3, 8, 8))
    assert r.dense == CONV + FC and math.isclose(r.saved, 0.0)
