"""``python -m adoptim_repro``: the experiment command line (see :mod:`adoptim_repro.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
