"""Hypothesis strategies that generate models: random DAGs of conv/bn/relu/add/cat/split, MLPs.

A generated model is a small "program": a list of steps over a growing list of values. Each step
reads earlier values and appends one value, so the graph is a DAG. The forward loop is plain
Python over a fixed program, so torch.fx unrolls it.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn


class ProgramModel(nn.Module):
    """Runs a fixed program of steps; steps are (op, input indices, module index or extra)."""

    def __init__(self, program: list[tuple], layers: list[nn.Module], head: str):
        super().__init__()
        self.program = program
        self.layers = nn.ModuleList(layers)
        self.head = head

    def forward(self, x):
        values = [x]
        for op, ins, arg in self.program:
            a = values[ins[0]]
            if op == "layer":
                values.append(self.layers[arg](a))
            elif op == "relu":
                values.append(torch.relu(a))
            elif op == "add":
                values.append(a + values[ins[1]])
            elif op == "mul":
                values.append(a * torch.sigmoid(values[ins[1]]))
            elif op == "cat":
                values.append(torch.cat([a, values[ins[1]]], dim=1))
            elif op == "split":
                values.append(torch.split(a, list(arg[0]), dim=1)[arg[1]])
            elif op == "slice":
                values.append(a[:, arg:])
        out = values[-1]
        if self.head == "pool":
            out = out.mean(dim=(2, 3))
        elif self.head == "flatten":
            out = torch.flatten(out, 1)
        return self.layers[-1](out)


@st.composite
def conv_dags(draw, max_steps: int = 8):
    """A random conv DAG on (2, 3, 6, 6) inputs, ending with pooled or flattened linear head."""
    channels = [3]  # channel count of each value
    program, layers = [], []
    n_steps = draw(st.integers(2, max_steps))
    for _ in range(n_steps):
        i = draw(st.integers(0, len(channels) - 1))
        c = channels[i]
        op = draw(st.sampled_from(["conv", "conv", "dwconv", "bn", "relu", "add", "mul", "cat", "split", "slice"]))
        if op == "conv" or i == 0 and op not in ("conv",):
            out = draw(st.integers(2, 6))
            k = draw(st.sampled_from([1, 3]))
            layers.append(nn.Conv2d(c, out, k, padding=k // 2, bias=draw(st.booleans())))
            program.append(("layer", (i,), len(layers) - 1))
            channels.append(out)
        elif op == "dwconv":
            layers.append(nn.Conv2d(c, c, 3, padding=1, groups=c))
            program.append(("layer", (i,), len(layers) - 1))
            channels.append(c)
        elif op == "bn":
            bn = nn.BatchNorm2d(c)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(-1, 1)
            bn.bias.data.uniform_(-1, 1)
            layers.append(bn)
            program.append(("layer", (i,), len(layers) - 1))
            channels.append(c)
        elif op == "relu":
            program.append(("relu", (i,), None))
            channels.append(c)
        elif op in ("add", "mul"):
            same = [j for j, cj in enumerate(channels) if cj == c and j != 0]
            if i == 0 or not same:
                continue
            j = draw(st.sampled_from(same))
            program.append((op, (i, j), None))
            channels.append(c)
        elif op == "cat":
            j = draw(st.integers(1, len(channels) - 1)) if len(channels) > 1 else None
            if j is None or i == 0:
                continue
            program.append(("cat", (i, j), None))
            channels.append(c + channels[j])
        elif op == "split":
            if c < 2 or i == 0:
                continue
            size = draw(st.integers(1, c - 1))
            part = draw(st.integers(0, 1))
            program.append(("split", (i,), ((size, c - size), part)))
            channels.append(size if part == 0 else c - size)
        elif op == "slice":
            if c < 2 or i == 0:
                continue
            start = draw(st.integers(1, c - 1))
            program.append(("slice", (i,), start))
            channels.append(c - start)
    head = draw(st.sampled_from(["pool", "flatten"]))
    c_last = channels[-1] if program else 3
    layers.append(nn.Linear(c_last * (36 if head == "flatten" else 1), 3))
    model = ProgramModel(program, layers, head).eval()
    return model, (torch.randn(2, 3, 6, 6),)


@st.composite
def mlps(draw):
    """A random MLP with optional residual adds, LayerNorm and a non-ReLU activation."""
    width = draw(st.integers(3, 8))
    depth = draw(st.integers(1, 4))
    layers = [nn.Linear(5, width)]
    program = [("layer", (0,), 0)]
    for _ in range(depth):
        kind = draw(st.sampled_from(["linear_relu", "residual", "layernorm", "gelu"]))
        last = len(program)
        if kind == "linear_relu":
            layers.append(nn.Linear(width, width))
            program.append(("layer", (last,), len(layers) - 1))
            program.append(("relu", (last + 1,), None))
        elif kind == "residual":
            layers.append(nn.Linear(width, width))
            program.append(("layer", (last,), len(layers) - 1))
            program.append(("add", (last + 1, last), None))
        elif kind == "layernorm":
            layers.append(nn.LayerNorm(width))
            program.append(("layer", (last,), len(layers) - 1))
        else:
            layers.append(nn.GELU())
            program.append(("layer", (last,), len(layers) - 1))
    layers.append(nn.Linear(width, 2))
    model = ProgramModel(program, layers, "none").eval()
    return model, (torch.randn(4, 5),)
