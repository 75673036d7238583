"""The paper's published USAE training loop, rebuilt in plain PyTorch as the speed and quality reference.

It follows the official code (universal_sae `train_cross_prediction_saes` on overcomplete's
`TopKSAE`), step for step:

- one TopKSAE per model: `mlp_bn_1` encoder (Linear + BatchNorm1d, ReLU), TopK scattered back
  into a dense `[tokens, n_concepts]` code, dictionary L2-normalised in every forward pass;
- each step draws a source model i, encodes its batch, decodes the code with every model's
  dictionary, and sums `top_k_auxiliary_loss_L1` over targets: L1 reconstruction plus 0.1 x the
  L1 error of the top half of the *unused* latents predicting the residual (dense decodes);
- backward, gradient clipping per SAE, then only model i's AdamW (and scheduler) steps.

Monitoring (per-step R^2 with `.item()`) is left out, which only favours the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TopKSAE(nn.Module):
    """overcomplete's TopKSAE with the `mlp_bn_1` encoder and 'l2' dictionary normalisation."""

    def __init__(self, dim: int, n_concepts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.encoder = nn.Sequential(nn.Linear(dim, n_concepts), nn.BatchNorm1d(n_concepts))
        self.dictionary = nn.Parameter(torch.randn(n_concepts, dim))

    def get_dictionary(self) -> torch.Tensor:
        return self.dictionary / (self.dictionary.norm(dim=-1, keepdim=True) + 1e-8)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre_codes = self.encoder(x)
        codes = F.relu(pre_codes)
        top = torch.topk(codes, self.top_k, dim=-1)
        return pre_codes, torch.zeros_like(codes).scatter(-1, top.indices, top.values)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.get_dictionary()


def top_k_auxiliary_loss_l1(x, x_hat, pre_codes, codes, dictionary, penalty: float = 0.1) -> torch.Tensor:
    """The official criterion: L1 reconstruction + penalty * L1 of the top-half unused latents'
    prediction of the residual (residual not detached, as published)."""
    residual = x - x_hat
    unused = F.relu(pre_codes) - codes
    aux = torch.topk(unused, k=unused.shape[1] // 2, dim=1)
    residual_hat = torch.zeros_like(codes).scatter(-1, aux.indices, aux.values) @ dictionary
    return residual.abs().mean() + penalty * (residual - residual_hat).abs().mean()


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class ReferenceUSAE:
    """The published loop over already-standardised batches `{model: [tokens, dim]}`."""

    def __init__(self, dims: dict[str, int], n_concepts: int, k: int, *, lr: float = 3e-4, steps: int = 1000,
                 warmup: int = 100, device: str = "cuda", bf16: bool = False, seed: int = 0):
        torch.manual_seed(seed)
        self.names, self.device, self.bf16 = list(dims), torch.device(device), bf16
        self.saes = {m: TopKSAE(d, n_concepts, k).to(self.device) for m, d in dims.items()}
        self.optimizers = {m: torch.optim.AdamW(sae.parameters(), lr=lr) for m, sae in self.saes.items()}
        self.schedulers = {
            m: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, steps))
            for m, opt in self.optimizers.items()
        }

    def train_step(self, batch: dict[str, torch.Tensor], source: str) -> torch.Tensor:
        for sae in self.saes.values():
            sae.train()
        self.optimizers[source].zero_grad()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            pre_codes, z = self.saes[source].encode(batch[source])
            loss = 0.0
            for target in self.names:
                sae = self.saes[target]
                loss = loss + top_k_auxiliary_loss_l1(batch[target], sae.decode(z), pre_codes, z, sae.get_dictionary())
        loss.backward()
        for sae in self.saes.values():
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        self.optimizers[source].step()
        self.schedulers[source].step()
        return loss.detach()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, source: str, target: str) -> torch.Tensor:
        """Eval-mode (running BatchNorm statistics) reconstruction of `target` from `source`."""
        for sae in self.saes.values():
            sae.eval()
        _, z = self.saes[source].encode(x)
        return self.saes[target].decode(z)
