"""Tiny models and helpers shared by the Hyperflux tests."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.hyperflux import HyperfluxConfig, apply_hyperflux
from fxprune.runtime import Controller


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train several times faster on one thread on a shared CPU (import this fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class WeightMask(nn.Module):
    """A Hyperflux-style weight parametrization, ``w * mask`` (register it with torch's parametrize)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


class TinyCNN(nn.Module):
    """conv-bn-relu, a residual conv block, pooling, flatten of (C, 4, 4) into a linear head."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 16, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.stem(x)))
        x = F.relu(self.bn2(self.conv(x))) + x
        return self.fc(F.adaptive_avg_pool2d(x, 4).flatten(1))


def mlp(sizes=(16, 64, 64, 4)) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def gated(model: nn.Module, x, **config):
    """(graph module with gates, runtime) for a private copy of ``model``; the runtime is attached
    as ``gm.fxprune`` the way fxprune.wrap does it."""
    config.setdefault("target_sparsity", 0.5)
    config.setdefault("pruning_steps", 100)
    analysis = fxprune.analyze(copy.deepcopy(model), x)
    gm = analysis.graph_module
    runtime = apply_hyperflux(gm, analysis, HyperfluxConfig(**config), example_inputs=(x,))
    gm.add_module("fxprune", Controller(analysis, hyperflux=runtime))
    return gm, runtime


def teacher_data(n: int = 512, d: int = 16, classes: int = 4, seed: int = 0):
    """Inputs and labels of a random two-layer teacher network."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w1, w2 = torch.randn(d, 32, generator=g), torch.randn(32, classes, generator=g)
    return x, (torch.relu(x @ w1) @ w2).argmax(1)


def batches(x, y, steps: int, size: int = 64, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(x[i], y[i]) for i in (torch.randint(0, len(x), (size,), generator=g) for _ in range(steps))]


def train(model: nn.Module, step, data: list, optimizer=None) -> None:
    """One optimiser step per batch of ``data`` followed by ``step()`` (the runtime's)."""
    for xb, yb in data:
        loss = F.cross_entropy(model(xb), yb)
        if optimizer is not None:
            optimizer.zero_grad()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        step()
