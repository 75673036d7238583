"""Loss terms. Each is a pure function of tensors; the trainer sums them over target models."""

from __future__ import annotations

import torch

from usae_core.sparse import sparse_decode


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean absolute (`l1`, the paper) or mean squared (`mse`) error over all elements."""
    acc = torch.float64 if torch.float64 in (recon.dtype, target.dtype) else torch.float32
    diff = recon.to(acc) - target.to(acc)
    return diff.abs().mean() if kind == "l1" else diff.square().mean()


def paper_aux_loss(
    pre_codes: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    residual: torch.Tensor,
    dictionary: torch.Tensor,
    kind: str,
) -> torch.Tensor:
    """The official USAE auxiliary term: the top half of the latents TopK did *not* pick
    must predict the residual. Dense by construction (n_concepts / 2 active)."""
    unused = pre_codes.scatter(1, indices, torch.zeros_like(values))
    aux = torch.topk(unused, unused.shape[1] // 2, dim=1)
    z = torch.zeros_like(unused).scatter(1, aux.indices, aux.values)
    return reconstruction_loss(z @ dictionary.to(z.dtype), residual, kind)


def auxk_loss(
    pre_codes: torch.Tensor,
    dead_mask: torch.Tensor,
    residual: torch.Tensor,
    dictionary: torch.Tensor,
    k_aux: int,
) -> torch.Tensor:
    """AuxK (Gao et al., 2024): the top `k_aux` *dead* latents must predict the residual (MSE).

    With no dead latents the term is zero; it never forces a host sync to find that out.
    """
    k_aux = min(k_aux, pre_codes.shape[1])
    masked = pre_codes * dead_mask.to(pre_codes.dtype)
    vals, idx = torch.topk(masked, k_aux, dim=1, sorted=False)
    return auxk_residual_loss(sparse_decode(vals, idx, dictionary), residual, dead_mask)


def auxk_residual_loss(aux_recon: torch.Tensor, residual: torch.Tensor, dead_mask: torch.Tensor) -> torch.Tensor:
    """MSE of the dead latents' reconstruction against the residual; zero with no dead latents."""
    return (aux_recon.float() - residual.float()).square().mean() * dead_mask.any().to(torch.float32)
