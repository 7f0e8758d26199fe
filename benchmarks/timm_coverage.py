"""timm coverage: which timm models fxprune analyses and wraps faithfully.

For each model (pretrained=False, eval mode, degenerate parameters randomized, batch 2 at the
smallest input size it accepts, trying 64x64 first):

1. capture + analysis; the captured graph must reproduce the model's outputs;
2. permutation property: permuting every exchangeable space (one random permutation each) leaves
   the outputs unchanged; no exchangeable space carries a model input or output;
3. wrap with ExPrune at its safe defaults (threshold -inf) reproduces the outputs;
4. wrap with Hyperflux (weight and channel granularity, gates all open) reproduces the outputs.

A model passes when every step does; a family passes when all its models do.

    .venv/bin/python benchmarks/timm_coverage.py           # every model below, updates BENCHMARKS.md
    .venv/bin/python benchmarks/timm_coverage.py --quick   # a handful (< 60 s), prints only
"""
from __future__ import annotations

import copy
import json
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import _common
from _timm_models import (MODELS, StageError, build, family_of, kind_of, same_outputs, stage,
                          time_limit)

import fxprune  # noqa: E402
from permutation import find_broken_spaces, io_spaces  # noqa: E402  (tests/ is on sys.path via _timm_models)

QUICK = ["resnet18", "mobilenetv3_small_050", "densenet121", "regnetx_002", "convnext_atto", "vit_tiny_patch16_224"]


@dataclass
class Result:
    model: str
    family: str
    kind: str
    passed: bool = False
    stage: str = ""
    reason: str = ""
    input_size: int = 0
    spaces: int = 0
    exchangeable: int = 0
    prunable: int = 0
    enp_sites: int = 0
    head_sites: int = 0
    unknown_ops: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    seconds: float = 0.0


def wrapped_outputs(model, x, kwargs: dict):
    wrapped = fxprune.wrap(model, x, check=False, **kwargs)
    wrapped.eval()
    with torch.no_grad():
        return wrapped(x)


def confirm_in_fp64(model, x, kwargs: dict) -> bool:
    """Whether the wrapped model matches the original in float64 (fp32 mismatch = rounding only)."""
    try:
        md, xd = copy.deepcopy(model).double(), x.double()
        with torch.no_grad():
            ref = md(xd)
        return not same_outputs(ref, wrapped_outputs(md, xd, kwargs), tol=1e-9)
    except Exception:
        return False


def check(name: str, pinned: int | None = None, timeout: int = 300) -> Result:
    family = family_of(name)
    r = Result(name, family, kind_of(family))
    t0 = time.perf_counter()
    try:
        with time_limit(timeout):
            with stage("create"):
                model, x = build(name, pinned)
            r.input_size = x.shape[-1]
            with torch.no_grad():
                ref = model(x)
            with stage("analyze"):
                a = fxprune.analyze(model, x)
            r.spaces, r.exchangeable, r.prunable = len(a.spaces), len(a.exchangeable_spaces), len(a.prunable_spaces)
            r.enp_sites = sum(s.kind == "enp" for s in a.sites)
            r.head_sites = sum(s.kind == "head" for s in a.sites)
            r.unknown_ops = sorted({re.sub(r"module '[^']*' ", "module ", d) for d in a.unknown_ops})
            with stage("capture"), torch.no_grad():
                diff = same_outputs(ref, a.graph_module(x))
                if diff:
                    raise StageError("capture", f"captured graph differs from the model: {diff}")
            with stage("permutation"):
                spaces = [s for s in a.exchangeable_spaces if s.size > 1]
                broken = find_broken_spaces(model, (x,), spaces, reference=ref, atol=1e-4)
                if broken:
                    s, msg = broken[0]
                    members = ", ".join(f"{m.key}[{m.axis}]" for m in s.members[:3])
                    raise StageError("permutation", f"{len(broken)} space(s) not symmetric, e.g. {s.id} ({members})")
                if io_spaces(a):
                    raise StageError("permutation", "an exchangeable space carries a model input/output")
            del a
            for label, kwargs in wrap_settings():
                with stage(label):
                    try:
                        out = wrapped_outputs(model, x, kwargs)
                    except fxprune.ConfigError as exc:
                        if "found nothing it can gate" not in str(exc):
                            raise
                        r.notes.append(f"{label}: nothing to gate")
                        continue
                    diff = same_outputs(ref, out)
                    if diff and not confirm_in_fp64(model, x, kwargs):
                        raise StageError(label, f"wrapped output differs: {diff}")
                    if diff:
                        r.notes.append(f"{label}: fp32 rounding {diff} (exact in float64)")
        r.passed = True
    except StageError as exc:
        r.stage, r.reason = exc.stage, exc.reason
    except TimeoutError as exc:
        r.stage, r.reason = "timeout", str(exc)
    except Exception as exc:  # a bug in this script: report it, keep going
        r.stage, r.reason = "script", f"{type(exc).__name__}: {exc}"[:300]
        traceback.print_exc()
    r.seconds = time.perf_counter() - t0
    return r


def wrap_settings() -> list[tuple[str, dict]]:
    """(label, wrap kwargs): the safe / all-open settings that must reproduce the outputs."""
    return [
        ("exprune", dict(exprune=fxprune.ExPruneConfig())),
        ("hyperflux", dict(hyperflux=fxprune.HyperfluxConfig(0.5, pruning_steps=10))),
        ("hyperflux-ch", dict(hyperflux=fxprune.HyperfluxConfig(0.5, granularity="channel", pruning_steps=10))),
    ]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def summary(results: list[Result]) -> list[str]:
    lines = []
    for kind in ("cnn", "hybrid", "mlp", "vit"):
        rs = [r for r in results if r.kind == kind]
        if not rs:
            continue
        fams = sorted({r.family for r in rs})
        fam_ok = [f for f in fams if all(r.passed for r in rs if r.family == f)]
        lines.append(f"- {kind}: {sum(r.passed for r in rs)}/{len(rs)} models, {len(fam_ok)}/{len(fams)} families pass")
    core = [r for r in results if r.kind in ("cnn", "hybrid")]
    if core:
        fams = sorted({r.family for r in core})
        ok = [f for f in fams if all(r.passed for r in core if r.family == f)]
        lines.append(f"- CNN + hybrid families: {len(ok)}/{len(fams)} = {100 * len(ok) / len(fams):.1f} % pass")
    with_space = [r for r in results if r.exchangeable]
    with_site = [r for r in results if r.enp_sites]
    lines.append(f"- models with an exchangeable space: {len(with_space)}/{len(results)}; "
                 f"with an ExPrune ENP site: {len(with_site)}/{len(results)}")
    return lines


def table(results: list[Result]) -> list[str]:
    rows = ["| model | family | kind | input | pass | spaces (exch / prunable) | ENP + head sites | ops with no rule | failure / notes |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        unknown = "; ".join(r.unknown_ops[:3]) + (f" (+{len(r.unknown_ops) - 3})" if len(r.unknown_ops) > 3 else "")
        fail = f"{r.stage}: {r.reason}".replace("|", "/") if not r.passed else "; ".join(r.notes)
        rows.append(f"| {r.model} | {r.family} | {r.kind} | {r.input_size or '-'} | {'yes' if r.passed else '**no**'} | "
                    f"{r.spaces} ({r.exchangeable} / {r.prunable}) | {r.enp_sites} + {r.head_sites} | "
                    f"{unknown.replace('|', '/')} | {fail} |")
    return rows


HEADING = "## timm coverage"
CHECKS = ("Checks per model (pretrained=False, eval, batch 2, smallest input of 64/96/128 it accepts): the captured "
          "graph reproduces the outputs; permuting every exchangeable space leaves the outputs unchanged and no such "
          "space carries an input/output; safe ExPrune and all-open Hyperflux (weight and channel granularity) wraps "
          "reproduce the outputs (within 1e-4 of the output scale in fp32; a larger fp32 difference passes only if "
          "float64 agrees to 1e-9, noted in the table). A family passes when all its models pass.")


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    p.add_argument("--models", help="comma-separated model names (name or name:size)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per model")
    p.add_argument("--json", help="also write the results as JSON here")
    args = p.parse_args(argv)
    _common.setup(args)
    specs = args.models.split(",") if args.models else (QUICK if args.quick else MODELS)
    results, t0 = [], time.perf_counter()
    for spec in specs:
        name, _, size = spec.partition(":")
        r = check(name, int(size) if size else None, args.timeout)
        results.append(r)
        status = "ok " if r.passed else f"FAIL {r.stage}: {r.reason}"
        print(f"{r.model:<36} {r.seconds:6.1f}s  spaces {r.spaces:4d} exch {r.exchangeable:4d} "
              f"sites {r.enp_sites:3d}+{r.head_sites}  {status}", flush=True)
    minutes = (time.perf_counter() - t0) / 60
    body = [CHECKS, "", *summary(results), f"- total time {minutes:.1f} min", "", *table(results)]
    text = _common.section(HEADING, _common.command("timm_coverage.py", argv), body, _common.load_note())
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    _common.finish(args, text)
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
