"""relu^2 (squared ReLU), the activation of every nemotron_h MLP and expert (So et al., "Primer", 2021): its one home.

- `relu_squared`: the autograd op the dense MLP and the shared expert use. It saves relu(u) and differentiates by
  hand (d/du relu(u)^2 = 2 relu(u)): two elementwise passes forward and two backward, where autograd's
  relu-then-square takes twice that.
- `relu_squared_backward(u, dh)`: the same gradient from the pre-activation u, written into dh, for kernels that keep
  u and recompute the activation in their own backward (`kernels.moe`'s "relu2" expert activation).
- `relu_squared_reference`: the plain differentiable twin the tests compare both with.

All three compute relu(u) * relu(u) forward and dh * relu(u) * 2 backward, in that order, so they agree bit for bit.
"""

from __future__ import annotations

import torch


def relu_squared_reference(u: torch.Tensor) -> torch.Tensor:
    return torch.relu(u) ** 2


def relu_squared(u: torch.Tensor) -> torch.Tensor:
    return _ReluSquared.apply(u)


def relu_squared_backward(u: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """du for h = relu(u)^2 given dh = dL/dh; overwrites dh and returns it."""
    return _grad(torch.relu(u), dh, out=dh)


def _grad(r: torch.Tensor, dh: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.mul(dh, r, out=out).mul_(2.0)  # d/du relu(u)^2 = 2 relu(u), with r = relu(u)


class _ReluSquared(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u):
        r = torch.relu(u)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return _grad(r, g)
