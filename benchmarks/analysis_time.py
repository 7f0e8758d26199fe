"""Analysis time: fxprune.analyze on timm and PyG models, capture and analysis timed separately.

Capture = torch.fx tracing with the leaf policy + shape propagation on one example batch (batch 1).
Analysis = channel spaces (union-find over tensor and parameter axes), exchangeability, ExPrune
sites and Hyperflux gate targets (``Analysis.seconds``). Each model is analysed ``--repeats`` times;
the table gives the median. Goal: timm resnet50 at 224x224 in < 1 s of analysis time.

    .venv/bin/python benchmarks/analysis_time.py            # full run, updates BENCHMARKS.md
    .venv/bin/python benchmarks/analysis_time.py --quick    # < 60 s, prints only
"""
from __future__ import annotations

import statistics
import time

import _common
import fxprune
from fxprune.app.models import build

HEADING = "## Analysis time"
GOAL_S = 1.0
MODELS = ["resnet50:224", "resnet18:224", "mobilenetv3_large_100:224", "efficientnet_b0:224",
          "convnext_tiny:224", "vit_small_patch16_224:224", "densenet121:224", "pyg:GCN", "pyg:GIN"]
QUICK = ["resnet18:64", "pyg:GCN"]


def measure(spec: str, repeats: int) -> dict:
    """Build the model, analyse it ``repeats`` times; median capture and analysis seconds."""
    name, _, size = spec.rpartition(":") if not spec.startswith("pyg:") else (spec, "", "")
    shapes = [(1, 3, int(size), int(size))] if size else []
    model, inputs = build(name, shapes)
    captures, analyses, result = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fxprune.analyze(model, inputs)
        total = time.perf_counter() - t0
        captures.append(result.seconds.get("capture", float("nan")))
        analyses.append(result.seconds.get("analysis", float("nan")))
    return {
        "model": name, "input": "x".join(map(str, tuple(inputs[0].shape))),
        "params": sum(p.numel() for p in model.parameters()),
        "nodes": len(result.graph_module.graph.nodes), "spaces": len(result.spaces),
        "exchangeable": len(result.exchangeable_spaces), "prunable": len(result.prunable_spaces),
        "sites": len(result.sites), "capture_s": statistics.median(captures),
        "analysis_s": statistics.median(analyses), "last_total_s": total,
    }


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    p.add_argument("--models", nargs="+", help="timm_name:size or pyg:Name (default: a fixed list)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    _common.setup(args)
    specs = args.models or (QUICK if args.quick else MODELS)
    rows = []
    for spec in specs:
        row = measure(spec, 1 if args.quick else args.repeats)
        rows.append(row)
        print(f"{row['model']:<28} {row['input']:<12} nodes {row['nodes']:5d}  capture {row['capture_s']:6.3f} s  "
              f"analysis {row['analysis_s']:6.3f} s", flush=True)
    body = [f"Median of {1 if args.quick else args.repeats} runs of `fxprune.analyze(model, x)` (batch 1), in "
            f"seconds. Capture = FX tracing + shape propagation; analysis = channel spaces, exchangeability, "
            f"sites and gate targets (capture excluded). Goal: resnet50 at 224x224 analysed in < {GOAL_S:g} s.",
            "",
            "| model | input | parameters | graph nodes | spaces (exchangeable / prunable) | ExPrune sites "
            "| capture (s) | analysis (s) |",
            "|:--|:--|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        goal = ""
        if r["model"] == "resnet50" and r["input"].endswith("224x224"):
            goal = " (goal met)" if r["analysis_s"] < GOAL_S else " (goal NOT met)"
        body.append(f"| {r['model']} | {r['input']} | {_common.human(r['params'])} | {r['nodes']} | {r['spaces']} "
                    f"({r['exchangeable']} / {r['prunable']}) | {r['sites']} | {r['capture_s']:.3f} | "
                    f"{r['analysis_s']:.3f}{goal} |")
    text = _common.section(HEADING, _common.command("analysis_time.py", argv), body, _common.load_note())
    _common.finish(args, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
