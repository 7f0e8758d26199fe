"""Offline datasets for the demo and the benchmarks (nothing is downloaded).

- ``digits``: scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes, shipped inside
  the scikit-learn package), upsampled to ``size`` x ``size`` (bilinear) and repeated to
  ``channels`` channels. The base images are split once (fixed seed) into train / calibration /
  test, so test images are digits neither training nor calibration saw.
- ``synthetic``: a fallback with the same shapes: 10 random smooth class prototypes plus noise.
  Learnable, but says nothing about real accuracy.

Pixel values are standardised (mean 0, std 1 over the training split). ``augment`` applies random
small rotations, scalings, shifts and noise (a fresh draw per call) for training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SPLIT = (0.65, 0.17, 0.18)  # train / calibration / test fractions of the base images


@dataclass
class Split:
    """One split: ``x`` float32 (N, C, H, W), standardised; ``y`` int64 (N,) class indices."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int) -> "Split":
        """The first ``n`` samples (all of them when ``n`` >= len)."""
        return Split(self.x[:n], self.y[:n])

    def augmented(self, copies: int, seed: int = 0) -> "Split":
        """This split followed by ``copies`` augmented copies of it (fixed ``seed``): a larger,
        deterministic calibration set, so that a metric on it moves in finer steps."""
        g = torch.Generator().manual_seed(seed)
        xs = [self.x] + [augment(self.x, g) for _ in range(copies)]
        return Split(torch.cat(xs), self.y.repeat(copies + 1))

    def batches(self, size: int, shuffle: bool = False, generator: torch.Generator | None = None):
        """Yield (x, y) mini-batches of ``size`` samples (the last one may be smaller)."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for idx in order.split(size):
            yield self.x[idx], self.y[idx]


@dataclass
class Dataset:
    """Train, calibration and test splits of one dataset; ``name``, ``num_classes``, ``shape`` (C, H, W)."""

    name: str
    train: Split
    calib: Split
    test: Split
    num_classes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])

    def describe(self) -> str:
        c, h, w = self.shape
        return (f"{self.name}: {len(self.train)} train / {len(self.calib)} calibration / {len(self.test)} test "
                f"images, {c}x{h}x{w}, {self.num_classes} classes")


def load(name: str = "digits", size: int = 32, channels: int = 3, seed: int = 0) -> Dataset:
    """Load ``"digits"`` (scikit-learn) or ``"synthetic"``; see the module docstring."""
    if name == "digits":
        return digits(size, channels, seed)
    if name == "synthetic":
        return synthetic(size=size, channels=channels, seed=seed)
    raise ValueError(f"unknown dataset {name!r}: use 'digits' (scikit-learn, offline) or 'synthetic'")


def digits(size: int = 32, channels: int = 3, seed: int = 0) -> Dataset:
    """scikit-learn digits upsampled to ``channels`` x ``size`` x ``size``, fixed split by ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is a dependency; say what to do if it is missing
        raise ImportError("the digits dataset needs scikit-learn (pip install scikit-learn); "
                          "or use the 'synthetic' dataset") from exc
    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(raw.target, dtype=torch.int64)
    return _make(images, labels, "sklearn-digits", size, channels, seed)


def synthetic(n: int = 1800, size: int = 32, channels: int = 3, num_classes: int = 10, seed: int = 0) -> Dataset:
    """Random class prototypes (8x8, upsampled, so smooth) plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed + 1)
    prototypes = torch.rand(num_classes, 1, 8, 8, generator=g)
    labels = torch.arange(n) % num_classes
    images = prototypes[labels] + 0.35 * torch.randn(n, 1, 8, 8, generator=g)
    return _make(images.clamp(0, 1), labels, "synthetic", size, channels, seed)


def _make(images: torch.Tensor, labels: torch.Tensor, name: str, size: int, channels: int, seed: int) -> Dataset:
    if size < 8 or channels < 1:
        raise ValueError(f"size must be >= 8 and channels >= 1, got size={size}, channels={channels}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    n_train = int(SPLIT[0] * len(labels))
    n_calib = int(SPLIT[1] * len(labels))
    parts = order[:n_train], order[n_train:n_train + n_calib], order[n_train + n_calib:]
    x = F.interpolate(images, size=size, mode="bilinear", align_corners=False).repeat(1, channels, 1, 1)
    mean, std = x[parts[0]].mean(), x[parts[0]].std()
    x = (x - mean) / std
    splits = [Split(x[p].contiguous(), labels[p]) for p in parts]
    return Dataset(name, *splits, num_classes=int(labels.max()) + 1)


def augment(x: torch.Tensor, generator: torch.Generator | None = None, degrees: float = 12.0,
            scale: float = 0.1, shift: float = 0.12, noise: float = 0.05) -> torch.Tensor:
    """Random rotation (+-``degrees``), scaling (1 +- ``scale``), shift (fraction of the image) and
    Gaussian noise (std in standardised units), drawn independently per sample."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) - 0.5) * 2 * math.radians(degrees)
    factor = 1 + (torch.rand(n, generator=generator) - 0.5) * 2 * scale
    offset = (torch.rand(n, 2, generator=generator) - 0.5) * 2 * shift
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = x.amin()
    out = F.grid_sample(x - background, grid, align_corners=False) + background
    return out + noise * torch.randn(x.shape, generator=generator)
