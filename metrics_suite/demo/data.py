"""Synthetic token sequences for the demo: a fixed random Markov chain, no downloads."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = ["markov_chain", "markov_dataset", "sample_sequences"]


def markov_chain(vocab_size: int, seed: int, sharpness: float = 3.0) -> Tensor:
    """A ``[V, V]`` row-stochastic transition matrix with a few likely successors per token.

    Rows are ``softmax(sharpness · z)`` of standard normal ``z``: each token has a handful of probable
    successors, so a causal model can learn much, but not all, of the next-token distribution.

    Examples:
        >>> P = markov_chain(8, seed=0)
        >>> P.shape, bool(torch.allclose(P.sum(1), torch.ones(8)))
        (torch.Size([8, 8]), True)
    """
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(vocab_size, vocab_size, generator=g), dim=1)


def sample_sequences(transitions: Tensor, num_sequences: int, length: int, seed: int) -> Tensor:
    """``[N, length]`` token ids drawn from the chain (uniform start token), deterministic in ``seed``.

    Examples:
        >>> ids = sample_sequences(markov_chain(8, seed=0), num_sequences=3, length=5, seed=1)
        >>> ids.shape, ids.dtype
        (torch.Size([3, 5]), torch.int64)
    """
    g = torch.Generator().manual_seed(seed)
    vocab_size = transitions.shape[0]
    ids = torch.empty(num_sequences, length, dtype=torch.int64)
    ids[:, 0] = torch.randint(0, vocab_size, (num_sequences,), generator=g)
    for t in range(1, length):
        ids[:, t] = torch.multinomial(transitions[ids[:, t - 1]], 1, generator=g).squeeze(1)
    return ids


def markov_dataset(
    vocab_size: int, num_sequences: int, length: int, seed: int, split: int = 0
) -> TensorDataset:
    """A dataset of sequences of ``length + 1`` tokens (inputs and shifted targets) from chain ``seed``.

    ``split`` selects independent samples of the same chain (0: train, 1: validation, ...).
    """
    transitions = markov_chain(vocab_size, seed)
    return TensorDataset(sample_sequences(transitions, num_sequences, length + 1, seed * 1000 + split + 1))
