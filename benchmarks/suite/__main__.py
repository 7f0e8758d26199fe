"""``python -m benchmarks.suite``: see :mod:`benchmarks.suite.run`."""
from .run import main

raise SystemExit(main())
