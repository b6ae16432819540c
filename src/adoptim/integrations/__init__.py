"""Adapters that put adoptim's ADOPT into other training stacks; each imports its stack only when used.

* :mod:`adoptim.integrations.timm`: ``register()`` adds ``"adoptim"`` and ``"adoptimw"`` to timm's
  optimizer factory (``timm.optim.create_optimizer_v2``).
* :mod:`adoptim.integrations.pytorch_optimizer`: ``convert_state_dict()`` turns a state_dict of
  pytorch_optimizer's ``ADOPT`` (steps kept per param group) into one ``ADOPT.load_state_dict`` takes.

Hugging Face ``Trainer``, PyTorch Lightning and torch.distributed (DDP, FSDP2, ZeroRedundancyOptimizer,
torch.distributed.checkpoint) need no adapter: ADOPT is a plain ``torch.optim.Optimizer`` (see the docs'
Distributed page).
"""
