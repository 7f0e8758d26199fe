"""The suite's models: three CNNs for Fashion-MNIST, two GNNs for the molecules, one decoder for the text.

Every builder takes a ``width`` factor (1.0 = the published sizes; the quick variant uses small
ones so that it runs in seconds) and returns a freshly initialised model (seeded by the caller).

- ``resnet18`` / ``mobilenetv2_100``: timm models, one input channel, 10 classes; widths scale
  the stage channels (resnet18) or pick timm's nearest registered multiplier (mobilenetv2_035 ... _140).
- ``vgg11_bn``: VGG-11 with batch norm in the style of the ExPrune paper's CIFAR code (3x3 convs,
  BN, ReLU, max pooling, one linear classifier); for 28x28 inputs the fifth pooling is left out
  and a global average pool feeds the classifier.
- ``gcn`` / ``gin``: five message-passing layers with batch norm and ReLU, OGB style (hidden 300 at
  width 1), an atom encoder (one embedding per categorical OGB atom feature, summed, as OGB's
  AtomEncoder) and a mean pool over each graph (a leaf module: its graph count depends on data).
  Bond features are not used (PyG's GCNConv and GINConv take none).
- ``opt``: a small OPT-style decoder (pre-LayerNorm blocks, causal softmax attention, ReLU FFN of
  4x the model width, learned positions), character-level.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CNNS = ("resnet18", "mobilenetv2_100", "vgg11_bn")
GNNS = ("gcn", "gin")
LMS = ("opt",)
ALL = CNNS + GNNS + LMS
# bumped when a builder changes, so that cached dense checkpoints of the old architecture are not reused
REVISION = {"mobilenetv2_100": 2}
KIND = {**{m: "image" for m in CNNS}, **{m: "graph" for m in GNNS}, **{m: "text" for m in LMS}}

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)
OGB_ATOM_FEATURES = 9  # columns of torch_geometric.utils.from_smiles' x


def _scaled(c: int, width: float, minimum: int = 8) -> int:
    return max(minimum, int(round(c * width)))


def build(name: str, width: float, *, num_classes: int = 10, vocab: int = 0, context: int = 0) -> nn.Module:
    """A freshly initialised model ``name`` (one of :data:`ALL`) at ``width`` x its published size."""
    if name == "resnet18":
        import timm

        channels = tuple(_scaled(c, width) for c in (64, 128, 256, 512))
        return timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=num_classes,
                                 channels=channels, stem_width=channels[0])
    if name == "mobilenetv2_100":
        import timm

        # timm's registered multipliers; the nearest one to ``width``
        multiplier = min((0.35, 0.5, 0.75, 1.0, 1.4), key=lambda m: abs(m - width))
        model = timm.create_model(f"mobilenetv2_{int(round(100 * multiplier)):03d}", pretrained=False, in_chans=1,
                                  num_classes=num_classes)
        model.conv_stem.stride = (1, 1)  # revision 2: a 2x2 map before the head on 28x28 inputs
        return model
    if name == "vgg11_bn":
        return VGG(width, num_classes)
    if name in GNNS:
        return GNN(name, _scaled(300, width), num_classes)
    if name == "opt":
        return Decoder(vocab, _scaled(128, width, 16), layers=4 if width >= 1 else 2, heads=4, context=context)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(ALL)}")


class VGG(nn.Module):
    def __init__(self, width: float, num_classes: int):
        super().__init__()
        layers, c_in = [], 1
        for v in VGG11:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            c = _scaled(v, width)
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class AtomEncoder(nn.Module):
    """Sum of one embedding per categorical atom feature (OGB's AtomEncoder, sized from the data:
    ``from_smiles`` features are small non-negative integers; 128 rows per feature is ample)."""

    def __init__(self, dim: int, features: int = OGB_ATOM_FEATURES, rows: int = 128):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(rows, dim) for _ in range(features))

    def forward(self, x):
        return sum(emb(x[:, i]) for i, emb in enumerate(self.embeddings))


class MeanPool(nn.Module):
    """Mean of the node features of each graph (``batch`` = graph index per node). A leaf for fx:
    the number of graphs is read from ``batch``."""

    def forward(self, x, batch):
        from torch_geometric.nn import global_mean_pool

        return global_mean_pool(x, batch)


class GNN(nn.Module):
    def __init__(self, kind: str, hidden: int, num_classes: int, layers: int = 5):
        super().__init__()
        from torch_geometric.nn import GCNConv, GINConv

        self.encoder = AtomEncoder(hidden)
        if kind == "gcn":
            self.convs = nn.ModuleList(GCNConv(hidden, hidden) for _ in range(layers))
        else:
            self.convs = nn.ModuleList(
                GINConv(nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.BatchNorm1d(2 * hidden), nn.ReLU(),
                                      nn.Linear(2 * hidden, hidden))) for _ in range(layers))
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(layers))
        self.dropout = nn.Dropout(0.1)  # a module: fx would bake F.dropout(..., self.training) at trace time
        self.pool = MeanPool()
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x, edge_index, batch):
        h = self.encoder(x)
        last = len(self.convs) - 1
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(conv(h, edge_index))
            if i < last:  # OGB: no ReLU after the last layer
                h = F.relu(h)
            h = self.dropout(h)
        return self.head(self.pool(h, batch))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.relu(self.fc1(self.ln2(x))))


class Decoder(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tokens(idx) + self.positions(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))
