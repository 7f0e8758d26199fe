"""Channel export over timm families: is every space Hyperflux gates removable by fxprune.export?

One model per timm family (the smallest by parameter count among the family's models in
timm_coverage.py's list, or among all its models for a family not listed; pretrained=False, eval
mode, batch 2 at the smallest input it accepts, like timm_coverage.py). Each is wrapped with
``HyperfluxConfig(0.5, granularity="channel", pruning_steps=100)``; in every gated space ~30 % of
the channels (at least one) are closed at random through the public runtime, then
``fxprune.export`` runs. Outcome per family:

- ok: the exported model is smaller and its outputs equal the gated model's within 1e-4 of the
  output scale (``export(model, atol=1e-4)``; export's default atol, 1e-5 of the scale, is tighter
  than the fp32 rounding of some deep random networks: rexnet differs by ~5e-5 of its scale in
  fp32 and by 1e-14 in float64);
- no space: the wrap found no channel space it can gate (the reason is recorded);
- export error / mismatch / not smaller: export failed, its outputs differ, or nothing was removed;
- error / timeout: the model could not be built or wrapped (not counted in the rate).

Rate = ok / families with a gated space.

    .venv/bin/python benchmarks/timm_channel_export.py           # every family, updates BENCHMARKS.md
    .venv/bin/python benchmarks/timm_channel_export.py --quick   # a handful, prints only
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from tqdm import tqdm

import _common
from _timm_models import MODELS, all_families, build, family_of, same_outputs, time_limit

import fxprune  # noqa: E402

QUICK = ["resnet18", "efficientvim_m1", "efficientformerv2_s0", "convnext_atto"]
CLOSED_FRACTION = 0.3
PINNED_SIZES = {"deepseek_vit_412m": 56}  # families not in timm_coverage's list: an input their patch size divides
TOLERANCE = 1e-4  # of the output's largest magnitude: fp32 rounding of a deep random network is ~1e-5
HEADING = "## Channel export over timm families"


@dataclass
class Outcome:
    family: str
    model: str
    outcome: str = ""
    detail: str = ""
    input_size: int = 0
    spaces: int = 0
    closed: int = 0
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0


def parameter_count(name: str) -> float:
    """Parameters of a timm model, counted on the meta device (no memory); inf when it cannot be built."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return float("inf")


def family_models() -> list[str]:
    """One model spec ("name" or "name:size") per timm family: its smallest candidate."""
    listed: dict[str, list[str]] = {}
    for spec in MODELS:
        listed.setdefault(family_of(spec.partition(":")[0]), []).append(spec)
    chosen = []
    for family, names in sorted(all_families().items()):
        candidates = listed.get(family, names)
        spec = min(candidates, key=lambda spec: parameter_count(spec.partition(":")[0]))
        chosen.append(f"{spec}:{PINNED_SIZES[spec]}" if spec in PINNED_SIZES else spec)
    return chosen


def close_channels(runtime, fraction: float, seed: int = 0) -> int:
    """Close ``fraction`` of every gated space's channels (at least one) at random; the count closed."""
    generator = torch.Generator().manual_seed(seed)
    closed = 0
    with torch.no_grad():
        for plan in runtime.channel_plans:
            score = runtime.gates[plan.gate_index].score
            k = max(1, round(fraction * plan.size))
            score[torch.randperm(plan.size, generator=generator)[:k]] = -0.1
            closed += k
    return closed


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def first_line(exc: Exception, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:limit]


def check(spec: str, timeout: int) -> Outcome:
    name, _, size = spec.partition(":")
    r = Outcome(family_of(name), name)
    t0 = time.perf_counter()
    try:
        with time_limit(timeout):
            model, x = build(name, int(size) if size else None)
            r.input_size, r.params_before = x.shape[-1], n_params(model)
            config = fxprune.HyperfluxConfig(0.5, granularity="channel", pruning_steps=100)
            try:
                wrapped = fxprune.wrap(model, x, check=False, hyperflux=config)
            except fxprune.ConfigError as exc:
                if "found nothing it can gate" not in str(exc):
                    raise
                r.outcome, r.detail = "no space", str(exc).split("(", 1)[-1].rstrip(")")[:300]
                return r
            runtime = wrapped.fxprune.hyperflux
            r.spaces = len(runtime.channel_plans)
            r.closed = close_channels(runtime, CLOSED_FRACTION)
            wrapped.eval()
            try:
                plain = fxprune.export(wrapped, atol=TOLERANCE)
            except fxprune.ExportError as exc:
                r.outcome = "mismatch" if "differs from the gated model" in str(exc) else "export error"
                r.detail = first_line(exc)
                return r
            r.params_after = n_params(plain)
            with torch.no_grad():
                diff = same_outputs(wrapped(x), plain(x), TOLERANCE)
            if diff:
                r.outcome, r.detail = "mismatch", diff
            elif r.params_after >= r.params_before:
                r.outcome = "not smaller"
            else:
                r.outcome = "ok"
    except TimeoutError as exc:
        r.outcome, r.detail = "timeout", str(exc)
    except Exception as exc:
        r.outcome, r.detail = "error", first_line(exc)
    finally:
        r.seconds = time.perf_counter() - t0
    return r


def rate_lines(results: list[Outcome]) -> list[str]:
    gated = [r for r in results if r.outcome not in ("no space", "error", "timeout")]
    ok = [r for r in gated if r.outcome == "ok"]
    pct = 100 * len(ok) / len(gated) if gated else 0.0
    lines = [f"- families measured: {len(results)}; with a gated channel space: {len(gated)}; "
             f"no space to gate: {sum(r.outcome == 'no space' for r in results)}; "
             f"not built/wrapped (error, timeout): {sum(r.outcome in ('error', 'timeout') for r in results)}",
             f"- **export ok (smaller, outputs equal within 1e-4): {len(ok)}/{len(gated)} = {pct:.1f} %**"]
    saved = [1 - r.params_after / r.params_before for r in ok if r.params_before]
    if saved:
        lines.append(f"- parameters removed by export with {CLOSED_FRACTION:.0%} of each space closed: "
                     f"median {100 * sorted(saved)[len(saved) // 2]:.1f} %")
    return lines


def table(results: list[Outcome]) -> list[str]:
    rows = ["| family | model | input | gated spaces | closed channels | params before -> after | outcome | detail |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        params = (f"{_common.human(r.params_before)} -> {_common.human(r.params_after)}" if r.params_after
                  else (_common.human(r.params_before) if r.params_before else "-"))
        outcome = r.outcome if r.outcome in ("ok", "no space") else f"**{r.outcome}**"
        rows.append(f"| {r.family} | {r.model} | {r.input_size or '-'} | {r.spaces} | {r.closed} | {params} | "
                    f"{outcome} | {r.detail.replace('|', '/')} |")
    return rows


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    p.add_argument("--models", help="comma-separated model specs (name or name:size) instead of one per family")
    p.add_argument("--timeout", type=int, default=120, help="seconds per model")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.threads = args.threads or 1
    _common.setup(args)
    specs = args.models.split(",") if args.models else (QUICK if args.quick else family_models())
    results, t0 = [], time.perf_counter()
    bar = tqdm(specs, disable=args.no_progress, desc="export", file=sys.stderr)
    for spec in bar:
        bar.set_postfix_str(spec)
        r = check(spec, args.timeout)
        results.append(r)
        tqdm.write(f"{r.family:<26} {r.model:<32} {r.seconds:6.1f}s  {r.outcome:<12} {r.detail[:120]}")
    minutes = (time.perf_counter() - t0) / 60
    failures = [r for r in results if r.outcome not in ("ok", "no space")]
    body = [__doc__.split("\n\n")[1].replace("\n", " "), "",
            *rate_lines(results), f"- total time {minutes:.1f} min (1 thread)", "",
            "Failures: " + ("; ".join(f"{r.model} ({r.outcome}: {r.detail[:160]})" for r in failures) or "none") + ".",
            "", *table(results)]
    text = _common.section(HEADING, _common.command("timm_channel_export.py", argv), body, _common.load_note())
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    _common.finish(args, text)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
