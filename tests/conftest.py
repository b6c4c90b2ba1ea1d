"""Shared test settings. Tests use tiny models, for which one thread is fastest (and robust on busy machines)."""

import torch

torch.set_num_threads(1)
