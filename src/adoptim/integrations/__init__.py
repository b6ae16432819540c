"""Adapters that put adoptim's ADOPT into other training stacks; each imports its stack only when used.

* :mod:`adoptim.integrations.timm`: ``register()`` adds ``"adoptim"`` and ``"adoptimw"`` to timm's
  optimizer factory (``timm.optim.create_optimizer_v2``).

Hugging Face ``Trainer``, PyTorch Lightning and torch.distributed (DDP, FSDP2, ZeroRedundancyOptimizer,
torch.distributed.checkpoint) need no adapter: ADOPT is a plain ``torch.optim.Optimizer`` (see the README).
"""
