"""``python -m adoptim``: the experiment command line (see :mod:`adoptim.experiments.cli`)."""

import sys

from .experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
