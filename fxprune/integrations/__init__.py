"""Integrations with model libraries (installed as ``fxprune.integrations``).

Importing this package registers the capture hooks and axis rules of every library that is
installed (timm, PyTorch Geometric); a missing library is skipped silently.
"""
from importlib import import_module

for _name in ("timm", "pyg"):
    try:
        import_module(f"{__name__}.{_name}")
    except ImportError as _exc:  # library not installed: nothing to register
        if _name not in str(_exc) and "torch_geometric" not in str(_exc):
            raise
