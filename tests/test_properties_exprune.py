"""ExPrune and FLOP-report properties on generated models (tests/model_gen.py), on fresh inputs of
another batch size than the example one.

ExPrune (threshold rule, z-test, heads, PyG sites): with one site pruning at a time, every element of
that site's output is the dense value or a predicted zero, and every element not predicted is exactly
the dense value; decisions are per sample. ``fxprune.flops``: effective MACs never grow with the
threshold, equal dense at the safe setting and differ from dense by what the sites' statistics
saved; dense equals plain fvcore (plus the attention that fvcore misses).
"""
import math

import torch
from fvcore.nn import FlopCountAnalysis
from hypothesis import assume, given
from hypothesis import strategies as st

import fxprune
from fxprune.exprune import DominanceOp
from fxprune.exprune.probe import recording
from hypothesis_profiles import examples
from model_gen import fresh_inputs, gnn_models, random_graph, user_models
from permutation import assert_same_outputs


def knob(rule: str, stat: torch.Tensor, quantile: float) -> dict:
    """Settings that predict about ``quantile`` of a site's elements: T at that quantile of the
    statistic (threshold rule), or the alpha whose critical value is there (z-test)."""
    finite = stat[torch.isfinite(stat)].flatten().double()
    cut = float(finite.quantile(quantile)) if finite.numel() else 0.0
    if rule == "threshold":
        return {"threshold": cut}
    return {"alpha": min(max(0.5 * (1 + math.erf(cut / math.sqrt(2))), 1e-6), 1 - 1e-6)}


def apply_knob(runtime, site: str, setting: dict) -> None:
    if "threshold" in setting:
        runtime.set_thresholds({site: setting["threshold"]})
    else:
        runtime.set_alpha({site: setting["alpha"]})


def check_one_site_at_a_time(wrapped, model, x, rule, quantile) -> int:
    """The per-site property (see the module docstring); returns the number of predicted elements."""
    runtime = wrapped.fxprune.exprune
    ops = runtime.ops
    predicted_total = 0
    with recording(ops.values()) as records, torch.no_grad():
        dense_out = wrapped(*x)  # the default settings prune nothing
        assert_same_outputs(model(*x), dense_out)  # the op's dense path is the original chain
        dense = {name: {k: v.detach().clone() for k, v in records[id(op)].items() if isinstance(v, torch.Tensor)}
                 for name, op in ops.items()}
        for name, op in ops.items():
            setting = knob(rule, dense[name]["stat"], quantile)
            apply_knob(runtime, name, setting)
            out = wrapped(*x)
            record = records[id(op)]
            site_out, predicted = record["out"].detach(), record["stat"] < op.cutoff()
            # the site sees the dense inputs (NaN: a z-test over k equal terms, never predicted)
            torch.testing.assert_close(record["stat"], dense[name]["stat"], rtol=0, atol=0, equal_nan=True)
            if isinstance(op, DominanceOp):  # a predicted row holds the extrapolated logits (full + delta)
                rows = predicted[..., 0]
                assert torch.equal(site_out[~rows], dense[name]["out"][~rows])
                torch.testing.assert_close(site_out[rows], (dense[name]["out"] + dense[name]["delta"])[rows])
            else:
                assert torch.equal(site_out[~predicted], dense[name]["out"][~predicted])
                assert bool((site_out[predicted] == 0).all())
                assert bool(((site_out == dense[name]["out"]) | (site_out == 0)).all())
            if not bool(predicted.any()):
                assert torch.equal(out, dense_out)  # nothing predicted: the model's outputs are exact
            predicted_total += int(predicted.sum())
            runtime.set_thresholds(float("-inf"))
            runtime.set_alpha(0.0)
    return predicted_total


@examples(12)
@given(user_models(), st.sampled_from(["threshold", "ztest"]), st.floats(0.05, 0.95), st.booleans())
def test_exprune_site_outputs_are_dense_or_predicted_zero(case, rule, quantile, heads):
    model, inputs = case
    wrapped = fxprune.wrap(model, inputs, exprune=fxprune.ExPruneConfig(rule=rule, k=2, heads=heads))
    assume(wrapped.fxprune.exprune.ops)
    check_one_site_at_a_time(wrapped, model, fresh_inputs(inputs, 5), rule, quantile)


@examples(8)
@given(gnn_models(), st.sampled_from(["threshold", "ztest"]), st.floats(0.05, 0.95))
def test_exprune_pyg_site_outputs_are_dense_or_predicted_zero(case, rule, quantile):
    model, inputs = case
    wrapped = fxprune.wrap(model, inputs, exprune=fxprune.ExPruneConfig(rule=rule, k=2))
    assert wrapped.fxprune.exprune.ops, wrapped.fxprune.exprune.skipped  # every generated layer is a site
    other = random_graph(17, seed=5)  # another graph: another node count
    check_one_site_at_a_time(wrapped, model, other, rule, quantile)


@examples(10)
@given(user_models(), st.sampled_from(["threshold", "ztest"]), st.floats(0.05, 0.95))
def test_exprune_decisions_are_per_sample(case, rule, quantile):
    """A sample's decisions and outputs do not depend on the rest of the batch. Batched and single
    kernels round differently, so a statistic within 1e-4 of its cutoff may flip: such elements (and
    their samples' outputs) are left out of the comparison."""
    model, inputs = case
    wrapped = fxprune.wrap(model, inputs, exprune=fxprune.ExPruneConfig(rule=rule, k=2, heads=True))
    runtime = wrapped.fxprune.exprune
    assume(runtime.ops)
    x = fresh_inputs(inputs, 4)[0]
    with recording(runtime.ops.values()) as records, torch.no_grad():
        wrapped(x)
        for name, op in runtime.ops.items():  # every site prunes at once
            apply_knob(runtime, name, knob(rule, records[id(op)]["stat"], quantile))
        batched = wrapped(x)
        stats = {name: records[id(op)]["stat"].clone() for name, op in runtime.ops.items()}
        for i in range(len(x)):
            single = wrapped(x[i:i + 1])
            near_any = False
            for name, op in runtime.ops.items():
                cutoff = op.cutoff()
                stat = stats[name][i:i + 1]
                near = (stat - cutoff).abs() <= 1e-4 * (1 + cutoff.abs().clamp_max(1e6))
                mine = records[id(op)]["stat"] < cutoff
                assert torch.equal(mine[~near], (stat < cutoff)[~near]), name
                near_any |= bool(near.any())
            if not near_any:
                assert_same_outputs(batched[i:i + 1], single)


# ---------------------------------------------------------------------------------------------
# fxprune.flops

def fvcore_total(model, inputs) -> float:
    return FlopCountAnalysis(model, inputs).unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()


def attention_macs(model, x) -> int:
    """MACs of the attention products fvcore does not count: per block, B x L^2 x (q.k + a.v) = 2 B L^2 D."""
    total = 0
    if model.transition == "tokens":
        with torch.no_grad():
            tokens = model.image(x).flatten(2).shape[-1]
        for block in model.tokens:
            total += 2 * x.shape[0] * tokens * tokens * block.attn.qkv.in_features
    return total


@examples(12)
@given(user_models())
def test_flops_dense_equals_plain_fvcore_on_generated_models(case):
    model, inputs = case
    x = fresh_inputs(inputs, 3)
    assert fxprune.flops(model, x).dense == fvcore_total(model, x) + attention_macs(model, x[0])


@examples(8)
@given(user_models(), st.sampled_from(["threshold", "ztest"]))
def test_flops_effective_is_monotone_in_the_threshold_and_matches_site_statistics(case, rule):
    model, inputs = case
    wrapped = fxprune.wrap(model, inputs, exprune=fxprune.ExPruneConfig(rule=rule, k=2, heads=True))
    runtime = wrapped.fxprune.exprune
    assume(runtime.ops)
    x = fresh_inputs(inputs, 3)
    dense = fxprune.flops(model, x).dense
    safe = fxprune.flops(wrapped, x)
    assert safe.dense == safe.effective == dense
    previous = math.inf
    settings = [-2.0, 0.0, 0.5, 10.0] if rule == "threshold" else [1e-4, 0.1, 0.5, 0.99]
    for value in settings:
        (runtime.set_thresholds if rule == "threshold" else runtime.set_alpha)(value)
        report = fxprune.flops(wrapped, x)  # the ops' statistics then hold this one pass
        total = runtime.stats()["total"]
        assert report.dense == dense
        assert report.dense - report.effective == total["dense_macs"] - total["effective_macs"]
        assert sum(c.effective for c in report.exprune_ops.values()) == total["effective_macs"]
        assert report.effective <= previous
        previous = report.effective
