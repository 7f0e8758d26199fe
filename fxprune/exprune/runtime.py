"""ExPruneRuntime: the handle on a model's ExPrune ops (knobs and statistics)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

from torch import nn

from ..errors import ConfigError
from .config import check_alpha, check_site_threshold, check_threshold
from .ops import ExPruneOp


class ExPruneRuntime(nn.Module):
    """Controls the ExPrune ops injected into one model (``model.fxprune.exprune``).

    The ops live in the model graph (``<site>.exprune``); the runtime keeps plain references, so
    their buffers appear once in the model's state_dict.

    Attributes:
        ops: site name -> op, in graph order.
        skipped: site name -> why no op was injected there.
        rule, k: the rule and k of the config the ops were built with.
    """

    def __init__(self, ops: Mapping[str, ExPruneOp], skipped: Mapping[str, str], rule: str, k: int):
        super().__init__()
        self.ops = dict(ops)
        self.skipped = dict(skipped)
        self.rule, self.k = rule, k

    def extra_repr(self) -> str:
        return f"rule={self.rule}, k={self.k}, sites={len(self.ops)}, skipped={len(self.skipped)}"

    # -- knobs -----------------------------------------------------------------------------
    def set_thresholds(self, value: float | Mapping[str, float | list[float]]) -> None:
        """Set T for every site (a float) or for the named sites (a dict of floats, or of per-channel
        lists for conv/linear sites, as ``calibrate`` returns); -inf prunes nothing."""
        for name, v in self._per_site("threshold", value, check_threshold, check_site_threshold).items():
            self.ops[name].set_threshold(v)

    def set_alpha(self, value: float | Mapping[str, float]) -> None:
        """Set the z-test significance level for every site (a float) or the named sites (a dict)."""
        for name, v in self._per_site("alpha", value, check_alpha).items():
            self.ops[name].set_alpha(v)

    @contextmanager
    def safe_settings(self) -> Iterator[None]:
        """Within the block nothing is pruned (T = -inf, alpha = 0); the knobs are restored after."""
        saved = self.thresholds(), self.alphas()
        self.set_thresholds(float("-inf"))
        self.set_alpha(0.0)
        try:
            yield
        finally:
            self.set_thresholds(saved[0])
            self.set_alpha(saved[1])

    def thresholds(self) -> dict[str, float | list[float]]:
        """Site -> T: a float, or a list with one T per output channel."""
        return {name: op.threshold_value() for name, op in self.ops.items()}

    def pruning_sites(self) -> list[str]:
        """Sites whose knob can predict anything (some T > -inf, or alpha > 0 for the z-test)."""
        return [name for name, op in self.ops.items() if bool((op.cutoff() > float("-inf")).any())]

    def alphas(self) -> dict[str, float]:
        return {name: float(op.alpha) for name, op in self.ops.items()}

    def _per_site(self, field: str, value, check, check_entry=None) -> dict:
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(self.ops))
            if unknown:
                raise ConfigError(f"ExPrune {field}: no ExPrune op at {unknown}; sites with ops: {list(self.ops)}"
                                  + (f"; skipped: {self.skipped}" if self.skipped else ""))
            return {name: (check_entry or check)(f"{field}[{name!r}]", v) for name, v in value.items()}
        v = check(field, value)
        return {name: v for name in self.ops}

    # -- statistics ------------------------------------------------------------------------
    def reset_stats(self) -> None:
        for op in self.ops.values():
            op.reset_stats()

    def mac_counts(self) -> tuple[float, float]:
        """(dense MACs, effective MACs) of the ExPrune sites since the last reset."""
        dense = effective = 0.0
        for op in self.ops.values():
            d, e = op.mac_counts()
            dense, effective = dense + d, effective + e
        return dense, effective

    def effective_macs_saved(self) -> float:
        """MACs the predictions saved since the last reset (static MACs - effective MACs, all sites)."""
        return float(sum(op.stats()["saved_macs"] for op in self.ops.values()))

    def stats(self) -> dict:
        """{"sites": {name: op.stats()}, "total": sums over the sites}. Sites only, not the whole model."""
        sites = {name: op.stats() for name, op in self.ops.items()}
        keys = ("elements", "predicted", "dense_macs", "static_macs", "effective_macs", "saved_macs")
        total = {key: sum(s[key] for s in sites.values()) for key in keys}
        total["predicted_fraction"] = total["predicted"] / total["elements"] if total["elements"] else 0.0
        total["saved_fraction"] = total["saved_macs"] / total["static_macs"] if total["static_macs"] else 0.0
        return {"sites": sites, "total": total}
