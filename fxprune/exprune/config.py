"""ExPrune configuration: which sites, which rule, how aggressive. The defaults prune nothing."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

from ..errors import ConfigError

RULES = ("threshold", "ztest")
PerSite = Union[float, Mapping[str, Union[float, Sequence[float]]]]


@dataclass
class ExPruneConfig:
    """Settings of the ExPrune pass (arXiv 2506.02210).

    Attributes:
        rule: "threshold" (predict negative when the extrapolated mean term is below ``threshold``)
            or "ztest" (predict negative when a one-sided z-test rejects "mean term >= 0" at
            significance ``alpha``).
        k: number of leading input channels (terms) summed before the prediction.
        threshold: T, a float for every site or a dict site name -> float (missing sites: -inf),
            where a conv/linear site may also take a list with one T per output channel (what
            ``calibrate`` returns). -inf prunes nothing; raising T prunes more.
        alpha: significance level in [0, 1], a float or a dict (missing sites: 0). 0 prunes nothing.
        heads: also apply dominance prediction to head sites (final linear used for top-1).
        sites: optional list of site names to include (default: every site found).
    """

    rule: str = "threshold"
    k: int = 32
    threshold: PerSite = -math.inf
    alpha: PerSite = 0.0
    heads: bool = False
    sites: Sequence[str] | None = None

    def __post_init__(self):
        if self.rule not in RULES:
            raise ConfigError(f"ExPruneConfig.rule must be one of {RULES}, got {self.rule!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"ExPruneConfig.k must be an int >= 1 (terms summed before predicting), got {self.k!r}")
        self.threshold = per_site("threshold", self.threshold, check_threshold, check_site_threshold)
        self.alpha = per_site("alpha", self.alpha, check_alpha)
        if not isinstance(self.heads, bool):
            raise ConfigError(f"ExPruneConfig.heads must be a bool, got {self.heads!r}")
        if self.sites is not None:
            if isinstance(self.sites, str) or not all(isinstance(s, str) for s in self.sites):
                raise ConfigError(f"ExPruneConfig.sites must be a list of site names (str) or None, got {self.sites!r}")
            self.sites = list(self.sites)

    def threshold_of(self, site: str) -> float | list[float]:
        return value_of(self.threshold, site, -math.inf)

    def alpha_of(self, site: str) -> float:
        return value_of(self.alpha, site, 0.0)


def check_threshold(field: str, value) -> float:
    """A threshold T: a real number or -inf/+inf, not NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"ExPrune {field} must be a float (-inf prunes nothing), got {value!r}")
    return float(value)


def check_site_threshold(field: str, value) -> float | list[float]:
    """One site's T: a float, or a non-empty list of per-output-channel floats (not NaN)."""
    values = value.tolist() if hasattr(value, "tolist") else value  # tensors and arrays (0-dim: a float)
    if not isinstance(values, (list, tuple)):
        return check_threshold(field, values)
    if not values:
        raise ConfigError(f"ExPrune {field} must be a float or a non-empty list of per-channel floats, got []")
    return [check_threshold(f"{field}[{i}]", v) for i, v in enumerate(values)]


def check_alpha(field: str, value) -> float:
    """A significance level alpha in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"ExPrune {field} must be a float in [0, 1] (0 prunes nothing), got {value!r}")
    return float(value)


def per_site(field: str, value, check, check_entry=None) -> float | dict:
    """Validate a float (``check``) or a dict site name -> value (``check_entry``, default ``check``);
    return a float or a plain dict."""
    if isinstance(value, Mapping):
        out = {}
        for name, v in value.items():
            if not isinstance(name, str):
                raise ConfigError(f"ExPrune {field} keys must be site names (str), got {name!r}")
            out[name] = (check_entry or check)(f"{field}[{name!r}]", v)
        return out
    return check(field, value)


def value_of(value: float | dict[str, float], site: str, default: float) -> float:
    return value.get(site, default) if isinstance(value, dict) else value
