"""Integrations with model libraries, one module per library: ``timm``, ``pyg`` (PyTorch Geometric;
its ExPrune sites in ``pyg_exprune``).

Each module describes its library in one ``INTEGRATION`` (:class:`fxprune.plugins.Integration`);
:func:`fxprune.plugins.integrations` loads those whose library is installed. Importing this package
or one of its modules registers nothing, and the core never imports them by name.
"""
