"""One interface over the three kinds of task (image classes, molecule classes, next character).

A :class:`Task` makes batches ``(inputs, target)`` with ``inputs`` a tuple of the model's positional
inputs (the format ``fxprune.calibrate`` reads), trains (dense from scratch, or fine-tuning with a
callback after each optimiser step, e.g. ``model.fxprune.step()``), and scores per sample: top-1
correct as 0/1, per image, per molecule or per predicted character. Accuracy = mean of those, a
fraction in [0, 1].

Optimisers: CNNs SGD (momentum 0.9, Nesterov, weight decay 5e-4; lr 0.05 dense, 0.01 fine-tuning),
GNNs Adam (1e-3 / 5e-4), the decoder AdamW (3e-3 / 1e-3, weight decay 0.01); cosine decay, and a
linear warm-up over the first 10 % of a dense run. Images get random 2-pixel shifts and flips.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import data as datasets
from . import models

CACHE_DIR = datasets.REPO / ".bench" / "cache"
BATCH = {"image": 64, "graph": 64, "text": 32}
LR = {"image": (0.05, 0.01), "graph": (1e-3, 5e-4), "text": (3e-3, 1e-3)}


@dataclass
class Sizes:
    """How much of each data set a run uses (0 = all) and how wide the models are."""

    train: int
    test: int
    dev: int
    width: float
    dense_epochs: int
    context: int = 64
    text_batches: int = 0  # training windows per "epoch" of text, in batches (0: one pass)
    extra: dict = field(default_factory=dict)


class Task:
    def __init__(self, model_name: str, splits: datasets.Splits, sizes: Sizes):
        self.model_name, self.kind, self.sizes = model_name, models.KIND[model_name], sizes
        self.splits = splits
        self.train, self.dev, self.test = (self._head(s, n) for s, n in
                                           ((splits.train, sizes.train), (splits.dev, sizes.dev),
                                            (splits.test, sizes.test)))
        self.batch = BATCH[self.kind]

    # -- data ----------------------------------------------------------------------------------
    def _head(self, split, n: int):
        if self.kind == "image":
            return split if not n else (split[0][:n], split[1][:n])
        if self.kind == "graph":
            return split if not n else split[:n]
        return split if not n else split[:n * self.sizes.context + 1]  # text: n windows' worth

    def size(self, split) -> int:
        if self.kind == "image":
            return len(split[1])
        if self.kind == "graph":
            return len(split)
        return (len(split) - 1) // self.sizes.context

    def steps_per_epoch(self) -> int:
        if self.kind == "text" and self.sizes.text_batches:
            return self.sizes.text_batches
        return math.ceil(self.size(self.train) / self.batch)

    def batches(self, split, *, shuffle: bool = False, generator: torch.Generator | None = None,
                batch: int | None = None) -> Iterator[tuple[tuple, torch.Tensor]]:
        """``(inputs, target)`` batches of ``split``; shuffled and augmented for training."""
        b = batch or self.batch
        if self.kind == "text":
            yield from self._text_batches(split, shuffle, generator, b)
            return
        n = self.size(split)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, b):
            idx = order[i:i + b]
            if self.kind == "image":
                x = split[0][idx]
                yield ((_augment(x, generator) if shuffle else x),), split[1][idx]
            else:
                from torch_geometric.data import Batch

                g = Batch.from_data_list([split[j] for j in idx.tolist()])
                yield (g.x, g.edge_index, g.batch), g.y

    def _text_batches(self, stream, shuffle, generator, b):
        c = self.sizes.context
        if shuffle:  # random windows, a fixed number of batches per epoch
            for _ in range(self.steps_per_epoch()):
                start = torch.randint(0, len(stream) - c - 1, (b,), generator=generator)
                idx = start[:, None] + torch.arange(c + 1)
                w = stream[idx]
                yield (w[:, :-1],), w[:, 1:]
            return
        n = self.size(stream)
        windows = stream[:n * c + 1]
        for i in range(0, n, b):
            j = torch.arange(i, min(i + b, n))
            idx = (j * c)[:, None] + torch.arange(c + 1)
            w = windows[idx]
            yield (w[:, :-1],), w[:, 1:]

    def example_inputs(self, split=None, batch: int = 8) -> tuple:
        return next(iter(self.batches(self.test if split is None else split, batch=batch)))[0]

    # -- models --------------------------------------------------------------------------------
    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        meta = self.splits.meta
        return models.build(self.model_name, self.sizes.width, num_classes=meta.get("num_classes", 10),
                            vocab=meta.get("vocab", 0), context=self.sizes.context)

    def loss(self, model: nn.Module, inputs: tuple, target: torch.Tensor) -> torch.Tensor:
        out = model(*inputs)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))

    @torch.no_grad()
    def correct(self, model: nn.Module, split) -> torch.Tensor:
        """Per sample (image, molecule, character) 1.0 if the top-1 prediction is right, else 0.0."""
        model.eval()
        out = [(model(*x).argmax(-1) == y).reshape(-1).float() for x, y in self.batches(split, batch=256)]
        return torch.cat(out)

    def accuracy(self, model: nn.Module, split) -> float:
        return float(self.correct(model, split).mean())

    def fit(self, model: nn.Module, epochs: int, *, dense: bool, seed: int,
            after_step: Callable[[], None] | None = None) -> float:
        """Train ``epochs`` epochs; returns the wall time in seconds."""
        import time

        lr = LR[self.kind][0 if dense else 1]
        params = [p for p in model.parameters() if p.requires_grad]
        if self.kind == "image":
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        elif self.kind == "graph":
            opt = torch.optim.Adam(params, lr=lr)
        else:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        total = max(1, epochs * self.steps_per_epoch())
        warm = max(1, total // 10) if dense else 0
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(total - warm, 1))))
        g = torch.Generator().manual_seed(seed)
        model.train()
        t0 = time.perf_counter()
        bar = tqdm(total=total, desc=f"{self.model_name} {'dense' if dense else 'fine-tune'}", unit="step",
                   leave=False, mininterval=30)
        for _ in range(epochs):
            for inputs, target in self.batches(self.train, shuffle=True, generator=g):
                bar.update()
                loss = self.loss(model, inputs, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if after_step is not None:
                    after_step()
        bar.close()
        model.eval()
        return time.perf_counter() - t0

    def dense(self, seed: int, log: Callable[[str], None] = print) -> nn.Module:
        """The dense model trained from scratch, cached under .bench/cache (keyed by every setting)."""
        s = self.sizes
        key = (f"{self.model_name}-w{s.width}-n{self.size(self.train)}-e{s.dense_epochs}-c{s.context}"
               f"-tb{s.text_batches}-s{seed}-torch{torch.__version__.split('+')[0]}")
        if self.model_name in models.REVISION:
            key += f"-r{models.REVISION[self.model_name]}"
        path = CACHE_DIR / f"{key}.pt"
        model = self.build(seed)
        if path.exists():
            model.load_state_dict(torch.load(path, weights_only=True))
            log(f"{self.model_name}: dense checkpoint {path.name} (cached)")
        else:
            seconds = self.fit(model, s.dense_epochs, dense=True, seed=seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
            log(f"{self.model_name}: dense model trained in {seconds:.0f} s -> {path.name}")
        return model.eval()

    def copy_of(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model)


def _augment(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Random shifts of up to 2 pixels (zero padding) and horizontal flips, per batch."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    x = F.pad(x, (2, 2, 2, 2))[..., 2 + dy:2 + dy + x.shape[-2], 2 + dx:2 + dx + x.shape[-1]]
    if torch.rand(1, generator=generator).item() < 0.5:
        x = x.flip(-1)
    return x


def load_splits(kind: str, context: int) -> datasets.Splits:
    if kind == "image":
        return datasets.fashion_mnist()
    if kind == "graph":
        return datasets.molecules()
    return datasets.austen(context)
