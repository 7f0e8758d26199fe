"""How long ExPrune calibration takes on a CIFAR-size ResNet-18 (the issue's yardstick: 3,000 samples).

The model is torchvision's resnet18 with the CIFAR stem (3x3 stride-1 first conv, no max-pool) and
10 classes: 0.56 G MACs per 32x32 image. No CIFAR-10 ships on this machine, so the inputs are
Fashion-MNIST images resized to 32x32 and repeated over 3 channels, and the model is trained only
``--train-steps`` steps (default 0: random weights with BatchNorm statistics from one pass): the
time of calibrate is set by its passes over the data (one probe pass with a backward, then at most
``max_evals + 1`` forward passes), not by what the model has learnt, so the number is the time a
user would wait, while the MACs saved and the drop of such a model mean nothing and are not
reported. The table also gives one dense forward pass and one pass with the ExPrune ops over the
same samples: calibrate cannot be faster than its passes.

    .venv/bin/python benchmarks/bench_calibration_time.py             # 3,000 samples
    .venv/bin/python benchmarks/bench_calibration_time.py --quick     # 600 samples, under a minute
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import _common  # noqa: F401 (puts the checkout on sys.path)
import fxprune
from benchmarks.suite.data import fashion_mnist

HEADING = "## ExPrune calibration time, CIFAR-size ResNet-18"


def cifar_resnet18() -> nn.Module:
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def images(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1).contiguous()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    p.add_argument("--samples", type=int, default=3000)
    p.add_argument("--train-steps", type=int, default=0)
    p.add_argument("--max-drop", type=float, default=0.01)
    args = p.parse_args(argv)
    _common.setup(args)
    n = 600 if args.quick else args.samples
    splits = fashion_mnist()
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(splits.train[1]), generator=g)[:n]
    x, y = images(splits.train[0][pick]), splits.train[1][pick]
    batches = list(zip(x.split(128), y.split(128)))
    model = cifar_resnet18()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(args.train_steps):
        xb, yb = batches[step % len(batches)]
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    with torch.no_grad():  # BatchNorm statistics of these inputs (random weights otherwise blow up)
        for xb, _ in batches:
            model(xb)
    model.eval()

    def correct(m):
        with torch.no_grad():
            return torch.cat([(m(xb).argmax(1) == yb).float() for xb, yb in batches])

    dense_s = timed(lambda: correct(model))
    wrapped = fxprune.wrap(model, x[:2], exprune=fxprune.ExPruneConfig())
    enp_s = timed(lambda: correct(wrapped))
    t0 = time.perf_counter()
    result = fxprune.calibrate(wrapped, batches, correct, args.max_drop, progress=True)
    total = time.perf_counter() - t0
    macs = fxprune.flops(model, x[:1]).dense
    rows = [("samples", n), ("MACs per image (dense)", _common.human(macs)),
            ("one dense forward pass over the samples", f"{dense_s:.1f} s"),
            ("one forward pass with the ExPrune ops", f"{enp_s:.1f} s"),
            ("calibrate (default guarantee, max_drop " f"{args.max_drop:g})", f"{total:.1f} s"),
            ("metric_fn calls of the search", result.evaluations),
            ("torch threads", torch.get_num_threads())]
    body = [__doc__.split("\n\n")[1].replace("\n", " "), "", *_common.table(["what", "value"], rows)]
    return _common.report(args, HEADING, "bench_calibration_time.py", argv, body)


if __name__ == "__main__":
    sys.exit(main())
