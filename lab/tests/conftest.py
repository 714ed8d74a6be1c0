"""As in tests/conftest.py: the tiny models of these tests run fastest on one thread, above all
when the machine's other core is busy (OpenMP threads then wait on each other at every small op)."""
import torch

torch.set_num_threads(1)
