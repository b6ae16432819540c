"""The reproduction suite: the paper's experiments as resumable runs (see :mod:`.runner`, :mod:`.cli`)."""
