"""fxprune.deploy on ExPrune sites: skipping kernels equal the wrapped model's ENP ops (linear, fused
consumer, conv with BN and residual; batch 1 and more), dense choices equal the dense chain, the
cost model's choice is a function of the measurements (injected here: nothing is timed), the input
model is untouched, a model never wrapped is an ExportError."""
import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.deploying import DeployChoice, DeployOptions, ExPruneSitesPass
from fxprune.deploying.cost import choose_path
from fxprune.exprune import ExPruneConfig, ExPruneOp
from hypothesis_profiles import examples
from model_gen import random_bn_stats

OPTIONS = DeployOptions(batch_sizes=(1, 3), repeats=1)


class FFN(nn.Module):
    """A ReLU language-model block: proj -> fc1 -> ReLU -> Dropout -> fc2 (fc1 is the ENP site)."""

    def __init__(self, d: int = 12, hidden: int = 40):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(self.proj(x)))))


class ConvNet(nn.Module):
    """conv -> BN -> ReLU (a site), conv -> BN -> + residual -> ReLU (a site), conv1d -> ReLU (a site)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv1d = nn.Conv1d(c, c, 3, padding=1)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + x)
        return self.fc(torch.relu(self.conv1d(y.flatten(2))).mean(2))


def times(table: dict):
    """A measure callable returning fixed milliseconds per path (unlisted paths: 100 ms)."""
    return lambda site, batch, fns, repeats: {path: table.get(path, 100.0) for path in fns}


def run_deploy(wrapped, x, measure, options=OPTIONS):
    return fxprune.deploy(wrapped, x, options=options, passes=(ExPruneSitesPass(measure),))


def outputs(model, x):
    with torch.no_grad():
        return model(x)


def ops(wrapped) -> dict:
    return wrapped.fxprune.exprune.ops


@examples(12)
@given(k=st.integers(1, 11), rule=st.sampled_from(["threshold", "ztest"]), level=st.floats(-0.3, 0.3),
       per_channel=st.booleans(), path=st.sampled_from(["skip_rows", "skip_rows+sparse_fc", "predict+sparse_fc"]),
       seed=st.integers(0, 2**16))
def test_linear_site_equals_the_exprune_op_at_batch_1_and_more(k, rule, level, per_channel, path, seed):
    torch.manual_seed(seed)
    x = torch.randn(2, 5, 12)
    knob = dict(alpha=0.5 + level) if rule == "ztest" else dict(threshold=level)
    wrapped = fxprune.wrap(FFN().eval(), x, exprune=ExPruneConfig(rule=rule, k=k, **knob))
    if per_channel and rule == "threshold":
        ops(wrapped)["fc1"].set_threshold((torch.rand(40) * 0.6 - 0.3).tolist())
    deployed = run_deploy(wrapped, x, times({"dense": 10.0, path: 1.0}))
    assert [(c.name, c.path) for c in deployed.deploy_choices] == [("fc1", path)]
    for batch in (torch.randn(1, 1, 12), torch.randn(1, 7, 12), torch.randn(4, 3, 12)):
        torch.testing.assert_close(outputs(deployed, batch), outputs(wrapped, batch), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["skip_rows+sparse_fc", "predict+sparse_fc"])
def test_with_every_row_predicted_the_fused_consumer_outputs_its_bias(path):
    x = torch.randn(1, 1, 12)
    wrapped = fxprune.wrap(FFN().eval(), x, exprune=ExPruneConfig(k=4, threshold=math.inf))
    deployed = run_deploy(wrapped, x, times({"dense": 10.0, path: 1.0}))
    assert deployed.deploy_choices[0].path == path
    torch.testing.assert_close(outputs(deployed, x), wrapped.fc2.bias.detach().expand(1, 1, 12))
    torch.testing.assert_close(outputs(deployed, x), outputs(wrapped, x))


@examples(6)
@given(k=st.integers(1, 7), rule=st.sampled_from(["threshold", "ztest"]), level=st.floats(-0.5, 0.5),
       seed=st.integers(0, 2**16))
def test_conv_sites_with_bn_and_residual_equal_the_exprune_ops(k, rule, level, seed):
    torch.manual_seed(seed)
    model = random_bn_stats(ConvNet(), seed)
    x = torch.randn(2, 3, 6, 6)
    knob = dict(alpha=0.5 + level) if rule == "ztest" else dict(threshold=level)
    wrapped = fxprune.wrap(model, x, exprune=ExPruneConfig(rule=rule, k=k, **knob))
    if rule == "threshold":  # half the channels always predicted: whole channels are skipped
        t = torch.full((8,), level)
        t[::2] = math.inf
        ops(wrapped)["conv1"].set_threshold(t.tolist())
    deployed = run_deploy(wrapped, x, times({"dense": 10.0, "skip_channels": 1.0}))
    chosen = {c.name: c.path for c in deployed.deploy_choices}
    assert chosen == {name: "skip_channels" for name in ops(wrapped)}, deployed.deploy_choices
    for batch in (torch.randn(1, 3, 6, 6), torch.randn(3, 3, 6, 6)):
        torch.testing.assert_close(outputs(deployed, batch), outputs(wrapped, batch), rtol=1e-4, atol=1e-5)


def test_sites_chosen_dense_output_the_dense_chain():
    x = torch.randn(2, 3, 6, 6)
    wrapped = fxprune.wrap(random_bn_stats(ConvNet()), x, exprune=ExPruneConfig(k=2, threshold=0.1))
    deployed = run_deploy(wrapped, x, times({"dense": 1.0, "skip_channels": 1.02}))
    assert {c.path for c in deployed.deploy_choices} == {"dense"}
    assert all("no candidate is 1.05x faster" in c.reason for c in deployed.deploy_choices)
    plain = fxprune.export(wrapped)
    batch = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(outputs(deployed, batch), outputs(plain, batch))
    assert not torch.allclose(outputs(deployed, batch), outputs(wrapped, batch))  # ExPrune predicted there


def test_a_site_that_predicts_nothing_runs_dense_without_measuring():
    x = torch.randn(2, 5, 12)
    wrapped = fxprune.wrap(FFN().eval(), x, exprune=ExPruneConfig(k=4))  # T = -inf
    measured = []
    deployed = run_deploy(wrapped, x, lambda *args: measured.append(args) or {})
    assert measured == []
    [choice] = deployed.deploy_choices
    assert choice.path == "dense" and "predicts nothing" in choice.reason


def test_the_choice_is_a_function_of_the_measurements():
    both = {"dense": {1: 10.0, 64: 10.0}, "a": {1: 5.0, 64: 9.0}, "b": {1: 8.0, 64: 8.0}}
    assert choose_path(both, 1.05)[0] == "b"  # b's worst speedup (1.25x) beats a's (1.11x)
    assert choose_path(both, 1.2)[0] == "b"
    assert choose_path(both, 1.3) == ("dense", "no candidate is 1.30x faster than dense at every batch size "
                                               "(best: 'b', 1.25x at batch 1)")
    faster_at_1_only = {"dense": {1: 10.0, 64: 10.0}, "a": {1: 1.0, 64: 11.0}}
    assert choose_path(faster_at_1_only, 1.05)[0] == "dense"
    tie = {"dense": {1: 10.0}, "a": {1: 5.0}, "b": {1: 5.0}}
    assert choose_path(tie, 1.05)[0] == "a"
    x = torch.randn(2, 5, 12)
    wrapped = fxprune.wrap(FFN().eval(), x, exprune=ExPruneConfig(k=4, threshold=0.0))
    table = {"dense": 10.0, "skip_rows": 6.0, "skip_rows+sparse_fc": 4.0, "predict+sparse_fc": 5.0}
    measure = times(table)
    first, second = (run_deploy(wrapped, x, measure).deploy_choices for _ in range(2))
    assert first == second
    assert first[0] == DeployChoice("fc1", "skip_rows+sparse_fc", first[0].reason,
                                    {p: {1: t, 3: t} for p, t in table.items()})


def test_deploy_never_mutates_the_wrapped_model_and_leaves_no_fxprune_runtime():
    x = torch.randn(2, 5, 12)
    wrapped = fxprune.wrap(FFN().eval(), x, exprune=ExPruneConfig(k=4, threshold=0.0))
    outputs(wrapped, x)
    state, code = copy.deepcopy(wrapped.state_dict()), wrapped.code
    deployed = run_deploy(wrapped, x, times({"dense": 10.0, "skip_rows+sparse_fc": 1.0}))
    assert wrapped.code == code and wrapped.state_dict().keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(wrapped.state_dict()[key], value), key
    assert not any(isinstance(m, ExPruneOp) or "fxprune" in type(m).__name__.lower() for m in deployed.modules())
    assert not any(name.rsplit(".", 1)[-1] in ("calls", "elements", "predicted") for name, _ in deployed.named_buffers())
    assert "fc1_deployed" in deployed.code and not deployed.training


def test_the_default_timer_measures_every_candidate_and_keeps_outputs():
    x = torch.randn(2, 5, 12)
    wrapped = fxprune.wrap(FFN().eval(), x, exprune=ExPruneConfig(k=4, threshold=0.0))
    deployed = fxprune.deploy(wrapped, x, options=DeployOptions(batch_sizes=(1, 2), repeats=2, threads=1))
    [choice] = [c for c in deployed.deploy_choices if "dense" in c.latency_ms and "skip_rows" in c.latency_ms]  # the site
    assert set(choice.latency_ms) == {"dense", "skip_rows", "skip_rows+sparse_fc", "predict+sparse_fc"}
    assert all(set(t) == {1, 2} and min(t.values()) > 0 for t in choice.latency_ms.values())
    reference = wrapped if choice.path != "dense" else fxprune.export(wrapped)
    torch.testing.assert_close(outputs(deployed, x), outputs(reference, x), rtol=1e-4, atol=1e-5)


def test_a_model_never_wrapped_is_an_export_error():
    with pytest.raises(fxprune.ExportError, match="never wrapped"):
        fxprune.deploy(torch.fx.symbolic_trace(FFN()), torch.randn(1, 12))
    with pytest.raises(fxprune.ExportError, match="expects a model returned by fxprune.wrap"):
        fxprune.deploy(FFN(), torch.randn(1, 12))


def test_fxprune_deploy_stays_the_function_after_its_module_is_imported():
    import fxprune.deploying  # noqa: F401 (the module is `deploying`: importing it keeps fxprune.deploy a function)
    from fxprune.deploying import deploy

    assert fxprune.deploy is deploy
    x = torch.randn(2, 5, 12)
    wrapped = fxprune.wrap(FFN().eval(), x, exprune=ExPruneConfig(k=4))
    assert deploy(wrapped, x).deploy_choices == fxprune.deploy(wrapped, x).deploy_choices


def test_a_compiled_deployed_model_runs_its_kernels_eagerly_with_the_same_outputs():
    x = torch.randn(2, 5, 12)
    wrapped = fxprune.wrap(FFN().eval(), x, exprune=ExPruneConfig(k=4, threshold=0.0))
    deployed = run_deploy(wrapped, x, times({"dense": 10.0, "skip_rows+sparse_fc": 1.0}))
    torch.testing.assert_close(outputs(torch.compile(deployed), x), outputs(wrapped, x), rtol=1e-4, atol=1e-5)


@examples(10)
@given(inputs=st.sampled_from([1, 3]), out_features=st.integers(1, 30), keep=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_rows_linear_reads_exactly_the_kept_rows(inputs, out_features, keep, seed):
    # one input row takes the sampled_addmm path, several the chunked gather: both equal W[rows] @ x
    from fxprune.deploying.kernels import rows_linear
    g = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(inputs, 17, generator=g), torch.randn(out_features, 17, generator=g)
    rows = (torch.rand(out_features, generator=g) < keep).nonzero().squeeze(1)
    torch.testing.assert_close(rows_linear(x, weight, rows), x @ weight[rows].t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows_linear(x[:, 2:], weight[:, 2:].contiguous(), rows), x[:, 2:] @ weight[rows, 2:].t())
