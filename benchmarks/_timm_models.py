"""timm models for the benchmark scripts: the model list, family kinds, and the helpers to build
one model at a small input and compare outputs (shared by timm_coverage.py and timm_channel_export.py).

A family is the timm module that defines a model (``timm.models._registry._model_to_module``).
"""
from __future__ import annotations

import contextlib
import signal
import sys

import torch

import _common

sys.path.insert(0, str(_common.ROOT / "tests"))

import timm  # noqa: E402
from timm.models._registry import _model_to_module  # noqa: E402  (model name -> family module)

from permutation import randomize_  # noqa: E402

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

SMALL_SIZES = (64, 96, 128)


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


def family_of(name: str) -> str:
    """The timm family (defining module) of a model name, "?" when timm does not know it."""
    return _model_to_module.get(name, "?")


def all_families() -> dict[str, list[str]]:
    """Every timm family -> its model names (``timm.list_models()`` order)."""
    families: dict[str, list[str]] = {}
    for name in timm.list_models():
        families.setdefault(family_of(name), []).append(name)
    return families


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
