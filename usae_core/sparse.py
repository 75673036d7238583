"""Sparse-code primitives on the training hot path. Plain PyTorch; faster kernels plug in here."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """sum_k values[b, k] * dictionary[indices[b, k]] -> [batch, dim], touching only k rows per token."""
    return F.embedding_bag(indices, dictionary, per_sample_weights=values.to(dictionary.dtype), mode="sum")
