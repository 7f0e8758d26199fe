"""fxprune: graph-level pruning for PyTorch models, built on torch.fx."""
from .analysis import Analysis, analyze, register_rule
from .capture import register_leaf_module
from .errors import ConfigError, FxpruneError, ShapeError, TraceError, WrapError

__version__ = "0.1.0"
