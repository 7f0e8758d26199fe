"""The ``fxprune`` command: ``analyze``, ``flops`` and ``demo``.

Results go to stdout; progress (when stderr is a terminal) and library noise go to stderr. Bad input (unknown model, malformed
``--input-shape``, a checkpoint that does not fit, an untraceable model) prints one line
``fxprune: error: ...`` on stderr and exits with code 2.

MODEL is a timm name (``resnet18``), ``pyg:GCN|GraphSAGE|GIN|GAT|EdgeCNN`` or
``module:factory`` / ``path/to/file.py:factory`` (see :mod:`fxprune.app.models`).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import sys
import warnings
from typing import Sequence

from ..errors import ConfigError, FxpruneError

FORMATS = ("table", "json", "csv", "md")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"fxprune: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxprune", description="Graph-level pruning for PyTorch: analysis and FLOP reports.")
    sub = parser.add_subparsers(dest="command", metavar="{analyze,flops,demo}")

    model_help = ("timm name (resnet18), pyg:GCN|GraphSAGE|GIN|GAT|EdgeCNN, module:factory or "
                  "path/to/file.py:factory")
    shape_help = ("comma-separated input shape, e.g. 1,3,224,224 (pyg: num_nodes,features); repeat for "
                  "models with several inputs; default: timm's pretrained_cfg input size, batch 1")

    p = sub.add_parser("analyze", help="channel spaces and ExPrune sites of a model")
    p.add_argument("model", help=model_help)
    p.add_argument("--input-shape", action="append", metavar="SHAPE", help=shape_help)
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(run=_cmd_analyze)

    p = sub.add_parser("flops", help="dense and effective MACs/FLOPs (fvcore), per module")
    p.add_argument("model", help=model_help)
    p.add_argument("--input-shape", action="append", metavar="SHAPE", help=shape_help)
    p.add_argument("--exprune-threshold", type=float, metavar="T",
                   help="wrap with fxprune.wrap(model, inputs, exprune=ExPruneConfig(threshold=T)) first")
    p.add_argument("--checkpoint", metavar="PATH", help="state_dict to load into the model (strict)")
    p.add_argument("--unit", choices=("mac", "flop"), default="mac",
                   help="mac: one multiply-add = 1 (fvcore's convention, default); flop: 2 x MACs")
    p.add_argument("--depth", type=int, default=2, metavar="N", help="module depth of table/csv/md rows (default 2)")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--compare", metavar="OTHER.json", help="print a before (OTHER.json) / after (this run) comparison")
    p.add_argument("--plot", metavar="OUT.png", help="save per-layer dense vs effective bars as PNG")
    p.set_defaults(run=_cmd_flops)

    sub.add_parser("demo", help="run fxprune's demo (arguments are passed to it)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated")
    if argv and argv[0] == "demo":
        return _run(_cmd_demo, argv[1:])
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(argv))
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return _run(args.run, args)


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--exprune-threshold -inf`` -> ``--exprune-threshold=-inf`` (argparse takes -inf for an option)."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--exprune-threshold" and arg.startswith("-"):
            out[-1] = f"--exprune-threshold={arg}"
        else:
            out.append(arg)
    return out


def _run(command, args) -> int:
    try:
        return command(args) or 0
    except FxpruneError as exc:
        print(f"fxprune: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (`fxprune ... | head`): not an error
        sys.stdout = open(os.devnull, "w")
        return 0


def _progress(message: str) -> None:
    """Progress on stderr, only for a person watching (a terminal): errors stay one line."""
    if sys.stderr.isatty():
        print(f"fxprune: {message}", file=sys.stderr, flush=True)


def _load(args, with_checkpoint: bool = False):
    from .models import build, load_checkpoint, parse_shape

    shapes = [parse_shape(s) for s in (args.input_shape or [])]
    _progress(f"building {args.model}")
    with contextlib.redirect_stdout(sys.stderr):
        model, inputs = build(args.model, shapes)
        if with_checkpoint and args.checkpoint:
            load_checkpoint(model, args.checkpoint)
    return model, inputs


def _cmd_analyze(args) -> int:
    import fxprune

    model, inputs = _load(args)
    _progress("analyzing")
    with contextlib.redirect_stdout(sys.stderr):
        analysis = fxprune.analyze(model, inputs)
    analysis.model_name = args.model
    print(analysis.to_json(indent=2) if args.format == "json" else analysis.summary())
    return 0


def _cmd_flops(args) -> int:
    from ..report import FlopReport, flops

    if args.depth < 0:
        raise ConfigError(f"--depth must be >= 0, got {args.depth}")
    other = FlopReport.load(args.compare) if args.compare else None
    model, inputs = _load(args, with_checkpoint=True)
    with contextlib.redirect_stdout(sys.stderr):
        if args.exprune_threshold is not None:
            model = _wrap_exprune(model, inputs, args.exprune_threshold)
        _progress("counting with fvcore")
        report = flops(model, inputs, unit=args.unit, name=args.model)
    result = report.compare(other) if other is not None else report
    if args.format == "json":
        print(result.to_json(indent=2))
    elif args.format == "csv":
        print(result.to_csv(depth=args.depth), end="")
    elif args.format == "md":
        print(result.to_markdown(depth=args.depth))
    else:
        print(result.table(depth=args.depth))
    if args.plot:
        report.plot(args.plot)
        _progress(f"wrote {args.plot}")
    return 0


def _wrap_exprune(model, inputs, threshold: float):
    try:
        import fxprune

        wrap, config_cls = fxprune.wrap, fxprune.ExPruneConfig
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--exprune-threshold needs fxprune.wrap and fxprune.ExPruneConfig, which this "
                          f"installation lacks ({exc})") from exc
    if math.isnan(threshold):
        raise ConfigError("--exprune-threshold must be a number (or -inf), got nan")
    _progress(f"wrapping with ExPrune (threshold {threshold:g})")
    return wrap(model, inputs, exprune=config_cls(threshold=threshold))


def _cmd_demo(argv: list[str]) -> int:
    try:
        demo = importlib.import_module("fxprune.app.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "fxprune.app.demo":
            raise
        raise ConfigError("fxprune demo is not available: fxprune/app/demo.py is not part of this installation "
                          "yet (use 'fxprune analyze' or 'fxprune flops')") from exc
    return demo.main(argv) or 0


if __name__ == "__main__":
    sys.exit(main())
