"""A vision transformer's patch embedding as the matrix product it is.

A convolution whose stride equals its kernel, with no padding, cuts the image into patches and
applies one linear map to each: a reshape and a GEMM. On a 3-channel image cuDNN runs it as a
direct convolution, slowly: ViT-B/16's at batch 256 took 2.0 ms on an H200 (inductor's
autotuning log, docs/benchmarks.md), about 8.5% of the whole ViT-B forward, while the GEMM it
equals (50,176 x 768 x 768) is a small fraction of that. `PatchConv` keeps the convolution's
parameters, state-dict keys and output shape (as a channels-innermost view), so weights and
callers see no difference; convolutions that carry hooks are left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchConv(nn.Conv2d):
    """`nn.Conv2d` with stride == kernel and no padding, computed as patchify + linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.kernel_size
        if x.ndim != 4 or x.shape[2] < ph or x.shape[3] < pw:
            return super().forward(x)  # unbatched or smaller than a patch: the convolution's own answer
        b, c, h, w = x.shape
        gh, gw = h // ph, w // pw
        x = x[:, :, : gh * ph, : gw * pw]  # a strided convolution drops the remainder too
        patches = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        # [B, D, gh, gw] as a view with D innermost: `flatten(2).transpose(1, 2)`, which patch
        # embeddings do next, is then a view too.
        return out.reshape(b, gh, gw, self.out_channels).permute(0, 3, 1, 2)


def is_patch_conv(module: nn.Module) -> bool:
    """An image-stem convolution that is exactly patchify + linear."""
    return (type(module) is nn.Conv2d and module.stride == module.kernel_size
            and module.kernel_size != (1, 1) and module.padding in ((0, 0), "valid")
            and module.dilation == (1, 1) and module.groups == 1 and module.in_channels <= 4
            # a plain layer only: hooks (e.g. legacy weight norm) stay with a module we would replace
            and isinstance(module.weight, nn.Parameter)
            and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks))


def use_gemm_patch_convs(model: nn.Module) -> int:
    """Replace, in place, every patch-embedding convolution of `model` with a `PatchConv` sharing
    its parameters. Returns how many were replaced."""
    targets = [name for name, module in model.named_modules() if is_patch_conv(module)]
    for name in targets:
        conv = model.get_submodule(name)
        gemm = PatchConv(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         bias=conv.bias is not None, device="meta")
        gemm.weight, gemm.bias = conv.weight, conv.bias
        gemm.train(conv.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, gemm)
    return len(targets)
