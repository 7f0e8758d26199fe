"""Training reliability of wrapped models: torch.compile, DDP (gloo, 2 processes), bf16 autocast."""
import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fxprune


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def hyperflux_config(**kw):
    return fxprune.HyperfluxConfig(**{"target_sparsity": 0.5, "pruning_steps": 12, "scheduler_interval": 2, **kw})


def train_steps(model, steps: int, seed: int, batch: int = 8):
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(batch, 3, 8, 8, generator=generator)
        y = torch.randint(0, 4, (batch,), generator=generator)
        loss = F.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        controller = model.module.fxprune if hasattr(model, "module") else model.fxprune
        controller.step()


def test_compiled_hyperflux_training_step_matches_eager():
    x = torch.randn(4, 3, 8, 8)
    # a small fixed gate_lr: Adam turns the last-bit differences of compiled kernels on near-zero
    # score gradients into steps of up to gate_lr, and the derived one for 12 steps is 0.67
    eager = fxprune.wrap(tiny_cnn(), x, hyperflux=hyperflux_config(gate_lr=1e-3))
    compiled_inner = fxprune.wrap(tiny_cnn(), x, hyperflux=hyperflux_config(gate_lr=1e-3))
    explanation = torch._dynamo.explain(copy.deepcopy(compiled_inner))(x)  # a copy: BN stats move
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(compiled_inner)
    train_steps(eager, 3, seed=1)
    train_steps(compiled, 3, seed=1)
    assert compiled.fxprune.sparsity() == eager.fxprune.sparsity()
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled_inner.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    eager.eval(), compiled.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


def test_wrap_compile_flag_returns_compiled_module_with_controller():
    x = torch.randn(2, 3, 8, 8)
    model = fxprune.wrap(tiny_cnn().eval(), x, hyperflux=hyperflux_config(), compile=True)
    assert hasattr(model, "_orig_mod") and model.fxprune.sparsity() == 0.0
    torch.testing.assert_close(model(x), tiny_cnn().eval()(x), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_keeps_gates_binary():
    x = torch.randn(4, 3, 8, 8)
    model = fxprune.wrap(tiny_cnn(), x, hyperflux=hyperflux_config(target_sparsity=0.6, pruning_steps=6,
                                                                     scheduler_interval=1))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().logsumexp(1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        model.fxprune.step()
    before = model.fxprune.sparsity()
    assert before > 0, "the bf16 run must close gates for this test to say anything"
    closed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and hasattr(module, "parametrizations"):
            original = module.parametrizations.weight.original
            mask = weight / torch.where(original == 0, torch.ones_like(original), original)
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            closed += int(((mask == 0) & (original != 0)).sum())
    assert closed > 0  # a gate closed under autocast, and the gated weight is exactly 0
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert model.fxprune.sparsity() == before


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        wrapped = fxprune.wrap(tiny_cnn(), x, hyperflux=hyperflux_config(target_sparsity=0.5, pruning_steps=8, gate_lr=0.1,
                                                                           scheduler_interval=1))
        ddp = nn.parallel.DistributedDataParallel(wrapped)
        train_steps(ddp, 8, seed=100 + rank)  # each rank sees different data
        state = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in wrapped.state_dict().items()}
        torch.save({"state": state, "sparsity": wrapped.fxprune.sparsity()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_hold_identical_gates_and_scheduler_state():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        r0 = torch.load(os.path.join(tmp, "rank0.pt"))
        r1 = torch.load(os.path.join(tmp, "rank1.pt"))
    assert r0["sparsity"] == r1["sparsity"] and r0["sparsity"] > 0
    assert r0["state"].keys() == r1["state"].keys()
    gate_keys = [k for k in r0["state"] if "fxprune" in k or "score" in k]
    assert gate_keys
    for key, a in r0["state"].items():
        if "running_" in key or "num_batches_tracked" in key:
            continue  # BN statistics of the last forward are per rank (DDP broadcasts them before a forward)
        b = r1["state"][key]
        same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        assert same, f"{key} differs across ranks"


def test_empty_batches_and_nan_inputs_through_both_transforms():
    x = torch.randn(4, 3, 8, 8)
    model = tiny_cnn().eval()
    wrapped = fxprune.wrap(model, x, hyperflux=hyperflux_config(), exprune=fxprune.ExPruneConfig(k=4, threshold=0.0))
    assert wrapped.fxprune.exprune.ops, "the tiny CNN has an ExPrune site"
    with torch.no_grad():
        assert wrapped(torch.randn(0, 3, 8, 8)).shape == (0, 4)
        poisoned = x.clone()
        poisoned[1, :, 2, 2] = float("nan")
        out = wrapped(poisoned)
    # a NaN sample must stay visibly NaN (not silently zeroed by a prediction); clean samples stay finite
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()
