"""A deep linear network trained with feedback alignment: the demo's testbed for credit rules.

Layers ``h_{l+1} = h_l W_lᵀ`` (``W_l`` of shape ``[d_{l+1}, d_l]``), widths ``[d, ..., d, k]`` with
``k < d`` outputs, loss ``½‖h_L − y‖²`` per item on a noisy linear teacher ``y = x Tᵀ + noise``.
Backprop sends the error back through the forward weights, ``a_l = a_{l+1} W_l``; feedback
alignment (Lillicrap et al., 2016) through fixed random matrices ``B_l`` of the same shapes,
``a_l = a_{l+1} B_l``, and trains the weights with that credit: the forward weights come to align
with ``B``, so the feedback-alignment credit of the hidden layers turns towards the gradient
over the training.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["CREDIT_RULES", "FeedbackAlignmentChain", "rule_credit"]

#: Credit rules compared by the demo, from the exact gradient to no information.
CREDIT_RULES = ("backprop", "feedback_alignment", "noisy", "random")


class FeedbackAlignmentChain(nn.Module):
    """A linear chain with fixed random feedback weights, trained by feedback alignment.

    Args:
        dim: hidden width ``d``.
        num_layers: weight matrices ``L``; the diagnosed hidden layers are ``h_1 .. h_{L-1}``.
        out_dim: outputs ``k``.
        seed: seed of the weights, the feedback weights and the teacher.
        init_scale: scale of the initial forward weights (small: the alignment shows sooner).

    Examples:
        >>> chain = FeedbackAlignmentChain(dim=8, num_layers=3, out_dim=2, seed=0)
        >>> x, y = chain.sample(5, torch.Generator().manual_seed(1))
        >>> hidden, exact, aligned = chain.credits(x, y)
        >>> len(hidden), hidden[0].shape, exact[-1].shape
        (2, torch.Size([5, 8]), torch.Size([5, 8]))
    """

    teacher: Tensor

    def __init__(self, dim: int, num_layers: int, out_dim: int, seed: int, init_scale: float = 0.1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        widths = [dim] * num_layers + [out_dim]
        for layer in range(num_layers):
            fan_in, fan_out = widths[layer], widths[layer + 1]
            w = init_scale * torch.randn(fan_out, fan_in, generator=g) / math.sqrt(fan_in)
            self.register_buffer(f"weight_{layer}", w)
            self.register_buffer(
                f"feedback_{layer}", torch.randn(fan_out, fan_in, generator=g) / math.sqrt(fan_out)
            )
        self.register_buffer("teacher", torch.randn(out_dim, dim, generator=g) / math.sqrt(dim))
        self.num_layers = num_layers

    def weight(self, layer: int) -> Tensor:
        return getattr(self, f"weight_{layer}")  # type: ignore[no-any-return]

    def feedback(self, layer: int) -> Tensor:
        return getattr(self, f"feedback_{layer}")  # type: ignore[no-any-return]

    def sample(self, n: int, generator: torch.Generator, target_noise: float = 0.3) -> tuple[Tensor, Tensor]:
        """``n`` inputs ``x ~ N(0, I)`` and teacher targets ``y = x Tᵀ + target_noise · ξ``."""
        x = torch.randn(n, self.teacher.shape[1], generator=generator)
        y = x @ self.teacher.T + target_noise * torch.randn(n, self.teacher.shape[0], generator=generator)
        return x.to(self.teacher), y.to(self.teacher)

    def states(self, x: Tensor) -> list[Tensor]:
        """``[h_0 = x, h_1, ..., h_L]``."""
        states = [x]
        for layer in range(self.num_layers):
            states.append(states[-1] @ self.weight(layer).T)
        return states

    def loss_from(self, layer: int, y: Tensor) -> Callable[[Tensor], Tensor]:
        """Per-item loss ``½‖h_L − y‖²`` as a function of ``h_layer`` (stacked copies of the batch too)."""

        def loss_fn(h: Tensor) -> Tensor:
            for later in range(layer, self.num_layers):
                h = h @ self.weight(later).T.to(h)
            targets = y.repeat(h.shape[0] // y.shape[0], 1).to(h)
            return 0.5 * (h - targets).square().sum(-1)

        return loss_fn

    def credits(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Hidden states ``h_1 .. h_{L-1}`` with their backprop and feedback-alignment credits."""
        states = self.states(x)
        exact, aligned = states[-1] - y, states[-1] - y
        exact_credits: list[Tensor] = []
        aligned_credits: list[Tensor] = []
        for layer in reversed(range(1, self.num_layers)):
            exact = exact @ self.weight(layer)
            aligned = aligned @ self.feedback(layer)
            exact_credits.insert(0, exact)
            aligned_credits.insert(0, aligned)
        return states[1:-1], exact_credits, aligned_credits

    @torch.no_grad()
    def train_steps(self, steps: int, lr: float, batch_size: int, generator: torch.Generator) -> None:
        """``steps`` SGD steps of feedback alignment: ``ΔW_l = −lr · mean(a_{l+1}ᵀ h_l)``."""
        for _ in range(steps):
            x, y = self.sample(batch_size, generator)
            states = self.states(x)
            credit = states[-1] - y
            for layer in reversed(range(self.num_layers)):
                self.weight(layer).sub_(lr * credit.T @ states[layer] / batch_size)
                credit = credit @ self.feedback(layer)


def rule_credit(rule: str, exact: Tensor, aligned: Tensor, generator: torch.Generator) -> Tensor:
    """The credit a rule assigns: the gradient, feedback alignment, the gradient plus isotropic noise
    of the same per-item norm (cosine ≈ 1/√2 with it), or noise of that norm alone."""
    if rule == "backprop":
        return exact
    if rule == "feedback_alignment":
        return aligned
    noise = torch.randn(exact.shape, generator=generator).to(exact)
    noise = noise * (exact.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True))
    if rule == "noisy":
        return exact + noise
    if rule == "random":
        return noise
    raise ValueError(f"unknown credit rule {rule!r}; rules are {list(CREDIT_RULES)}")
