"""torch.compile (Inductor) vs eager: dense and wrapped timm resnet18, graph breaks, output match.

Variants (timm resnet18, 10 classes, 3x32x32 inputs, random weights, no download):
- dense: the timm model itself;
- ExPrune: ``fxprune.wrap(model, x, exprune=ExPruneConfig(k=32, heads=True))`` with every threshold
  set to 0.0 (so the predictions and masks really run);
- Hyperflux: ``fxprune.wrap(model, x, hyperflux=HyperfluxConfig(0.9, ...))`` (weight gates, the
  straight-through mask on every conv/linear weight), inference and one training step (forward,
  backward, SGD step, ``model.fxprune.step()`` outside the compiled region).
For each: graph breaks from ``torch._dynamo.explain`` (goal 0), compile time (first call, seconds),
median eager and compiled time per call (milliseconds), and max |compiled - eager| of the outputs.
CPU always; CUDA too when ``torch.cuda.is_available()``. The device is in every row.

    .venv/bin/python benchmarks/compile_timings.py            # full run, updates BENCHMARKS.md
    .venv/bin/python benchmarks/compile_timings.py --quick    # < 60 s, prints only: the ExPrune model
                                                              # only, backend aot_eager (no code generation)
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import _common
import fxprune
from fxprune.app.demo import build_model

HEADING = "## Compile timings"


def variants(width: float, batch: int, device: str, quick: bool) -> list[tuple[str, str, nn.Module, bool]]:
    """(name, mode, model, train) for each measured case, on ``device``."""
    torch.manual_seed(0)
    dense = build_model("resnet18", 10, width).eval()
    x = torch.randn(batch, 3, 32, 32)
    ex = fxprune.wrap(dense, x[:8], exprune=fxprune.ExPruneConfig(k=32 if width >= 0.5 else 8, heads=True))
    ex.fxprune.exprune.set_thresholds(0.0)
    if quick:  # the smoke run: one wrapped model, inference
        return [("ExPrune (T = 0)", "inference", ex.to(device), False)]
    hf_config = fxprune.HyperfluxConfig(0.9, pruning_steps=1000)
    out = [("dense", "inference", copy.deepcopy(dense), False),
           ("ExPrune (T = 0)", "inference", ex, False),
           ("Hyperflux gates", "inference", fxprune.wrap(dense, x[:8], hyperflux=hf_config), False),
           ("dense", "training step", copy.deepcopy(dense).train(), True),
           ("Hyperflux gates", "training step",
            fxprune.wrap(copy.deepcopy(dense).train(), x[:8], hyperflux=hf_config), True)]
    return [(name, mode, m.to(device), train) for name, mode, m, train in out]


def measure(model: nn.Module, train: bool, x: torch.Tensor, y: torch.Tensor, repeats: int,
            backend: str = "inductor") -> dict:
    """Graph breaks, compile seconds, eager and compiled median seconds, max output difference."""
    torch._dynamo.reset()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    compiled = torch.compile(model, backend=backend)
    if train:
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        controller = getattr(model, "fxprune", None)

        def call(fn):
            logits = fn(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if controller is not None:
                controller.step()
            sync()
            return logits.detach()
    else:
        model.eval()

        @torch.no_grad()
        def call(fn):
            result = fn(x)
            sync()
            return result

    explain = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    with torch.no_grad():  # same weights and mode as the first compiled call (BN in train mode: batch stats)
        reference = model(x)
    t0 = time.perf_counter()
    first = call(compiled)
    compile_s = time.perf_counter() - t0
    diff = (first - reference).abs().max().item()
    eager = _common.median_time(lambda: call(model), repeats, warmup=1)
    fast = _common.median_time(lambda: call(compiled), repeats, warmup=1)
    return {"graph_breaks": explain.graph_break_count, "graphs": explain.graph_count,
            "break_reasons": [str(r.reason) for r in explain.break_reasons][:3],
            "compile_s": compile_s, "eager_s": eager, "compiled_s": fast, "max_diff": diff}


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64; quick 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 10; quick 2)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; quick aot_eager, "
                   "which skips code generation so that the smoke run stays short)")
    args = p.parse_args(argv)
    _common.setup(args)
    batch = args.batch or (4 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 10)
    width = 0.25 if args.quick else 1.0
    backend = args.backend or ("aot_eager" if args.quick else "inductor")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        label = "CPU" if device == "cpu" else f"CUDA ({torch.cuda.get_device_name()})"
        x = torch.randn(batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        for name, mode, model, train in variants(width, batch, device, args.quick):
            r = measure(model, train, x, y, repeats, backend)
            r.update(device=label, variant=name, mode=mode)
            rows.append(r)
            print(f"{label:<8} {name:<18} {mode:<14} breaks {r['graph_breaks']}  compile {r['compile_s']:5.1f} s  "
                  f"eager {1e3 * r['eager_s']:8.2f} ms  compiled {1e3 * r['compiled_s']:8.2f} ms  "
                  f"max diff {r['max_diff']:.2g}", flush=True)
    model_name = "timm resnet18" + ("" if width == 1.0 else f" (widths x{width})")
    body = [f"{model_name}, 10 classes, batch {batch} x 3x32x32, random weights. `torch.compile(model, "
            f"backend=\"{backend}\")`; graph breaks from `torch._dynamo.explain` (goal 0); times are medians of "
            f"{repeats} calls after one warm-up, in ms; compile = first compiled call, in s; max diff = largest "
            f"|compiled - eager| output element of the first call. Training step = forward + backward + SGD step "
            f"(+ `model.fxprune.step()` for Hyperflux, eager).",
            "",
            "| device | model | mode | graph breaks | compile (s) | eager (ms) | compiled (ms) | speed-up | max diff |",
            "|:--|:--|:--|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        reasons = f" ({'; '.join(r['break_reasons'])})" if r["graph_breaks"] else ""
        body.append(f"| {r['device']} | {r['variant']} | {r['mode']} | {r['graph_breaks']}{reasons} | "
                    f"{r['compile_s']:.1f} | {1e3 * r['eager_s']:.2f} | {1e3 * r['compiled_s']:.2f} | "
                    f"{r['eager_s'] / r['compiled_s']:.2f}x | {r['max_diff']:.2g} |")
    if "cuda" not in devices:
        body += ["", "No CUDA device on this machine: CPU rows only (the script adds CUDA rows where one exists)."]
    text = _common.section(HEADING, _common.command("compile_timings.py", argv), body, _common.load_note())
    _common.finish(args, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
