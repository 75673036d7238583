"""Patch embeddings computed as patchify + GEMM equal the convolution they replace."""

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from usae_core.backbones import create_backbone
from usae_core.backbones.base import run_to_layer
from usae_core.backbones.patch_conv import PatchConv, is_patch_conv, use_gemm_patch_convs

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def as_patch_conv(conv: nn.Conv2d) -> nn.Module:
    model = nn.Sequential(conv)
    assert use_gemm_patch_convs(model) == 1
    return model[0]


@pytest.mark.parametrize("channels, patch, size, bias", [
    (3, 16, (224, 224), True),
    (3, 14, (230, 229), True),  # sizes that are not whole patches: the remainder is dropped
    (1, (4, 2), (17, 9), False),
])
def test_equals_the_convolution_in_float64(channels, patch, size, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, 24, patch, stride=patch, bias=bias).double()
    x = torch.randn(2, channels, *size, dtype=torch.float64, requires_grad=True)
    want = conv(x)
    grad_out = torch.randn_like(want)
    (want_grad,) = torch.autograd.grad(want, x, grad_out)
    gemm = as_patch_conv(conv)
    assert isinstance(gemm, PatchConv)
    got = gemm(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (got_grad,) = torch.autograd.grad(got, x, grad_out)  # CAM optimises images through it
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
    nhwc = x.detach().contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gemm(nhwc), want.detach(), rtol=1e-12, atol=1e-12)


def test_inputs_off_the_fast_path_get_the_convolutions_answer():
    conv = nn.Conv2d(3, 8, 16, stride=16)
    gemm = as_patch_conv(conv)
    unbatched = torch.randn(3, 32, 48)
    torch.testing.assert_close(gemm(unbatched), F.conv2d(unbatched, conv.weight, conv.bias, stride=16))
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        gemm(torch.randn(1, 3, 8, 8))


def test_convolutions_with_hooks_are_left_alone():
    hooked = nn.Conv2d(3, 8, 16, stride=16)
    seen = []
    hooked.register_forward_hook(lambda *_: seen.append(1))
    with warnings.catch_warnings():  # deprecated in favour of parametrizations, still met in checkpoints' code
        warnings.simplefilter("ignore")
        legacy_norm = torch.nn.utils.weight_norm(nn.Conv2d(3, 8, 16, stride=16))  # weight set by a pre-hook
    model = nn.Sequential(hooked, nn.Identity(), legacy_norm)
    assert use_gemm_patch_convs(model) == 0
    model[0](torch.randn(1, 3, 16, 16))
    assert seen == [1]


def test_shares_parameters_and_state_dict_keys():
    conv = nn.Conv2d(3, 8, 16, stride=16)
    model = nn.Sequential(conv)
    keys = list(model.state_dict())
    use_gemm_patch_convs(model)
    assert list(model.state_dict()) == keys
    assert model[0].weight is conv.weight and model[0].bias is conv.bias


@pytest.mark.parametrize("conv, eligible", [
    (nn.Conv2d(3, 8, 16, stride=16), True),
    (nn.Conv2d(3, 8, 16, stride=16, padding="valid"), True),
    (nn.Conv2d(3, 8, 16, stride=8), False),  # overlapping patches
    (nn.Conv2d(3, 8, 16, stride=16, padding=1), False),
    (nn.Conv2d(3, 8, 1), False),  # already a GEMM
    (nn.Conv2d(3, 3, 4, stride=4, groups=3), False),
    (nn.Conv2d(64, 64, 2, stride=2), False),  # a downsampling layer, not an image stem
    (nn.Conv2d(3, 8, 4, stride=4, dilation=2), False),
])
def test_only_patchify_convolutions_are_replaced(conv, eligible):
    assert is_patch_conv(conv) is eligible


def test_timm_backbone_equals_the_plain_model():
    torch.manual_seed(0)
    b = create_backbone("timm:vit_base_patch16_224", random_init=True, model_kwargs=TINY_VIT)
    assert isinstance(b.model.patch_embed.proj, PatchConv)
    plain = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **TINY_VIT).eval()
    plain.load_state_dict(b.model.state_dict())
    assert type(plain.patch_embed.proj) is nn.Conv2d
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(b(x), plain.forward_features(x)[:, 1:])
        # the patch embedding is still a layer one can read
        got = run_to_layer(b.model, "patch_embed.proj", lambda: b.model(x))
        torch.testing.assert_close(got, plain.patch_embed.proj(x))


def test_cnn_backbones_keep_their_convolutions():
    b = create_backbone("timm:convnext_atto", random_init=True)
    assert not any(isinstance(m, PatchConv) for m in b.modules())
    assert any(is_patch_conv(m) for m in b.modules())  # its 4x4 stem stays a cuDNN/oneDNN convolution


def test_torchvision_vit_uses_the_gemm():
    b = create_backbone("torchvision:vit_b_16", random_init=True)
    assert isinstance(b.model.conv_proj, PatchConv)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = F.conv2d(x, b.model.conv_proj.weight, b.model.conv_proj.bias, stride=16)
        torch.testing.assert_close(b.model.conv_proj(x), want)
