"""Shared test setup: one torch thread per process (tests run as two parallel workers)."""

import os

import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
