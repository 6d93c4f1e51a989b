"""HTSAT's time stretch as one matrix product (xfast.models.time_stretch): values and gradients
against torch's float64 bicubic interpolation, HF's fallbacks, and one graph under torch.compile.

Bounds: the product sums the k nonzero taps of a row (k <= 4; a column of the gradient's product
has at most `nnz` of them) with float32 coefficients m = w + e, where e = M32 - M64 is known
exactly; so |got - exact| <= |e| @ |x| + (k + 1) u |M32| @ |x| (u = 2**-24; zeros add exactly),
the standard a-priori bound, whatever the BLAS kernel or CPU.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from transformers import ClapAudioConfig
from transformers.models.clap.modeling_clap import ClapAudioEncoder

from tests.model_cases import make_model
from xfast.models.time_stretch import ClapAudioEncoderGemmStretch, bicubic_matrix, use_gemm_time_stretch

U32 = 2.0 ** -24


def _stretch_bound(m32: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bound on |m32 @ x (float32) - exact| along dim -2 of x [.., frames, cols]."""
    m64 = bicubic_matrix(m32.shape[1], m32.shape[0], torch.float64)
    taps = int((m32 != 0).sum(1).max())
    ax = x.double().abs()
    return (m32.double() - m64).abs() @ ax + (taps + 1) * U32 * (m32.double().abs() @ ax)


@pytest.mark.parametrize("frames, out_frames", [(101, 256), (7, 20), (3, 64), (255, 256)])
def test_the_stretch_matrix_is_bicubic_interpolation_in_values_and_gradients(frames, out_frames):
    torch.manual_seed(0)
    x = torch.randn(3, 2, frames, 5, requires_grad=True)
    m = bicubic_matrix(frames, out_frames, torch.float32)
    got = torch.einsum("st,bctf->bcsf", m, x)
    g = torch.randn_like(got)
    got.backward(g)
    x64 = x.detach().double().requires_grad_()
    want = F.interpolate(x64, (out_frames, 5), mode="bicubic", align_corners=True)  # the float64 reference
    want.backward(g.double())
    bound = _stretch_bound(m, x.detach())
    err = (got.detach().double() - want.detach()).abs()
    assert (err <= bound + 2.0 ** -50).all(), f"worst {err.max():.3g}"
    # The gradient is M^T g: the same bound with the roles of the matrices' axes swapped.
    bound_t = _stretch_bound(m.T.contiguous(), g)
    err_t = (x.grad.double() - x64.grad).abs()
    assert (err_t <= bound_t + 2.0 ** -50).all(), f"worst {err_t.max():.3g}"
    # Four taps a row (three or fewer where the clamped edge taps fall on one frame), and the exact
    # weights sum to 1 in each row (each float64 coefficient is a cubic of <= 8 operations, so a few
    # ulps of float64 each; 64 ulps for the row's four).
    assert int((m != 0).sum(1).max()) <= 4
    m64 = bicubic_matrix(frames, out_frames, torch.float64)
    torch.testing.assert_close(m64.sum(1), torch.ones(out_frames, dtype=torch.float64), rtol=0, atol=64 * 2.0 ** -53)


def _encoder(num_mel_bins=16, spec_size=64):
    config = ClapAudioConfig(spec_size=spec_size, num_mel_bins=num_mel_bins, patch_size=4, patch_stride=4,
                             patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2], hidden_size=32,
                             window_size=4, enable_fusion=False)
    plain = ClapAudioEncoder(config)
    fast = ClapAudioEncoder(config)
    assert use_gemm_time_stretch(fast) == 1 and type(fast) is ClapAudioEncoderGemmStretch
    return plain, fast


def test_mel2img_matches_transformers_and_keeps_its_fallbacks():
    plain, fast = _encoder()
    torch.manual_seed(0)
    x = torch.randn(2, 1, 101, 16)
    got, want = fast.reshape_mel2img(x), plain.reshape_mel2img(x)
    assert got.shape == want.shape == (2, 1, 64, 64)  # 256 frames x 16 mels cut into a 64 x 64 image
    # HF's result is the image of the stretched spectrogram: compare it with the float64 stretch.
    m = bicubic_matrix(101, 256, torch.float32)
    exact = plain.reshape_mel2img(torch.einsum("st,bctf->bcsf", bicubic_matrix(101, 256, torch.float64), x.double()))
    bound = plain.reshape_mel2img(_stretch_bound(m, x.transpose(0, 2).reshape(101, -1))
                                  .reshape(256, 1, 2, 16).transpose(0, 2))
    assert ((got.double() - exact).abs() <= bound).all()
    # A full-length input needs no stretch: exactly HF's reshape.
    full = torch.randn(2, 1, 256, 16)
    torch.testing.assert_close(fast.reshape_mel2img(full), plain.reshape_mel2img(full), rtol=0, atol=0)
    # Too many frames: HF's own error.
    with pytest.raises(ValueError, match=re.escape("the wav size should be less than or equal to the swin input size")):
        fast.reshape_mel2img(torch.randn(1, 1, 300, 16))
    # Fewer mel bins than the image's height: HF's code and its second interpolation, unchanged (with
    # fewer frames too, that path of transformers 5 fails in its own reshape, the same either way).
    few = torch.randn(2, 1, 256, 8)
    torch.testing.assert_close(fast.reshape_mel2img(few), plain.reshape_mel2img(few), rtol=0, atol=0)


def test_the_htsat_tower_uses_it_and_keeps_its_parameters(tok):
    model = make_model(tok, media="audio", media_type="htsat")
    encoders = [type(m) for m in model.modules() if isinstance(m, ClapAudioEncoder)]
    assert encoders == [ClapAudioEncoderGemmStretch]
    plain = make_model(tok, media="audio", media_type="htsat")
    for m in plain.modules():
        if type(m) is ClapAudioEncoderGemmStretch:
            m.__class__ = ClapAudioEncoder
    assert list(model.state_dict()) == list(plain.state_dict())


def test_compiled_the_stretch_is_one_graph_with_no_recompile():
    from torch._dynamo.testing import CompileCounter
    _, fast = _encoder()
    counter = CompileCounter()
    compiled = torch.compile(fast.reshape_mel2img, backend=counter, fullgraph=True)
    torch.manual_seed(0)
    for _ in range(3):
        x = torch.randn(2, 1, 101, 16)
        torch.testing.assert_close(compiled(x), fast.reshape_mel2img(x), rtol=0, atol=0)
    assert counter.frame_count == 1


def test_a_bfloat16_spectrogram_is_stretched_as_accurately_as_torch_does_it():
    # flash-attention's rule: the error against float64 at most twice that of torch's own bicubic
    # in the same precision (which weighs in float32 and rounds once at the end, as the product does).
    plain, fast = _encoder()
    torch.manual_seed(0)
    x = torch.randn(4, 1, 101, 16).bfloat16()
    exact = plain.reshape_mel2img(x.double())
    got = fast.reshape_mel2img(x)
    assert got.dtype == torch.bfloat16
    ours, torchs = ((t.double() - exact).abs().max() for t in (got, plain.reshape_mel2img(x)))
    assert ours <= 2 * torchs, (ours, torchs)


def test_under_cpu_autocast_the_stretch_stays_float32_like_interpolate():
    plain, fast = _encoder()
    torch.manual_seed(0)
    x = torch.randn(2, 1, 101, 16)
    want = fast.reshape_mel2img(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast.reshape_mel2img(x)
        assert plain.reshape_mel2img(x).dtype == torch.float32  # interpolate is not autocast
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_off_the_cpu_and_on_other_transformers_versions_hf_code_runs(monkeypatch):
    import xfast.models.time_stretch as time_stretch
    monkeypatch.setattr(time_stretch, "bicubic_matrix", lambda *a, **k: pytest.fail("stretched off the CPU"))
    plain, fast = _encoder()
    fast.to("meta")
    assert fast.reshape_mel2img(torch.empty(2, 1, 101, 16, device="meta")).shape == (2, 1, 64, 64)
    monkeypatch.setattr(time_stretch, "TESTED_TRANSFORMERS_MAJOR", "4")  # as if transformers were not 5.x
    assert use_gemm_time_stretch(plain) == 0 and type(plain) is ClapAudioEncoder
