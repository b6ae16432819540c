"""The reproduction suite: the paper's experiments as resumable runs (see :mod:`.runner`, :mod:`.cli`)."""

__version__ = "0.1.0"  # the version in repro/pyproject.toml
