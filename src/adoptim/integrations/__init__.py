"""Adapters that put adoptim's ADOPT into other training stacks; each imports its stack only when used.

* :mod:`adoptim.integrations.timm`: ``register()`` adds ``"adoptim"`` and ``"adoptimw"`` (and their
  ``8bit`` and ``bf16`` state forms) to timm's optimizer factory (``timm.optim.create_optimizer_v2``).
* :mod:`adoptim.integrations.hf`: ``optimizer_cls_and_kwargs(args)`` builds the pair for Hugging Face's
  ``Trainer(optimizer_cls_and_kwargs=...)`` from ``TrainingArguments`` (``learning_rate``, ``optim_args``).
* :mod:`adoptim.integrations.pytorch_optimizer`: ``convert_state_dict()`` turns a state_dict of
  pytorch_optimizer's ``ADOPT`` (steps kept per param group) into one ``ADOPT.load_state_dict`` takes.

Hugging Face ``Trainer`` takes ADOPT without it too, and PyTorch Lightning and torch.distributed (DDP,
FSDP2, ZeroRedundancyOptimizer, torch.distributed.checkpoint) need no adapter: ADOPT is a plain
``torch.optim.Optimizer`` (see the docs' Distributed page).
"""
