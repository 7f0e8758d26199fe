"""Hyperflux + ExPrune on a timm CNN for CIFAR-10, in a few lines of fxprune.

Steps: ``fxprune.integrations.timm.create_model`` builds the timm model already wrapped with
Hyperflux; train it (``model.fxprune.step()`` after each optimiser step) while it prunes to the
target sparsity; ``fxprune.export`` gives a plain pruned model; wrap that with ExPrune and
``fxprune.calibrate`` its thresholds on held-out images; report accuracy and dense / effective
MACs per image (``fxprune.flops``, 1 MAC = one multiply-add) for the exported and the ExPrune model.

    python examples/timm_cifar10.py --synthetic            # offline, < 2 min on a CPU
    python examples/timm_cifar10.py --root data/cifar10 --epochs 30 --width 1
        # torchvision's CIFAR-10 files must be in --root already, or add --download

``--synthetic``: fxprune's offline synthetic 10-class 3x32x32 images (same shapes as CIFAR-10);
learnable, says nothing about CIFAR-10 accuracy.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import fxprune
from fxprune.app import data as datasets
from fxprune.app.demo import accuracy, default_threads, train
from fxprune.integrations import timm as fx_timm

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def cifar10(root: str, download: bool, train_samples: int, calib_samples: int, test_samples: int):
    """(train, calib, test) Splits of torchvision's CIFAR-10 (calibration images from the training set)."""
    from torchvision.datasets import CIFAR10

    try:
        train_set = CIFAR10(root, train=True, download=download)
        test_set = CIFAR10(root, train=False, download=download)
    except Exception as exc:  # missing files, no network: say what to do
        raise SystemExit(f"cannot load CIFAR-10 from {root!r} ({type(exc).__name__}: {exc}); put the "
                         f"torchvision files there, pass --download, or run with --synthetic") from None

    def split(dataset, start: int, count: int) -> datasets.Split:
        images = torch.tensor(dataset.data[start:start + count]).permute(0, 3, 1, 2).float() / 255
        mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
        return datasets.Split(((images - mean) / std).contiguous(), torch.tensor(dataset.targets[start:start + count]))

    n_train = min(train_samples or 45000, len(train_set) - calib_samples)
    return (split(train_set, 0, n_train), split(train_set, len(train_set) - calib_samples, calib_samples),
            split(test_set, 0, test_samples or len(test_set)))


def timm_kwargs(name: str, width: float) -> dict:
    """Narrower stages for timm ResNets (``width`` x 64, 128, 256, 512); other models as they are."""
    if width == 1.0 or not name.startswith("resnet"):
        return {}
    channels = tuple(max(8, int(round(c * width))) for c in (64, 128, 256, 512))
    return {"channels": channels, "stem_width": channels[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--synthetic", action="store_true", help="offline synthetic images instead of CIFAR-10")
    p.add_argument("--root", default="data/cifar10")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10 into --root")
    p.add_argument("--model", default="resnet18", help="a timm model name")
    p.add_argument("--width", type=float, default=0.25, help="ResNet stage width multiplier")
    p.add_argument("--epochs", type=int, default=6, help="Hyperflux training epochs (pruning, then 1/6 regrowth)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--sparsity", type=float, default=0.8, help="Hyperflux target sparsity of the gated weights")
    p.add_argument("--train-samples", type=int, default=0, help="0: all (45,000 for CIFAR-10)")
    p.add_argument("--calib-samples", type=int, default=2000)
    p.add_argument("--test-samples", type=int, default=0, help="0: all")
    p.add_argument("--k", type=int, default=16, help="ExPrune: leading input channels summed before predicting")
    p.add_argument("--max-drop", type=float, default=0.01, help="ExPrune: allowed calibration-accuracy drop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 2, 1 on a busy machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or default_threads())
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    if args.synthetic:
        data = datasets.synthetic(n=1500, size=32, channels=3, seed=args.seed)
        train_split, calib, test = data.train, data.calib, data.test
    else:
        train_split, calib, test = cifar10(args.root, args.download, args.train_samples, args.calib_samples,
                                           args.test_samples)
    print(f"data: {len(train_split)} train / {len(calib)} calibration / {len(test)} test images "
          f"({'synthetic' if args.synthetic else 'CIFAR-10'})")
    example = test.x[:8]

    steps = args.epochs * math.ceil(len(train_split) / args.batch)
    regrowth = steps // 6
    config = fxprune.HyperfluxConfig(args.sparsity, pruning_steps=steps - regrowth, regrowth_steps=regrowth,
                                     gate_lr=0.02, scheduler_interval=6, seed=args.seed)
    model = fx_timm.create_model(args.model, fxprune=dict(hyperflux=config), example_inputs=example,
                                 num_classes=10, **timm_kwargs(args.model, args.width))
    clock = time.perf_counter()
    train(model, train_split, args.epochs, lr=args.lr, batch=args.batch, seed=args.seed,
          after_step=lambda step: model.fxprune.step(), desc="Hyperflux training")
    pruned = fxprune.export(model).eval()
    print(f"hyperflux  {args.model}: sparsity {100 * model.fxprune.sparsity():.1f} % of the gated weights, "
          f"test accuracy {100 * accuracy(pruned, test):.1f} %  ({time.perf_counter() - clock:.0f} s)")

    clock = time.perf_counter()
    exp = fxprune.wrap(pruned, example, exprune=fxprune.ExPruneConfig(k=args.k, heads=True))
    # a float accuracy: the budget holds on the calibration images only (confidence=None, no guarantee on new
    # images; per-sample correctness and enough images give one, see README)
    fxprune.calibrate(exp, calib.batches(256), lambda m: accuracy(m, calib), max_drop=args.max_drop,
                      confidence=None, progress=False)
    active = len(exp.fxprune.exprune.pruning_sites())
    print(f"exprune    {len(exp.fxprune.exprune.ops)} sites, {active} pruning after calibration on {len(calib)} "
          f"images  ({time.perf_counter() - clock:.0f} s)")

    images = test.x[:64]
    print(f"\n{'model':<20} {'test acc':>9} {'dense MACs/img':>15} {'effective MACs/img':>19} {'saved':>7}")
    for name, m in (("hyperflux (export)", pruned), ("hyperflux+exprune", exp)):
        report = fxprune.flops(m, images)
        print(f"{name:<20} {100 * accuracy(m, test):>8.1f}% {report.dense / len(images):>15,.0f} "
              f"{report.effective / len(images):>19,.0f} {100 * (1 - report.effective / report.dense):>6.1f}%")
    print("\nWhole-model MACs (stem and head included) per test image; effective = zero weights and "
          "ExPrune-predicted outputs skipped (dense kernels do not run faster on them).")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
