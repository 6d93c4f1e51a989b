"""Audio decoding (soundfile), resampling (soxr), crop/pad and the log-mel front end.

Per sample: decode (FLAC/WAV/OGG/Opus/MP3, see audio_io) only the part that becomes the clip
(uniformly random start when training, the start when evaluating; libsndfile seeks there, so
long files are neither decoded nor resampled whole; the window is checked against what really
decodes), average channels to mono, resample to the model rate, then pad short clips
('repeatpad': tile whole copies then zero-pad, as LAION-CLAP), then the log-mel: periodic Hann
window, centred frames with reflect padding, float64 power spectrum, mel filterbank, dB.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.fft
import scipy.sparse
import soundfile
import soxr
import torch
from numpy.lib.stride_tricks import sliding_window_view

from xfast.data.audio_io import open_audio, read_frames
from xfast.data.config import AudioConfig
from xfast.data.skips import SampleSkipped

AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus")

# Slaney's auditory-toolbox mel scale: linear below 1 kHz, logarithmic above (librosa's default).
_SLANEY_F_SP = 200.0 / 3
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray, scale: str) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    linear = hz / _SLANEY_F_SP
    log_part = _SLANEY_MIN_LOG_MEL + np.log(np.maximum(hz, _SLANEY_MIN_LOG_HZ) / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOG_STEP
    return np.where(hz >= _SLANEY_MIN_LOG_HZ, log_part, linear)


def mel_to_hz(mel: np.ndarray, scale: str) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    linear = mel * _SLANEY_F_SP
    log_part = _SLANEY_MIN_LOG_HZ * np.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_MIN_LOG_MEL))
    return np.where(mel >= _SLANEY_MIN_LOG_MEL, log_part, linear)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float,
                   scale: str = "slaney", norm: str = "slaney", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triangular mel filters [n_fft // 2 + 1, n_mels] (computed in float64, returned in `dtype`).

    Filter edges are `n_mels + 2` points equally spaced on the mel scale between fmin and fmax;
    each filter rises linearly (in Hz) from its left edge to its centre and falls to its right
    edge. norm='slaney' scales filter i by 2 / (right_i - left_i) (equal area).
    """
    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin, scale), hz_to_mel(fmax, scale), n_mels + 2), scale)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_hz[None, :] - left) / (center - left)
    falling = (right - fft_hz[None, :]) / (right - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    if norm == "slaney":
        weights *= 2.0 / (right - left)
    return torch.from_numpy(np.ascontiguousarray(weights.T)).to(dtype)


class AudioTransform:
    """bytes -> float32 mono waveform of exactly cfg.num_samples at cfg.sample_rate."""

    def __init__(self, cfg: AudioConfig, train: bool):
        self.cfg = cfg
        self.train = train

    def __call__(self, data: bytes, rng: np.random.Generator | None = None, ext: str | None = None) -> np.ndarray:
        """`ext`: the file's extension (e.g. 'mp3'), the format hint a file name gives a decoder."""
        try:
            with open_audio(data, ext) as f:
                rate = f.samplerate
                wave = self._read_clip(f, rng)
        except Exception as err:  # libsndfile errors, unknown formats, truncated headers
            raise SampleSkipped("corrupt_audio", str(err)) from None
        if wave.shape[0] == 0:
            raise SampleSkipped("corrupt_audio", "no audio samples")
        wave = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
        if not np.isfinite(wave).all():
            raise SampleSkipped("corrupt_audio", "non-finite audio samples")
        if rate != self.cfg.sample_rate:
            wave = soxr.resample(wave, rate, self.cfg.sample_rate)
        return pad_or_trim(wave, self.cfg.num_samples, self.cfg.padding)

    def _read_clip(self, f: soundfile.SoundFile, rng: np.random.Generator | None) -> np.ndarray:
        """Decode only the source frames covering one clip: the start when evaluating, a uniformly
        random window when training (seeking into long files)."""
        need = math.ceil(self.cfg.num_samples * f.samplerate / self.cfg.sample_rate) + 1
        if not self.train or f.frames <= need:
            return read_frames(f, need)
        fraction = rng.random()
        try:
            f.seek(int(fraction * (f.frames - need + 1)))
            wave = read_frames(f, need)
        except soundfile.LibsndfileError:  # a seek past the real end
            wave = None
        if wave is not None and wave.shape[0] == need:
            return wave
        # The header promised more frames than decode (MP3 headers may): crop within what is there.
        f.seek(0)
        wave = read_frames(f)
        start = int(fraction * max(wave.shape[0] - need + 1, 1))
        return wave[start:start + need]


def pad_or_trim(wave: np.ndarray, length: int, padding: str) -> np.ndarray:
    """Exactly `length` samples: trim the end, or pad ('repeatpad': whole copies, then zeros)."""
    if wave.shape[0] >= length:
        return np.ascontiguousarray(wave[:length], dtype=np.float32)
    if padding == "repeatpad":
        wave = np.tile(wave, length // wave.shape[0])
    out = np.zeros(length, dtype=np.float32)
    out[: wave.shape[0]] = wave
    return out


class LogMel:
    """Log-mel spectrograms in dB, HTSAT layout: a clip [samples] -> [frames, n_mels] (`clip`),
    a batch [B, samples] -> [B, 1, frames, n_mels] (call).

    The STFT (scipy's pocketfft, faster on CPU than torch's), power, mel filters (sparse: each
    bin feeds at most two triangles) and dB run in cfg.stft_dtype; the result is float32.
    float32 loses precision in quiet bins: their power comes from sums that cancel (up to 4e-3
    dB on real clips); float64 gives HF's / librosa's values to float32 rounding.
    """

    def __init__(self, cfg: AudioConfig):
        self.n_fft = cfg.n_fft
        self.hop_length = cfg.hop_length
        dtype = np.dtype(cfg.stft_dtype)
        # Periodic Hann, and the mel filters transposed [n_mels, freqs], computed in float64.
        self.window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.n_fft) / cfg.n_fft)).astype(dtype)
        filters = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax,
                                 cfg.mel_scale, cfg.mel_norm, dtype=torch.float64).numpy()
        # Bins above the last filter's edge (fmax) feed nothing: their power is never computed.
        self.bins = int(np.flatnonzero(filters.any(axis=1))[-1]) + 1
        self.filters_t = scipy.sparse.csr_matrix(filters[: self.bins].T.astype(dtype))

    def clip(self, wave: np.ndarray) -> np.ndarray:
        """float32 [frames, n_mels] of one waveform [samples]: centred frames (reflect padding)."""
        if wave.ndim != 1:
            raise ValueError(f"expected one waveform [samples], got shape {wave.shape}")
        half = self.n_fft // 2
        if wave.shape[0] <= half:
            raise ValueError(f"a waveform of {wave.shape[0]} samples is too short for reflect padding by {half}")
        frames = sliding_window_view(np.pad(wave, half, mode="reflect"), self.n_fft)[:: self.hop_length]
        # [frames, freqs], complex in the window's precision; the windowed copy is the FFT's scratch.
        spec = scipy.fft.rfft(frames * self.window, overwrite_x=True)[:, : self.bins]
        power = np.square(spec.real)
        power += np.square(spec.imag)
        mel = (self.filters_t @ power.T).T  # [frames, n_mels]
        # Power to dB with reference 1 and floor 1e-10 (librosa's power_to_db, top_db off).
        return (10.0 * np.log10(np.maximum(mel, 1e-10))).astype(np.float32)

    def __call__(self, waves: torch.Tensor | np.ndarray) -> torch.Tensor:
        if waves.ndim != 2:
            raise ValueError(f"expected waveforms [batch, samples], got shape {tuple(waves.shape)}")
        waves = waves.numpy() if isinstance(waves, torch.Tensor) else waves
        return torch.from_numpy(np.stack([self.clip(wave) for wave in waves]))[:, None]
