"""Patch embeddings (a Conv2d whose kernel equals its stride) computed as one matrix product.

The image and spectrogram towers (CLIP/ViT/AST patch embeddings, HTSAT's patch_embed) cut their
input into non-overlapping patches with a Conv2d of kernel == stride and no padding. That is a
reshape and one [patches, C*kh*kw] x [C*kh*kw, out] product, the same sums in another order. On
CPU oneDNN's convolution backward is slow at these shapes (1-3 input channels): for the tiny HTSAT
(32 spectrograms of 64x256, 4x4 patches, 16 channels) it took ~8 ms of a ~50 ms training step,
where the product's backward is two small GEMMs. PatchConv2d keeps nn.Conv2d's parameters (names,
shapes, state_dict, checkpoints and HF exports are unchanged) and falls back to the convolution
for any input the reshape cannot take (a size not divisible by the kernel) and off the CPU (only
measured there). Under CPU autocast both the convolution and the product run in bfloat16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchConv2d(nn.Conv2d):
    """nn.Conv2d with kernel_size == stride, no padding, dilation 1, groups 1: forward as a GEMM.

    The output has the convolution's shape [B, out, H/kh, W/kw] in channels-last memory order
    (what the product gives); the towers flatten it to [B, patches, out] next, which is then
    contiguous."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        # CPU only: measured there; on a GPU cuDNN's convolution stays (not measured against the GEMM).
        if x.device.type != "cpu" or x.dim() != 4 or x.shape[2] % kh or x.shape[3] % kw:
            return super().forward(x)
        b, c, h, w = x.shape
        # [B, C, H/kh, kh, W/kw, kw] -> [B, H/kh, W/kw, C, kh, kw]: one patch per row, in the weight's (C, kh, kw) order
        patches = x.reshape(b, c, h // kh, kh, w // kw, kw).permute(0, 2, 4, 1, 3, 5).reshape(-1, c * kh * kw)
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return out.reshape(b, h // kh, w // kw, self.out_channels).permute(0, 3, 1, 2)


def patchifiable(conv: nn.Module) -> bool:
    """Whether `conv` is a plain nn.Conv2d that only cuts non-overlapping patches."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == conv.stride and conv.padding in ((0, 0), "valid")
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def patchify_convs(module: nn.Module) -> int:
    """Turns every patchifiable Conv2d inside `module` into a PatchConv2d in place (same parameter
    objects); returns how many."""
    count = 0
    for conv in module.modules():
        if patchifiable(conv):
            conv.__class__ = PatchConv2d
            count += 1
    return count
