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


# ---------------------------------------------------------------------------------------------
# Models shaped like users' models: stages of blocks (strided and grouped convs, residual and
# concat blocks), a transition (pooling, flatten, reshape or tokens), attention blocks with
# LayerNorm, hidden Linear layers and a Linear head.

class ConvBlock(nn.Module):
    """conv (any stride / groups) -> [BN] -> [ReLU]."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, groups: int, bn: bool, act: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=not bn)
        self.bn = _random_bn(cout) if bn else nn.Identity()
        self.act = act

    def forward(self, x):
        x = self.bn(self.conv(x))
        return torch.relu(x) if self.act else x


class ResidualBlock(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x)))))), the inner conv possibly grouped."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.a = ConvBlock(c, c, 3, 1, groups, True, True)
        self.b = ConvBlock(c, c, 1, 1, 1, True, False)

    def forward(self, x):
        return torch.relu(x + self.b(self.a(x)))


class ConcatBlock(nn.Module):
    """cat([relu(conv_a(x)), relu(conv_b(x))]) along channels."""

    def __init__(self, c: int, ca: int, cb: int):
        super().__init__()
        self.a = ConvBlock(c, ca, 1, 1, 1, False, True)
        self.b = ConvBlock(c, cb, 3, 1, 1, True, True)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention written out (qkv Linear, reshape, SDPA, projection), as timm does."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + fc2(act(fc1(LN(x))))."""

    def __init__(self, dim: int, heads: int, hidden: int, gelu: bool):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = nn.GELU() if gelu else nn.ReLU()

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class HiddenLinear(nn.Module):
    """Linear -> ReLU, optionally added to its input (residual) or followed by LayerNorm."""

    def __init__(self, din: int, dout: int, residual: bool, norm: bool):
        super().__init__()
        self.fc = nn.Linear(din, dout)
        self.residual = residual and din == dout
        self.norm = nn.LayerNorm(dout) if norm else nn.Identity()

    def forward(self, x):
        y = torch.relu(self.fc(x))
        return self.norm(x + y if self.residual else y)


class StagedModel(nn.Module):
    """image blocks -> transition -> token blocks -> (pool) -> hidden Linear blocks -> head."""

    def __init__(self, image: list, transition: str, tokens: list, hidden: list, head: nn.Module):
        super().__init__()
        self.image, self.tokens, self.hidden = nn.Sequential(*image), nn.Sequential(*tokens), nn.Sequential(*hidden)
        self.transition, self.head = transition, head

    def forward(self, x):
        x = self.image(x)
        if self.transition == "pool":
            x = x.mean(dim=(2, 3))
        elif self.transition == "flatten":
            x = torch.flatten(x, 1)
        elif self.transition == "reshape":
            x = x.reshape(x.shape[0], -1)
        else:  # tokens: (B, C, H, W) -> (B, H*W, C), attention blocks, mean over tokens
            x = self.tokens(x.flatten(2).transpose(1, 2)).mean(dim=1)
        return self.head(self.hidden(x))


def _random_bn(c: int, kind=nn.BatchNorm2d) -> nn.modules.batchnorm._BatchNorm:
    """A BatchNorm with random, well-scaled statistics and affine parameters (not the identity)."""
    bn = kind(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


IMAGE_SHAPE = (3, 8, 8)  # (C, H, W) of user_models' inputs; the example batch has 2 samples


@st.composite
def user_models(draw, max_blocks: int = 3, transitions=("pool", "flatten", "reshape", "tokens")):
    """A model of the kinds users write, on (2, 3, 8, 8) inputs: returns (model in eval mode, (x,)).

    Covers strided and grouped (depthwise included) convs, residual and concat blocks, flatten and
    reshape into Linear layers, token reshapes with LayerNorm and multi-head attention, hidden
    Linear layers (residual or normalised) and a Linear head. Use :func:`fresh_inputs` for inputs of
    another batch size.
    """
    c, size = draw(st.sampled_from([4, 6, 8])), IMAGE_SHAPE[1]
    image = [ConvBlock(3, c, 3, draw(st.sampled_from([1, 2])), 1, draw(st.booleans()), True)]
    size = (size + 1) // 2 if image[0].conv.stride[0] == 2 else size
    for _ in range(draw(st.integers(0, max_blocks))):
        kind = draw(st.sampled_from(["conv", "residual", "concat"]))
        if kind == "conv":
            cout = draw(st.sampled_from([c, 2 * c, 6]))
            groups = draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0 and cout % g == 0]))
            stride = draw(st.sampled_from([1, 2])) if size > 2 else 1
            image.append(ConvBlock(c, cout, draw(st.sampled_from([1, 3])), stride, groups, draw(st.booleans()), True))
            c, size = cout, ((size + 1) // 2 if stride == 2 else size)
        elif kind == "residual":
            image.append(ResidualBlock(c, draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0]))))
        else:
            ca, cb = draw(st.integers(2, 5)), draw(st.integers(2, 5))
            image.append(ConcatBlock(c, ca, cb))
            c = ca + cb
    transition = draw(st.sampled_from(list(transitions)))
    tokens = []
    if transition == "tokens":
        if c % 2:  # an even width, so that two heads divide it
            image.append(ConvBlock(c, c + 1, 1, 1, 1, False, True))
            c += 1
        for _ in range(draw(st.integers(1, 2))):
            tokens.append(TransformerBlock(c, draw(st.sampled_from([1, 2])), draw(st.sampled_from([c, 2 * c])),
                                           draw(st.booleans())))
        width = c
    else:
        width = c if transition == "pool" else c * size * size
    hidden = []
    for _ in range(draw(st.integers(0, 2))):
        out = draw(st.sampled_from([width, 8, 12]))
        hidden.append(HiddenLinear(width, out, draw(st.booleans()), draw(st.booleans())))
        width = out
    model = StagedModel(image, transition, tokens, hidden, nn.Linear(width, 3)).eval()
    return model, (torch.randn(2, *IMAGE_SHAPE),)


def fresh_inputs(inputs: tuple, batch: int, seed: int = 1) -> tuple:
    """Random inputs shaped like ``inputs`` but with ``batch`` samples (float tensors only)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, *x.shape[1:], generator=g) for x in inputs)


# ---------------------------------------------------------------------------------------------
# Small GNNs (PyTorch Geometric): lift -> message passing layers (each an ExPrune site candidate)
# -> linear head. Inputs (x, edge_index) of a random graph; other graphs from random_graph.

class GraphNet(nn.Module):
    """lift -> ReLU -> [layer -> [BN] -> ReLU] * n -> head; GIN layers hold Linear -> BN -> ReLU -> Linear."""

    def __init__(self, lift: nn.Module, layers: list, norms: list, head: nn.Module):
        super().__init__()
        self.lift, self.layers, self.norms, self.head = lift, nn.ModuleList(layers), nn.ModuleList(norms), head

    def forward(self, x, edge_index):
        h = self.lift(x).relu()
        for layer, norm in zip(self.layers, self.norms):
            h = norm(layer(h, edge_index)).relu()
        return self.head(h)


def random_graph(nodes: int, features: int = 5, edges: int | None = None, seed: int = 0) -> tuple:
    """(x, edge_index): random features and a random edge list without self loops."""
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, nodes, (2, edges or 3 * nodes), generator=g)
    return torch.randn(nodes, features, generator=g), edge_index[:, edge_index[0] != edge_index[1]]


@st.composite
def gnn_models(draw):
    """A GraphNet of 1-3 GCNConv / SAGEConv / GraphConv / GINConv layers on a 12-node graph."""
    from torch_geometric.nn import GCNConv, GINConv, GraphConv, SAGEConv

    width = draw(st.sampled_from([6, 8, 10]))
    layers, norms = [], []
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.sampled_from([6, 8, 10]))
        kind = draw(st.sampled_from(["gcn", "sage", "graph", "gin"]))
        if kind == "gin":
            layers.append(GINConv(nn.Sequential(nn.Linear(width, out), _random_bn(out, nn.BatchNorm1d), nn.ReLU(), nn.Linear(out, out))))
        else:
            layers.append({"gcn": GCNConv, "sage": SAGEConv, "graph": GraphConv}[kind](width, out))
        norms.append(_random_bn(out, nn.BatchNorm1d) if draw(st.booleans()) else nn.Identity())
        width = out
    lift = nn.Linear(5, layers[0].nn[0].in_features if isinstance(layers[0], GINConv) else layers[0].in_channels)
    return GraphNet(lift, layers, norms, nn.Linear(width, 3)).eval(), random_graph(12, seed=draw(st.integers(0, 1000)))



def random_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with random running statistics and weights in its BatchNorm2d layers
    (so that folding them into ExPrune's statistic is exercised)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()
