"""Image and audio preprocessing against plain references (Pillow, numpy, HF feature extractors)."""
import io

import numpy as np
import pytest
import soundfile
import soxr
import torch
from PIL import Image

from tests.data_fixtures import audio_bytes, image_bytes
from xfast.config import parse
from xfast.data import image as image_module
from xfast.data.audio import AudioTransform, LogMel, mel_filterbank, pad_or_trim
from xfast.data.config import AudioConfig, ImageConfig
from xfast.data.image import ImageNormalizer, ImageTransform, center_crop_box, random_crop_box
from xfast.data.skips import SampleSkipped

# Audio ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale, norm", [("htk", None), ("slaney", "slaney"), ("slaney", None)])
def test_mel_filterbank_matches_transformers(scale, norm):
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(num_frequency_bins=513, num_mel_filters=64, min_frequency=50, max_frequency=14000,
                          sampling_rate=48000, norm=norm, mel_scale=scale)
    mine = mel_filterbank(48000, 1024, 64, 50.0, 14000.0, scale, norm or "none")
    assert mine.shape == (513, 64) and mine.dtype == torch.float32
    np.testing.assert_allclose(mine.numpy(), ref, rtol=1e-5, atol=1e-7)


def float32_rounding_bound(ref: np.ndarray) -> np.ndarray:
    """Two computations that are exact up to float64 rounding, each rounded once to float32, differ by
    at most one float32 ulp of the value. HF keeps its STFT in complex64, which moves the power by at
    most 2 * 2**-24 relative: 10 * log10(1 + 2**-23) = 5.2e-7 dB; 1e-6 dB covers it."""
    return np.spacing(np.abs(ref).astype(np.float32)) + 1e-6


def float32_stft_bound(frames: np.ndarray, filters: np.ndarray, mel: np.ndarray) -> np.ndarray:
    """dB error bound [frames, n_mels] of a float32 log-mel against the exact one (`mel`, power).

    Per bin, a float32 FFT of n points errs by at most sqrt(n) * ||x|| * u * (1 + (log2 n + 2) * eta)
    (Higham, Accuracy and Stability, Thm 24.2: eta = mu + gamma_4 (sqrt 2 + mu) ~ 6.7 u with accurate
    twiddles; +2 stages for the real-FFT split; the leading 1 for rounding the windowed frame). A
    mel band m = sum_k w_k |X_k|^2 then moves by at most 2 d sqrt(W m) + d^2 W (Cauchy-Schwarz,
    W = sum_k w_k). Powers, sums and log in float32 add < (taps + 8) u relative: 1e-4 dB covers it.
    """
    u = 2.0 ** -24
    n = frames.shape[1]
    d = np.sqrt(n) * np.linalg.norm(frames, axis=1, keepdims=True) * u * (1 + (np.log2(n) + 2) * 6.7)
    width = filters.sum(axis=0, keepdims=True)
    moved = 2 * d * np.sqrt(width * mel) + d * d * width
    m = np.maximum(mel, 1e-10)
    up = 10 * np.log10((m + moved) / m)
    down = 10 * np.log10(m / np.maximum(m - moved, 1e-10))
    return np.maximum(up, down) + 1e-4


def test_laion_clap_preset_matches_clap_feature_extractor():
    """The whole rand_trunc path of HF's ClapFeatureExtractor (LAION-CLAP's numbers, fmin 50);
    real clips: test_data_real_media.py."""
    from transformers import ClapFeatureExtractor

    cfg = parse(AudioConfig, {}, "audio")
    rng = np.random.default_rng(0)
    t = np.arange(3 * 48000) / 48000
    # A loud low tone over faint noise: the high mel bands sit 60 dB below the frame's energy.
    clip = (0.3 * np.sin(2 * np.pi * 220 * t) + 1e-3 * rng.standard_normal(t.shape)).astype(np.float32)
    extractor = ClapFeatureExtractor(frequency_min=50, truncation="rand_trunc", padding="repeatpad")
    ref = extractor(clip, sampling_rate=48000, return_tensors="np")["input_features"]  # [1, 1, 1001, 64]
    wave = pad_or_trim(clip, cfg.num_samples, cfg.padding)
    mine = LogMel(parse(AudioConfig, {"stft_dtype": "float64"}, "audio"))(torch.from_numpy(wave)[None])
    assert mine.shape == (1, 1, cfg.num_frames, 64) == (1, 1, 1001, 64) and mine.dtype == torch.float32
    assert np.all(np.abs(mine[0].numpy() - ref[0]) <= float32_rounding_bound(ref[0]))


@pytest.mark.parametrize("stft_dtype", ["float64", "float32"])
def test_logmel_batch_equals_per_sample_numpy_reference(stft_dtype):
    cfg = parse(AudioConfig, {"sample_rate": 16000, "duration_s": 0.5, "n_fft": 256, "hop_length": 100,
                              "n_mels": 20, "fmin": 0.0, "fmax": 8000.0, "mel_scale": "htk", "mel_norm": "none",
                              "stft_dtype": stft_dtype}, "audio")
    t = torch.arange(3 * cfg.num_samples, dtype=torch.float64).view(3, -1) / 16000
    # Loud tones over faint noise: quiet bands 60-80 dB under each frame's energy, where float32 errs.
    waves = (0.5 * torch.sin(2 * np.pi * 440 * (1 + torch.arange(3)[:, None]) * t)
             + 1e-4 * torch.randn(3, cfg.num_samples, dtype=torch.float64)).float()
    out = LogMel(cfg)(waves)
    assert out.shape == (3, 1, cfg.num_frames, 20)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(256) / 256)  # periodic Hann
    fb = mel_filterbank(16000, 256, 20, 0.0, 8000.0, "htk", "none", dtype=torch.float64).numpy()
    for b in range(3):
        padded = np.pad(waves[b].double().numpy(), 128, mode="reflect")
        frames = np.stack([padded[i * 100:i * 100 + 256] * window for i in range(cfg.num_frames)])
        power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
        ref = 10 * np.log10(np.maximum(power @ fb, 1e-10))
        error = np.abs(out[b, 0].numpy() - ref)
        if stft_dtype == "float64":
            assert np.all(error <= float32_rounding_bound(ref))
        else:
            assert np.all(error <= float32_stft_bound(frames, fb, power @ fb)) and error.max() > 1e-4


def test_pad_or_trim():
    wave = np.arange(1, 4, dtype=np.float32)
    np.testing.assert_array_equal(pad_or_trim(wave, 8, "repeatpad"), [1, 2, 3, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(pad_or_trim(wave, 5, "pad"), [1, 2, 3, 0, 0])
    np.testing.assert_array_equal(pad_or_trim(wave, 2, "repeatpad"), [1, 2])


def _audio_cfg(**kw):
    raw = {"sample_rate": 16000, "duration_s": 0.25, "n_fft": 256, "hop_length": 128, "n_mels": 16,
           "fmin": 0.0, "fmax": 8000.0, **kw}
    return parse(AudioConfig, raw, "audio")


@pytest.mark.parametrize("fmt", ["FLAC", "WAV", "OGG", "MP3"])
def test_audio_decodes_every_format_to_fixed_length_mono(fmt):
    cfg = _audio_cfg()
    out = AudioTransform(cfg, train=False)(audio_bytes(0.5, 16000, fmt, channels=2))
    assert out.shape == (cfg.num_samples,) and out.dtype == np.float32
    ref = audio_bytes(0.5, 16000, "WAV", channels=2)
    ref_wave = soundfile.read(io.BytesIO(ref), dtype="float32")[0].mean(1)[: cfg.num_samples]
    if fmt in ("FLAC", "WAV"):  # lossless: equals channel mean of the first 0.25 s
        np.testing.assert_allclose(out, ref_wave, atol=1e-4)
    else:  # lossy: same signal, up to codec error
        assert np.corrcoef(out[1000:3000], ref_wave[1000:3000])[0, 1] > 0.9
    # training crops of a longer file seek into it
    long_clip = audio_bytes(2.0, 16000, fmt, channels=2)
    crop = AudioTransform(cfg, train=True)(long_clip, np.random.default_rng(3))
    assert crop.shape == (cfg.num_samples,) and np.abs(crop).max() > 0.1


def test_audio_resamples_to_model_rate():
    cfg = _audio_cfg()
    data = audio_bytes(0.3, 44100, "FLAC")
    out = AudioTransform(cfg, train=False)(data)
    source = soundfile.read(io.BytesIO(data), dtype="float32")[0]
    ref = soxr.resample(source, 44100, 16000)[: cfg.num_samples]
    # Cropping before resampling changes only the filter's edge at the crop end.
    np.testing.assert_allclose(out[:3000], ref[:3000], atol=2e-3)


def test_audio_train_crop_is_random_and_seeded_eval_takes_start():
    cfg = _audio_cfg()
    data = audio_bytes(2.0, 16000, "FLAC")
    full = soundfile.read(io.BytesIO(data), dtype="float32")[0]
    train = AudioTransform(cfg, train=True)
    a = train(data, np.random.default_rng(1))
    b = train(data, np.random.default_rng(1))
    c = train(data, np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    start = int(np.argmin([np.abs(full[s:s + len(a)] - a).max() for s in range(len(full) - len(a) + 1)]))
    np.testing.assert_allclose(full[start:start + len(a)], a, atol=1e-6)  # a contiguous crop of the clip
    np.testing.assert_allclose(AudioTransform(cfg, train=False)(data), full[: cfg.num_samples], atol=1e-6)


@pytest.mark.parametrize("data", [b"", b"not audio at all" * 10, audio_bytes(0.5, 16000, "FLAC")[:200]])
def test_corrupt_audio_raises_sample_skipped(data):
    with pytest.raises(SampleSkipped) as info:
        AudioTransform(_audio_cfg(), train=False)(data)
    assert info.value.kind == "corrupt_audio"


# Images ---------------------------------------------------------------------------------------

def _image_cfg(**kw):
    return parse(ImageConfig, {"size": 32, "jpeg_draft": False, **kw}, "image")


@pytest.mark.parametrize("width, height", [(80, 50), (50, 80), (64, 64), (20, 13)])
def test_eval_transform_equals_resize_then_center_crop(width, height):
    cfg = _image_cfg()
    data = image_bytes(width, height, fmt="PNG")
    out = ImageTransform(cfg, train=False)(data)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # Plain reference: resize the shorter side to 32 (bicubic), then crop the centre.
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = 32 / min(width, height)
    new = (max(32, round(width * scale)), max(32, round(height * scale)))
    resized = np.asarray(image.resize(new, Image.Resampling.BICUBIC), dtype=np.float64)
    top, left = (new[1] - 32) // 2, (new[0] - 32) // 2
    ref = resized[top:top + 32, left:left + 32]
    # One-step crop+resize differs from two steps only by sub-pixel offsets at the crop edge.
    assert np.abs(out[2:-2, 2:-2] - ref[2:-2, 2:-2]).mean() < 6.0


def test_train_crop_is_seeded_and_within_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        left, top, right, bottom = random_crop_box(w, h, [0.08, 1.0], [3 / 4, 4 / 3], rng)
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
    for _ in range(50):  # a square image always fits a sampled box: area and ratio in range (up to rounding)
        left, top, right, bottom = random_crop_box(200, 200, [0.5, 0.8], [3 / 4, 4 / 3], rng)
        area, ratio = (right - left) * (bottom - top) / 200 ** 2, (right - left) / (bottom - top)
        assert 0.49 <= area <= 0.81 and 0.74 <= ratio <= 1.35
    # No box of >= 90% area fits a 3:2 image with ratio <= 4/3: the fallback centre crop, clamped to 4/3.
    assert random_crop_box(90, 60, [0.9, 1.0], [3 / 4, 4 / 3], rng) == (5, 0, 85, 60)
    cfg = _image_cfg()
    data = image_bytes(80, 72, fmt="PNG")
    train = ImageTransform(cfg, train=True)
    np.testing.assert_array_equal(train(data, np.random.default_rng(5)), train(data, np.random.default_rng(5)))
    assert not np.array_equal(train(data, np.random.default_rng(5)), train(data, np.random.default_rng(6)))


@pytest.mark.parametrize("fmt, mode", [("PNG", "RGBA"), ("PNG", "L"), ("PNG", "P"), ("WEBP", "RGB"),
                                       ("JPEG", "CMYK")])
def test_any_pillow_mode_becomes_rgb(fmt, mode):
    out = ImageTransform(_image_cfg(), train=False)(image_bytes(40, 30, fmt=fmt, mode=mode))
    assert out.shape == (32, 32, 3)


def test_jpeg_draft_stays_close_to_full_decode():
    data = image_bytes(400, 300, fmt="JPEG")
    full = ImageTransform(_image_cfg(), train=False)(data).astype(np.float64)
    draft = ImageTransform(_image_cfg(jpeg_draft=True), train=False)(data).astype(np.float64)
    assert np.abs(full - draft).mean() < 8.0


@pytest.mark.parametrize("data", [b"", b"\xff\xd8\xff garbage", image_bytes(64, 64, fmt="JPEG")[:300]])
def test_corrupt_image_raises_sample_skipped(data):
    with pytest.raises(SampleSkipped) as info:
        ImageTransform(_image_cfg(), train=False)(data)
    assert info.value.kind == "corrupt_image"


def test_normalizer_matches_formula():
    cfg = parse(ImageConfig, {}, "image")
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 5, 4, 3), dtype=np.uint8)
    out = ImageNormalizer(cfg)(pixels)
    assert out.shape == (2, 3, 5, 4) and out.dtype == torch.float32 and out.is_contiguous()
    ref = (pixels.astype(np.float64) / 255 - np.array(cfg.mean)) / np.array(cfg.std)
    np.testing.assert_allclose(out.numpy(), ref.transpose(0, 3, 1, 2), atol=1e-5)


def test_logmel_batch_is_its_clips_and_shapes_are_checked():
    cfg = parse(AudioConfig, {}, "audio")
    logmel = LogMel(cfg)
    waves = np.random.default_rng(0).standard_normal((3, cfg.num_samples)).astype(np.float32)
    together = logmel(torch.from_numpy(waves))
    assert together.shape == (3, 1, cfg.num_frames, cfg.n_mels) and together.dtype == torch.float32
    for i in range(3):
        np.testing.assert_array_equal(together[i, 0].numpy(), logmel.clip(waves[i]))
    np.testing.assert_array_equal(logmel(waves).numpy(), together.numpy())  # numpy in, same result
    with pytest.raises(ValueError, match=r"expected waveforms \[batch, samples\]"):
        logmel(torch.from_numpy(waves[0]))
    with pytest.raises(ValueError, match=r"expected one waveform \[samples\]"):
        logmel.clip(waves)
    with pytest.raises(ValueError, match="too short for reflect padding"):
        logmel.clip(waves[0, :100])


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_keeps_its_range(fmt):
    """Pillow's convert('RGB') clips 16-bit grey at 255 (a white image); the top 8 bits are kept."""
    y, x = np.mgrid[0:48, 0:64]
    values = (x * 1024 + y * 16).astype(np.uint16)  # 0 .. 65264
    out = io.BytesIO()
    Image.fromarray(values).save(out, format=fmt)
    assert Image.open(io.BytesIO(out.getvalue())).mode.startswith("I")
    cfg = _image_cfg(size=64)
    out16 = ImageTransform(cfg, train=False)(out.getvalue())  # 64x48 -> centre 48x48 -> 64x64
    ref = ImageTransform(cfg, train=False)(image_from_array((values >> 8).astype(np.uint8)))
    np.testing.assert_array_equal(out16, ref)
    assert out16.min() < 40 and out16.max() > 200  # the centre spans grey 32 .. 223, not white


def image_from_array(values: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(values).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF"])
def test_other_pillow_formats_decode(fmt):
    out = ImageTransform(_image_cfg(), train=False)(image_bytes(40, 30, fmt=fmt))
    assert out.shape == (32, 32, 3) and out.std() > 10


# The TurboJPEG path -----------------------------------------------------------------------------

def _jpeg(width: int, height: int, seed: int = 0, mode: str = "RGB", **save) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 7 % 256, y * 5 % 256, (x * y) % 256], -1) + rng.integers(0, 48, size=(height, width, 3))
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode).save(out, format="JPEG", **save)
    return out.getvalue()


def _pillow_transform(cfg, train: bool, data: bytes, rng=None) -> np.ndarray:
    """The plain reference: Pillow decodes (with the same draft request), crops and resizes."""
    image = Image.open(io.BytesIO(data))
    if cfg.jpeg_draft:
        need = cfg.size if not train else int(np.ceil(cfg.size / np.sqrt(cfg.train_crop_scale[0])))
        image.draft("RGB", (need, need))
    image = image.convert("RGB")
    box = (random_crop_box(*image.size, cfg.train_crop_scale, cfg.train_crop_ratio, rng) if train
           else center_crop_box(*image.size))
    return np.asarray(image.resize((cfg.size, cfg.size), Image.Resampling.BICUBIC, box=box))


JPEG_CASES = [dict(width=w, height=h, mode=mode, subsampling=sub, progressive=prog, quality=q)
              for (w, h) in [(64, 64), (53, 37), (9, 17), (1, 1), (130, 70)]
              for mode, sub in [("RGB", 0), ("RGB", 1), ("RGB", 2), ("L", 0)]
              for prog, q in [(False, 90), (True, 40)]]


@pytest.fixture
def turbo_calls(monkeypatch):
    """Counts the images the TurboJPEG path decodes (after the once-per-process probe)."""
    image_module.turbo_matches_pillow()
    calls = []
    decode = image_module._turbo_decode
    monkeypatch.setattr(image_module, "_turbo_decode", lambda data: calls.append(1) or decode(data))
    return calls


@pytest.mark.parametrize("draft", [False, True])
def test_turbo_jpeg_path_gives_pillows_pixels(draft, turbo_calls):
    """Every chroma subsampling, grey, progressive, odd and 1-pixel sizes, train and eval, with and
    without drafts: the same uint8 pixels as Pillow's own decode, and the fast path really ran."""
    assert image_module.turbo_matches_pillow()
    cfg = _image_cfg(size=24, jpeg_draft=draft)
    for i, case in enumerate(JPEG_CASES):
        case = dict(case)
        data = _jpeg(case.pop("width"), case.pop("height"), seed=i, mode=case.pop("mode"), **case)
        np.testing.assert_array_equal(ImageTransform(cfg, train=False)(data), _pillow_transform(cfg, False, data))
        np.testing.assert_array_equal(ImageTransform(cfg, train=True)(data, np.random.default_rng(i)),
                                      _pillow_transform(cfg, True, data, np.random.default_rng(i)))
    # With drafts, JPEGs of >= 2x the side needed (24 eval, 26 train) decode at a reduced scale: Pillow's
    # draft does that (64x64 and 130x70 here), TurboJPEG the rest.
    reduced = sum(1 for c in JPEG_CASES for need in (24, 26) if draft and min(c["width"], c["height"]) // need >= 2)
    assert reduced == (32 if draft else 0)
    assert len(turbo_calls) == 2 * len(JPEG_CASES) - reduced


@pytest.mark.parametrize("subsampling", ["440", "411"])
def test_subsamplings_pillow_does_not_write_decode_as_pillow_does(subsampling, turbo_calls):
    """4:4:0 (e.g. a 4:2:2 photo rotated losslessly) and 4:1:1 take the TurboJPEG path too (the
    probe covers them): the same pixels as Pillow's own decode."""
    simplejpeg = pytest.importorskip("simplejpeg")
    rgb = np.random.default_rng(3).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    data = simplejpeg.encode_jpeg(rgb, quality=90, colorsubsampling=subsampling)
    cfg = _image_cfg(size=24)
    np.testing.assert_array_equal(ImageTransform(cfg, train=False)(data), _pillow_transform(cfg, False, data))
    assert len(turbo_calls) == 1


def test_without_simplejpeg_pillow_decodes_every_jpeg(monkeypatch, caplog):
    """A missing (or unbuildable) simplejpeg costs speed, not samples: one warning, Pillow's pixels."""
    import builtins
    real_import = builtins.__import__

    def no_simplejpeg(name, *args, **kwargs):
        if name == "simplejpeg":
            raise ImportError("No module named 'simplejpeg'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_simplejpeg)
    image_module.turbo_matches_pillow.cache_clear()
    try:
        cfg = _image_cfg()
        data = _jpeg(40, 30)
        with caplog.at_level("WARNING", logger="xfast.data"):
            transform = ImageTransform(cfg, train=False)
            out = transform(data)
        np.testing.assert_array_equal(out, _pillow_transform(cfg, False, data))
        assert [r.getMessage() for r in caplog.records if "simplejpeg cannot be imported" in r.getMessage()] != []
    finally:
        monkeypatch.undo()
        image_module.turbo_matches_pillow.cache_clear()


def test_jpegs_turbojpeg_refuses_or_leaves_to_pillow_decode_as_pillow_does(monkeypatch, turbo_calls):
    cfg = _image_cfg()
    clean = _jpeg(40, 30)
    # Junk before the end marker: libjpeg warns, TurboJPEG (strict) refuses, Pillow decodes it.
    junk = clean[:-2] + b"\x00\x01\x02\x03" + clean[-2:]
    cmyk = _jpeg(40, 30, mode="CMYK")  # Pillow inverts Adobe CMYK and converts it itself
    for data in (junk, cmyk):
        np.testing.assert_array_equal(ImageTransform(cfg, train=False)(data), _pillow_transform(cfg, False, data))
    assert len(turbo_calls) == 1  # tried on the junk one only, then left to Pillow
    # Where the probe found other pixels (another libjpeg-turbo build), Pillow decodes every JPEG.
    monkeypatch.setattr(image_module, "turbo_matches_pillow", lambda: False)
    np.testing.assert_array_equal(ImageTransform(cfg, train=False)(clean), _pillow_transform(cfg, False, clean))
    assert len(turbo_calls) == 1


def test_jpeg_above_the_decompression_bomb_limit_is_skipped(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 30 - 1)
    with pytest.raises(SampleSkipped) as info:
        ImageTransform(_image_cfg(), train=False)(_jpeg(40, 30))
    assert info.value.kind == "corrupt_image" and "decompression bomb" in str(info.value)


def test_normalizer_in_shared_memory_gives_the_same_batch():
    """In a DataLoader worker the batch is built in shared memory (nothing copied on sending)."""
    cfg = parse(ImageConfig, {}, "image")
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 7, 5, 3), dtype=np.uint8)
    shared = ImageNormalizer(cfg)(pixels, shared=True)
    assert shared.is_shared() and shared.is_contiguous() and shared.shape == (3, 3, 7, 5)
    assert torch.equal(shared, ImageNormalizer(cfg)(pixels))
