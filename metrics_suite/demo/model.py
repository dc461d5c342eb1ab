"""The demo model: a tiny causal transformer whose input embeddings pass through a learnable noise transform.

Shapes use suffixes: ``B`` batch, ``T`` positions, ``D`` model width, ``V`` vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metrics_suite.capture import record

__all__ = ["CausalBlock", "NoisyEmbedding", "TinyCausalLM", "nearest_token_ids", "sequence_loss"]


class NoisyEmbedding(nn.Module):
    r"""Learnable Gaussian noise on embeddings: $y = x + \mu + \sigma \odot \epsilon$.

    $\mu$ and $\log\sigma$ are learned per dimension, $\epsilon \sim N(0, I)$. The
    forward pass hands ``mean`` ($\mu$ broadcast to the input) and ``noise``
    ($\sigma\epsilon$) to [`metrics_suite.capture.record`][metrics_suite.capture.record], so a
    [`ForwardCapture`][metrics_suite.capture.ForwardCapture] collects exactly what
    [`NoiseStatistics`][metrics_suite.noise.NoiseStatistics] takes.

    Args:
        dim: embedding width.
        init_log_sigma: initial $\log\sigma$.

    Examples:
        >>> layer = NoisyEmbedding(4, init_log_sigma=math.log(0.5))
        >>> y = layer(torch.zeros(2, 3, 4), enabled=False)
        >>> bool((y == 0).all()), round(layer.sigma.mean().item(), 3)
        (True, 0.5)
    """

    def __init__(self, dim: int, init_log_sigma: float = -2.0) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(dim))
        self.log_sigma = nn.Parameter(torch.full((dim,), float(init_log_sigma)))

    @property
    def sigma(self) -> Tensor:
        return self.log_sigma.exp()

    def forward(self, x: Tensor, enabled: bool = True) -> Tensor:
        """``x + mean + sigma * eps`` (``x`` unchanged when not ``enabled``)."""
        if not enabled:
            return x
        mean = self.mean.expand_as(x)
        noise = self.sigma * torch.randn_like(x)
        record(self, "mean", mean)
        record(self, "noise", noise)
        return x + mean + noise


class CausalBlock(nn.Module):
    """A pre-norm transformer block with causal self-attention."""

    def __init__(self, dim: int, num_heads: int, hidden_mult: int = 2) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden_mult * dim), nn.GELU(), nn.Linear(hidden_mult * dim, dim)
        )

    def forward(self, h_BTD: Tensor) -> Tensor:
        B, T, D = h_BTD.shape
        qkv = self.qkv(self.norm1(h_BTD)).view(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, T, D/heads]
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h_BTD = h_BTD + self.proj(attn.transpose(1, 2).reshape(B, T, D))
        return h_BTD + self.mlp(self.norm2(h_BTD))


class TinyCausalLM(nn.Module):
    """Token embedding → [`NoisyEmbedding`][metrics_suite.demo.model.NoisyEmbedding] → + positions → causal blocks → logits.

    Args:
        vocab_size: number of tokens ``V``.
        dim: model width ``D``.
        num_layers: number of [`CausalBlock`][metrics_suite.demo.model.CausalBlock].
        num_heads: attention heads per block.
        max_length: longest sequence (size of the learned position table).
        init_log_sigma: initial log noise scale of the transform.

    Examples:
        >>> model = TinyCausalLM(vocab_size=10, dim=8, num_layers=2, num_heads=2, max_length=6)
        >>> model(torch.randint(0, 10, (3, 6))).shape
        torch.Size([3, 6, 10])
    """

    def __init__(
        self,
        vocab_size: int = 32,
        dim: int = 32,
        num_layers: int = 2,
        num_heads: int = 2,
        max_length: int = 16,
        init_log_sigma: float = -2.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.noise = NoisyEmbedding(dim, init_log_sigma)
        self.positions = nn.Parameter(torch.randn(max_length, dim) / math.sqrt(dim))
        self.blocks = nn.ModuleList(CausalBlock(dim, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def residual_input(self, token_embeddings_BTD: Tensor) -> Tensor:
        """The residual stream entering block 0, from (possibly transformed) token embeddings."""
        return token_embeddings_BTD + self.positions[: token_embeddings_BTD.shape[1]]

    def from_layer(self, h_BTD: Tensor, layer: int) -> Tensor:
        """Logits ``[B, T, V]`` from the residual stream ``h`` entering block ``layer``."""
        for block in self.blocks[layer:]:
            h_BTD = block(h_BTD)
        return self.head(self.norm(h_BTD))

    def hidden_states(self, token_embeddings_BTD: Tensor) -> list[Tensor]:
        """The residual stream entering each block (``num_layers`` tensors ``[B, T, D]``)."""
        h = self.residual_input(token_embeddings_BTD)
        states = []
        for block in self.blocks:
            states.append(h)
            h = block(h)
        return states

    def forward(self, input_ids_BT: Tensor, noise: bool = True) -> Tensor:
        """Logits ``[B, T, V]``; the noise transform is applied when ``noise`` is True."""
        x = self.noise(self.embed(input_ids_BT), enabled=noise)
        return self.from_layer(self.residual_input(x), 0)


def sequence_loss(logits_BTV: Tensor, target_ids_BT: Tensor, mask_BT: Tensor | None = None) -> Tensor:
    """Per-sequence mean next-token cross-entropy ``[B]`` (nats), over the positions ``mask`` keeps.

    Examples:
        >>> logits = torch.zeros(1, 3, 4)  # uniform: every position costs log 4
        >>> round(sequence_loss(logits, torch.tensor([[0, 1, 2]]), torch.tensor([[True, True, False]])).item(), 4)
        1.3863
    """
    ce = F.cross_entropy(logits_BTV.flatten(0, 1).float(), target_ids_BT.flatten(), reduction="none")
    ce = ce.view(target_ids_BT.shape)
    if mask_BT is None:
        return ce.mean(1)
    weights = mask_BT.to(ce.dtype)
    return (ce * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def nearest_token_ids(embeddings_BTD: Tensor, table_VD: Tensor) -> Tensor:
    """Invert embeddings to the nearest (Euclidean) rows of the embedding table: ``[B, T]`` ids.

    Examples:
        >>> table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> nearest_token_ids(torch.tensor([[[0.9, 0.2], [0.1, 0.6]]]), table)
        tensor([[1, 2]])
    """
    flat = embeddings_BTD.reshape(-1, embeddings_BTD.shape[-1])
    return torch.cdist(flat.float(), table_VD.float()).argmin(-1).view(embeddings_BTD.shape[:-1])
