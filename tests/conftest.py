"""Tests use tiny models: one thread is as fast as two for them, and far faster when the
machine's other core is busy (OpenMP threads then wait on each other at every small op)."""
import torch

torch.set_num_threads(1)
