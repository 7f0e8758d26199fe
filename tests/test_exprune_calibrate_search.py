"""calibrate(): the verification search along the path, the penalties' incremental updates, and how
batches are read (2-item batches, two-input models, ``batch_inputs``)."""
import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.exprune import ExPruneConfig, apply_exprune
from fxprune.exprune.calibrate import calibrate
from fxprune.exprune.calibrate.batches import batch_reader
from fxprune.exprune.calibrate.penalty import FlipPenalty, QuadraticPenalty
from fxprune.exprune.calibrate.search import verified_search
from fxprune.exprune.calibrate.tables import SiteTable
from hypothesis_profiles import examples


class Counter:
    """drop_at for verified_search: a fixed drop per position, recording the positions measured."""

    def __init__(self, drops):
        self.drops, self.calls = list(drops), []

    def __call__(self, position):
        self.calls.append(position)
        return self.drops[position]


@st.composite
def paths(draw):
    """A path of L steps: drops (non-decreasing from 0 when ``monotone``), a noisy predicted penalty."""
    length = draw(st.integers(1, 300))
    monotone = draw(st.booleans())
    steps = draw(st.lists(st.floats(0, 0.01) if monotone else st.floats(-0.01, 0.01), min_size=length,
                          max_size=length))
    drops = [0.0]
    for s in steps:
        drops.append(drops[-1] + s)
    scale = draw(st.floats(10, 1000))
    noise = draw(st.lists(st.floats(0.5, 2.0), min_size=length, max_size=length))
    penalty = [0.0] + [max(d, 0.0) * scale * f for d, f in zip(drops[1:], noise)]
    return drops, penalty, monotone


@examples(150)
@given(paths(), st.floats(0, 0.05), st.sampled_from([None, 1e-3, 1e-1]), st.integers(1, 12))
def test_search_returns_a_measured_feasible_position_within_the_budget_of_calls(path, max_drop, prior, max_evals):
    drops, penalty, monotone = path
    drop_at = Counter(drops)
    saved = list(range(len(drops)))
    lo = verified_search(drop_at, penalty, saved, max_drop, prior, max_evals, 0.0)
    assert len(drop_at.calls) <= max_evals and len(set(drop_at.calls)) == len(drop_at.calls)
    assert lo == 0 or (lo in drop_at.calls and drops[lo] <= max_drop)
    if monotone and max_evals >= 2 * math.ceil(math.log2(len(drops) + 1)) + 2:
        # worst case: every other step bisects; then the bracket closes on the true boundary
        assert lo == max(p for p, d in enumerate(drops) if d <= max_drop)


def test_search_with_a_good_penalty_model_needs_few_calls():
    length, budget = 400, 0.0123 + 1e-12  # drop 1e-4 per step: the boundary is position 123
    drops = [p * 1e-4 for p in range(length + 1)]
    penalty = [d * 2000 for d in drops]  # two predicted flips per point of drop on 1000 samples
    saved = list(range(length + 1))
    drop_at = Counter(drops)
    assert verified_search(drop_at, penalty, saved, budget, 1 / 2000, 8, 0.0) == 123
    assert len(drop_at.calls) <= 3
    no_prior = Counter(drops)  # one bisection, then the measured ratio
    assert verified_search(no_prior, penalty, saved, budget, None, 8, 0.0) == 123 and len(no_prior.calls) <= 3
    flat = Counter(drops)  # an uninformative penalty: plain bisection, not done after 8 calls
    assert verified_search(flat, [0.0] * (length + 1), saved, budget, 1 / 2000, 8, 0.0) <= 123
    assert len(flat.calls) == 8


def test_search_stops_when_little_is_left_to_gain():
    drops = [0.0] * 5 + [1.0] * 96
    saved = [100.0 + 0.001 * p for p in range(101)]  # past the first steps, nothing more to gain
    saved[:5] = [0.0, 10.0, 50.0, 90.0, 99.0]
    drop_at = Counter(drops)
    lo = verified_search(drop_at, [0.0] * 101, saved, 0.5, None, 10, 0.02)
    assert lo == 4 and len(drop_at.calls) < 7


def random_tables(seed, sites=3, rows=20, bins=6):
    g = torch.Generator().manual_seed(seed)
    return {f"s{i}": SiteTable(torch.arange(bins, dtype=torch.float32),
                               torch.rand(bins, generator=g, dtype=torch.float64).cumsum(0),
                               torch.randn(rows, bins, generator=g).cumsum(1) * -0.3) for i in range(sites)}


@pytest.mark.parametrize("kind", ["flips", "quadratic"])
@examples(30)
@given(seed=st.integers(0, 10_000), moves=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5)), max_size=6))
def test_penalty_increments_match_a_direct_computation(kind, seed, moves):
    tables = random_tables(seed)
    margins = torch.rand(20, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) * 3
    penalty = FlipPenalty(tables, margins, 0.1) if kind == "flips" else QuadraticPenalty(tables)

    def direct(at):
        change = sum((tables[n].effect[:, t].double() for n, t in at.items()), torch.zeros(20, dtype=torch.float64))
        if kind == "quadratic":
            return float((change ** 2).sum())
        tau = 0.1 * float(margins.median())
        return float(torch.sigmoid(-(margins + change) / tau).sum() - torch.sigmoid(-margins / tau).sum())

    at = {}
    for site, t in moves:
        name = f"s{site}"
        t0 = at.get(name, -1)
        if t <= t0:
            continue
        added = penalty.added(name, t0)
        assert added.shape == (6 - t0 - 1,)
        before = direct(at)
        at[name] = t
        assert float(added[t - t0 - 1]) == pytest.approx(direct(at) - before, rel=1e-4, abs=1e-4)
        penalty.move(name, t0, t)
        assert penalty.value == pytest.approx(direct(at), rel=1e-4, abs=1e-4)


class TwoInputs(nn.Module):
    """forward(x, z): an ExPrune site on x's path; z enters after it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(8, 40), nn.Linear(40, 40), nn.Linear(40, 3), nn.Linear(5, 3)

    def forward(self, x, z):
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))) + self.d(z)


@pytest.fixture(scope="module")
def two_input_model():
    torch.manual_seed(0)
    x, z = torch.randn(4, 8), torch.randn(4, 5)
    a = fxprune.analyze(TwoInputs().eval(), (x, z))
    rt = apply_exprune(a.graph_module, ExPruneConfig(k=8))
    assert rt.ops, "the test model must have an ExPrune site"
    return a.graph_module


def test_batch_reader_rules(two_input_model):
    x, y, z = torch.randn(2, 8), torch.tensor([0, 1]), torch.randn(2, 5)
    one = nn.Linear(8, 3)
    read = batch_reader(one, None)
    assert read(x)[0] is x and read((x, y))[0] is x and read([x, y])[0] is x
    assert read(((x,), y))[0] is x and len(read((x, y, z))) == 3
    with pytest.raises(ConfigError, match="batch_inputs"):
        read({"x": x})
    read2 = batch_reader(two_input_model, None)
    assert [t is s for t, s in zip(read2(((x, z), y)), (x, z))] == [True, True]
    assert len(read2((x, z, y))) == 3  # three items: the positional inputs
    with pytest.raises(ConfigError, match=r"two inputs.*batch_inputs"):
        read2((x, z))
    custom = batch_reader(two_input_model, lambda b: (b["x"], b["z"]))
    assert custom({"x": x, "z": z})[1] is z
    assert batch_reader(one, lambda b: b[1])((y, x))[0] is x
    with pytest.raises(ConfigError, match="callable"):
        batch_reader(one, "x")


def test_calibrate_a_two_input_model(two_input_model):
    gm = copy.deepcopy(two_input_model)
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(300, 8, generator=g), torch.randn(300, 5, generator=g)
    dense = gm(x, z).argmax(1)

    def agreement(m):
        with torch.no_grad():
            return (m(x, z).argmax(1) == dense).float().mean().item()

    pairs = list(zip(x.split(100), z.split(100)))
    with pytest.raises(ConfigError, match="two inputs"):
        calibrate(gm, pairs, agreement, 0.05, progress=False)
    chosen = calibrate(gm, pairs, agreement, 0.05, batch_inputs=lambda b: b, progress=False, confidence=None)
    assert agreement(gm) >= 0.95 - 1e-9 and any(torch.tensor(v).max() > -math.inf for v in chosen.values())
    calibrate(gm, [((xb, zb), None) for xb, zb in pairs], agreement, 0.05, progress=False, confidence=None)
    assert agreement(gm) >= 0.95 - 1e-9
