"""HTSAT's stretch of the spectrogram's time axis (bicubic, align_corners) as one matrix product.

transformers' ClapAudioEncoder.reshape_mel2img stretches the batch-normed log-mel [B, C, frames,
n_mels] to spec_size * freq_ratio frames with F.interpolate(mode="bicubic", align_corners=True)
(n_mels unchanged) before cutting it into the spectrogram image. With the mel axis unchanged the
bicubic weights across it are exactly (0, 1, 0, 0), so the stretch is one fixed linear map of the
time axis: out = M @ x with M [out_frames, frames], 4 taps per row (clamped at the edges). M is
made by interpolating the identity with F.interpolate itself, so its entries are torch's own
bicubic coefficients; the product only sums them in another order. On CPU torch's bicubic
backward (and inductor's scatter for it) cost ~5 ms of a ~50 ms tiny CLAP training step; the
product's backward is one small GEMM. The mel-axis stretch (n_mels < spec_size // freq_ratio,
HF's second interpolate), a non-float input and tensors off the CPU (only measured there) keep
HF's code. Like interpolate, the product is not autocast (16-bit inputs: weights and sums in float32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from transformers.models.clap.modeling_clap import ClapAudioEncoder

TESTED_TRANSFORMERS_MAJOR = "5"


def bicubic_matrix(frames: int, out_frames: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """M [out_frames, frames] with M @ x == F.interpolate(x, (out_frames, n), mode="bicubic",
    align_corners=True) along the frames axis (up to the order of summation)."""
    basis = torch.eye(frames, dtype=dtype, device=device).reshape(frames, 1, frames, 1)
    return F.interpolate(basis, (out_frames, 1), mode="bicubic", align_corners=True).reshape(frames, out_frames).T


class ClapAudioEncoderGemmStretch(ClapAudioEncoder):
    """ClapAudioEncoder whose reshape_mel2img stretches time with bicubic_matrix (same module,
    same parameters; set as the instance's class by use_gemm_time_stretch)."""

    def reshape_mel2img(self, normalized_input_features):
        x = normalized_input_features
        _, channels, frames, n_mels = x.shape
        out_frames = int(self.spec_size * self.freq_ratio)
        if (x.device.type != "cpu" or frames >= out_frames or n_mels != self.spec_size // self.freq_ratio
                or not x.is_floating_point()):
            return super().reshape_mel2img(x)  # off the CPU, HF's bounds check, the mel-axis stretch, no stretch
        # 16-bit inputs are stretched in float32, as torch's bicubic kernels compute (their weights
        # rounded to 8 bits would add an error as large as the output's own rounding).
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        m = self._stretch_matrix(frames, out_frames, compute, x.device)
        batch = x.shape[0]
        # [B, C, frames, mels] -> [frames, B*C*mels] -> M @ -> [out_frames, B, C, mels] -> [B, C, out_frames, mels]
        columns = x.permute(2, 0, 1, 3).reshape(frames, -1).to(compute)
        with torch.autocast("cpu", enabled=False):  # interpolate is not autocast; neither is its replacement
            product = m @ columns
        stretched = product.to(x.dtype).reshape(out_frames, batch, channels, n_mels).permute(1, 2, 0, 3)
        return super().reshape_mel2img(stretched)  # now only HF's reshape into the image

    def _stretch_matrix(self, frames: int, out_frames: int, dtype: torch.dtype, device) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Made inside the compiled graph (a few us): a cache filled while tracing would be a
            # mutation that makes the next call recompile.
            return bicubic_matrix(frames, out_frames, dtype, device)
        cache = self.__dict__.setdefault("_stretch_matrices", {})
        key = (frames, out_frames, dtype, device)
        if key not in cache:
            cache[key] = bicubic_matrix(frames, out_frames, dtype, device)
        return cache[key]


def use_gemm_time_stretch(module: torch.nn.Module) -> int:
    """Every ClapAudioEncoder inside `module` stretches time with one matrix product; returns how many.
    Only on the transformers major version it was written and tested against (its reshape_mel2img
    must skip the interpolation at full length; tests/test_models_time_stretch.py compares the two
    paths): elsewhere HF's code runs unchanged."""
    if transformers.__version__.split(".")[0] != TESTED_TRANSFORMERS_MAJOR:
        return 0
    count = 0
    for encoder in module.modules():
        if type(encoder) is ClapAudioEncoder:
            encoder.__class__ = ClapAudioEncoderGemmStretch
            count += 1
    return count
