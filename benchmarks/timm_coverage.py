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

import contextlib
import copy
import json
import re
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import _common

sys.path.insert(0, str(_common.ROOT / "tests"))

import timm  # noqa: E402
from timm.models._registry import _model_to_module  # noqa: E402  (model name -> family module)

import fxprune  # noqa: E402
from permutation import find_broken_spaces, io_spaces, randomize_  # noqa: E402

# family (timm module) -> kind; families not listed count as "vit"
KINDS = {
    "cnn": """byobnet convmixer convnext cspnet cspnext densenet dla dpn efficientnet fasternet ghostnet hardcorenas
        hgnet hrnet inception_next inception_resnet_v2 inception_v3 inception_v4 lcnetv2 mambaout mobilenetv3 nasnet
        nfnet pnasnet rdnet regnet repghost repvit res2net resnest resnet resnetv2 rexnet selecsls senet sknet starnet
        tresnet vgg vovnet xception xception_aligned cpubone""".split(),
    "hybrid": """byoanet coat convit csatv2 davit edgenext efficientformer efficientformer_v2 efficientvim efficientvit_mit
        efficientvit_msra fastvit focalnet gcvit iformer levit lowformer maxxvit metaformer mobilevit nextvit pit
        pvt_v2 shvit swiftformer tiny_vit twins visformer vision_transformer_hybrid vitamin mobilenetv5""".split(),
    "mlp": ["mlp_mixer", "sequencer"],
}

# one or two small members per family; "name:size" pins the input size
MODELS = """
resnet18 resnet10t seresnet18 ecaresnet26t resnetblur18 skresnet18 resnest14d res2net50_14w_8s res2next50
resnetv2_18 resnetv2_50x1_bit resnetv2_50d_gn resnetv2_50d_evos densenet121 densenetblur121d dla34 dla46_c dpn48b
regnetx_002 regnety_002 efficientnet_b0 tf_efficientnet_b0 mixnet_s efficientnet_lite0 tinynet_e efficientnet_es
mnasnet_small mobilenetv2_050 efficientnet_b0_gn mobilenetv3_small_050 tf_mobilenetv3_small_minimal_100 lcnet_050
mobilenetv4_conv_small fbnetv3_b mobilenetv1_100 ghostnet_050 ghostnetv2_100 hardcorenas_a hgnet_tiny hgnetv2_b0
hrnet_w18_small inception_v3:96 inception_v4:96 inception_resnet_v2:96 nasnetalarge:96 pnasnet5large:96
nf_resnet26 dm_nfnet_f0 eca_nfnet_l0 nf_regnet_b0 repghostnet_050 repvit_m1 rexnet_100 rexnetr_100 selecsls42b
legacy_seresnet18 tresnet_m vgg11_bn ese_vovnet19b_dw eca_vovnet39b legacy_xception xception41 cspresnet50
cspdarknet53 cs3darknet_s darknet17 cspnext_tiny gernet_s repvgg_a0 regnetz_005 mobileone_s0 gcresnet33ts
eca_resnext26ts convnext_atto convnextv2_atto convmixer_768_32 fasternet_t0 inception_next_atto mambaout_femto
rdnet_tiny starnet_s050 lcnetv2_small cpubone_b0_bfrobust
botnet26t_256 halonet26t lambda_resnet26t poolformerv2_s12 convformer_s18 caformer_s18 csatv2 fastvit_t8
edgenext_xx_small efficientformer_l1 efficientformerv2_s0 efficientvit_b0 efficientvit_m0 efficientvim_m1
levit_128s mobilevit_xxs mobilevitv2_050 coatnet_pico_rw_224 maxvit_nano_rw_256 nextvit_small pit_ti_224 pvt_v2_b0
shvit_s1 swiftformer_xs tiny_vit_5m_224 twins_pcpvt_small twins_svt_small visformer_tiny vit_tiny_r_s16_p8_224
vitamin_small_224 lowformer_b0 iformer_t gcvit_xxtiny focalnet_tiny_srf davit_tiny coat_lite_tiny convit_tiny
mobilenetv4_hybrid_medium
mixer_s32_224 resmlp_12_224 gmlp_ti16_224 sequencer2d_s
vit_tiny_patch16_224 deit_tiny_patch16_224 eva02_tiny_patch14_224 beit_base_patch16_224 cait_xxs24_224
vit_relpos_small_patch16_224 samvit_base_patch16_224 volo_d1_224 tnt_s_patch16_224 nest_tiny mvitv2_tiny
hiera_tiny_224 hieradet_small xcit_nano_12_p16_224 crossvit_tiny_240 swin_tiny_patch4_window7_224
swinv2_cr_tiny_224 swinv2_tiny_window8_256
""".split()

QUICK = ["resnet18", "mobilenetv3_small_050", "densenet121", "regnetx_002", "convnext_atto", "vit_tiny_patch16_224"]

SMALL_SIZES = (64, 96, 128)


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


class StageError(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


@contextlib.contextmanager
def stage(name: str):
    try:
        yield
    except StageError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise StageError(name, f"{type(exc).__name__}: {msg}"[:300]) from exc


@contextlib.contextmanager
def time_limit(seconds: int):
    def _raise(signum, frame):
        raise TimeoutError(f"over {seconds} s")
    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def kind_of(family: str) -> str:
    return next((k for k, fams in KINDS.items() if family in fams), "vit")


def _flat(v):
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _flat(x)]
    if isinstance(v, dict):
        return [t for x in v.values() for t in _flat(x)]
    return []


def same_outputs(a, b, tol: float = 1e-4) -> str:
    """"" when every element agrees within ``tol`` x the output's scale, else a short description.

    fp32 rounding of a deep random network is ~1e-5 of its output scale (measured against float64),
    and any change of summation order (ExPrune splits each reduction at k) shows it.
    """
    ta, tb = _flat(a), _flat(b)
    if len(ta) != len(tb):
        return f"{len(ta)} vs {len(tb)} output tensors"
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return f"shape {tuple(x.shape)} vs {tuple(y.shape)}"
        scale = max(float(x.abs().max()), 1e-12)
        err = float((x - y).abs().max())
        if not err <= tol * scale:
            return f"max abs diff {err:.3g} (output scale {scale:.3g})"
    return ""


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


def build(name: str, pinned: int | None, seed: int = 0):
    """Create the model and find the smallest input it accepts. Returns (model, input)."""
    tries = [(pinned, {})] if pinned else [(s, {}) for s in SMALL_SIZES] + [(s, {"img_size": s}) for s in SMALL_SIZES]
    errors = []
    for size, kwargs in tries + [(None, {})]:
        try:
            model = timm.create_model(name, pretrained=False, **kwargs).eval()
            if size is None:
                size = model.pretrained_cfg["input_size"][-1]
            torch.manual_seed(seed)
            x = torch.randn(2, 3, size, size)
            with torch.no_grad():
                model(x)
            randomize_(model, seed, (x,))  # non-degenerate weights, BatchNorm statistics of x
            model.train()
            model.eval()  # timm clears eval-time caches (attention biases) on train(): drop stale ones
            return model, x
        except Exception as exc:  # the model rejects this size: try the next
            errors.append(f"{size}: {type(exc).__name__}")
    raise StageError("create", "no input size works: " + ", ".join(errors))


def check(name: str, pinned: int | None = None, timeout: int = 300) -> Result:
    family = _model_to_module.get(name, "?")
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
