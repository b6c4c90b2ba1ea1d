"""relu^2 (squared ReLU), the activation of every nemotron_h MLP and expert (So et al., "Primer", 2021).

`relu_squared` saves relu(u) and differentiates by hand (d/du relu(u)^2 = 2 relu(u)): two elementwise passes
forward and two backward, where autograd's relu-then-pow takes twice that. Twin: `relu_squared_reference`.
"""

from __future__ import annotations

import torch


def relu_squared_reference(u: torch.Tensor) -> torch.Tensor:
    return torch.relu(u) ** 2


def relu_squared(u: torch.Tensor) -> torch.Tensor:
    return _ReluSquared.apply(u)


class _ReluSquared(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u):
        r = torch.relu(u)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return (g * r).mul_(2.0)
