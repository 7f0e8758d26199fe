"""The application layer: programs built on the fxprune library, not part of it.

- :mod:`fxprune.app.cli`: the ``fxprune`` command (``analyze``, ``flops``, ``demo``);
- :mod:`fxprune.app.demo`: ``fxprune demo`` (dense -> Hyperflux -> Hyperflux + ExPrune on a
  small timm ResNet) and the training / measuring helpers the benchmark scripts share;
- :mod:`fxprune.app.data`: the small offline data sets the demo and benchmarks train on;
- :mod:`fxprune.app.models`: model builders from short command-line specs (timm names,
  ``pyg:...``, ``module:factory``) and checkpoint loading.

These modules use the library only through its public names and may need the libraries of the
``app`` extra (timm, scikit-learn, matplotlib, torchvision). The dependency goes one way: nothing
in the library (the stages, ``fxprune.wrap``, ``fxprune.integrations``) imports ``fxprune.app``, an
import contract in ``pyproject.toml`` (``lint-imports``) checks it, so ``import fxprune`` never
loads these modules or their libraries.
"""
