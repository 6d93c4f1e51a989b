"""Patch embeddings as one GEMM (xfast.models.patchify): values and gradients against a float64
convolution, which convolutions are converted, and that the towers' parameters are unchanged.

Bounds: any order of summing n products in float32 is within n*u*sum|a_i b_i| of the exact sum
(u = 2**-24, the standard a-priori bound; n*u << 1 here), so the bound comes from the float64
convolution of |x| and |w| (and of the gradients' magnitudes), not from this machine's rounding.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.model_cases import make_model
from xfast.models.patchify import PatchConv2d, patchifiable, patchify_convs

U32 = 2.0 ** -24


def _reference(x, w, b, g, kernel):
    """float64 conv outputs and gradients, and the magnitudes that bound their rounding."""
    def run(x, w, b, g):
        x, w = x.double().requires_grad_(), w.double().requires_grad_()
        b = None if b is None else b.double().requires_grad_()
        y = F.conv2d(x, w, b, stride=kernel)
        y.backward(g.double())
        return y.detach(), x.grad, w.grad, None if b is None else b.grad
    exact = run(x, w, b, g)
    magnitude = run(x.abs(), w.abs(), None if b is None else b.abs(), g.abs())
    return exact, magnitude


@pytest.mark.parametrize("channels, kernel, bias, size", [
    (1, (4, 4), True, (64, 256)),   # HTSAT's spectrogram patches
    (3, (8, 8), False, (32, 32)),   # CLIP's image patches (no bias)
    (2, (2, 3), True, (6, 9)),      # rectangular kernel, ragged sizes
    (3, (5, 5), True, (15, 10)),
])
def test_patch_conv_matches_a_float64_convolution(channels, kernel, bias, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, 7, kernel, stride=kernel, bias=bias)
    assert patchify_convs(conv) == 1 and type(conv) is PatchConv2d
    x = torch.randn(3, channels, *size, requires_grad=True)
    y = conv(x)
    g = torch.randn_like(y)
    y.backward(g)
    (y64, gx64, gw64, gb64), (ya, gxa, gwa, gba) = _reference(x.detach(), conv.weight.detach(),
                                                              None if conv.bias is None else conv.bias.detach(),
                                                              g, kernel)
    assert y.shape == y64.shape
    k = channels * kernel[0] * kernel[1]
    rows = y.shape[0] * y.shape[2] * y.shape[3]  # the sums of the weight's gradient
    checks = [("output", y, y64, (k + 1) * U32 * ya + U32 * y64.abs()),
              ("grad input", x.grad, gx64, 7 * U32 * gxa + U32 * gx64.abs()),
              ("grad weight", conv.weight.grad, gw64, rows * U32 * gwa + U32 * gw64.abs())]
    if bias:
        checks.append(("grad bias", conv.bias.grad, gb64, rows * U32 * gba + U32 * gb64.abs()))
    for name, got, want, bound in checks:
        err = (got.double() - want).abs()
        assert (err <= bound).all(), f"{name}: worst error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


def test_a_size_the_kernel_does_not_divide_takes_the_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 4, stride=4)
    plain = copy.deepcopy(conv)
    patchify_convs(conv)
    x = torch.randn(2, 1, 65, 30)  # 65 and 30 are not multiples of 4: the convolution drops the rest
    torch.testing.assert_close(conv(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, converted", [
    (dict(kernel_size=4, stride=4), True),
    (dict(kernel_size=(2, 4), stride=(2, 4), bias=False), True),
    (dict(kernel_size=4, stride=4, padding="valid"), True),
    (dict(kernel_size=4, stride=2), False),  # overlapping patches (AST's default)
    (dict(kernel_size=4, stride=4, padding=1), False),
    (dict(kernel_size=4, stride=4, dilation=2), False),
    (dict(kernel_size=4, stride=4, padding_mode="reflect"), False),
])
def test_only_non_overlapping_unpadded_convolutions_are_converted(kwargs, converted):
    assert patchifiable(nn.Conv2d(2, 4, **kwargs)) is converted
    assert not patchifiable(nn.Conv2d(2, 4, groups=2, kernel_size=4, stride=4))
    assert not patchifiable(nn.Conv1d(2, 4, kernel_size=4, stride=4))


@pytest.mark.parametrize("media, media_type, name", [
    ("audio", "htsat", "media.backbone.audio_encoder.patch_embed.proj"),
    ("image", "clip_vision", "media.backbone.embeddings.patch_embedding"),
    ("image", "vit", "media.backbone.embeddings.patch_embeddings.projection"),
    ("audio", "ast", "media.backbone.embeddings.patch_embeddings.projection"),
])
def test_towers_compute_their_patch_embedding_as_a_gemm_with_the_same_parameters(tok, media, media_type, name):
    model = make_model(tok, media=media, media_type=media_type)
    converted = [n for n, m in model.named_modules() if type(m) is PatchConv2d]
    assert converted == [name]
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if type(m) is PatchConv2d:
            m.__class__ = nn.Conv2d
    # Same parameter names and values: checkpoints and HF exports are those of the convolution.
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)
    # The rest of the tower is unchanged: in float64 the patch embedding's own rounding (~1e-16
    # relative) is all that differs, far below what a wrong patch order would move (~1).
    model.double().eval()
    plain.double().eval()
    key = "input_features" if media == "audio" else "pixel_values"
    req = model.data_requirements()
    torch.manual_seed(1)
    x = (torch.randn(2, 1, req["max_frames"], req["n_mels"]) if media == "audio"
         else torch.randn(2, 3, req["image_size"], req["image_size"])).double()
    with torch.no_grad():
        got, want = model.encode_media({key: x}), plain.encode_media({key: x})
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_off_the_cpu_the_convolution_runs(monkeypatch):
    # Only measured on CPU: elsewhere (here the meta device, which needs no GPU) cuDNN's or the
    # device's convolution stays.
    import xfast.models.patchify as patchify
    conv = nn.Conv2d(1, 4, 4, stride=4, device="meta")
    patchify_convs(conv)
    monkeypatch.setattr(patchify.F, "linear", lambda *a, **k: pytest.fail("the GEMM ran off the CPU"))
    assert conv(torch.empty(2, 1, 8, 8, device="meta")).shape == (2, 4, 2, 2)
