"""Audio decoding (soundfile), resampling (soxr), crop/pad and a batched log-mel front end.

Per sample: decode (FLAC/WAV/OGG/MP3) only the part that becomes the clip (uniformly random
start when training, the start when evaluating; libsndfile seeks there, so long files are
neither decoded nor resampled whole), average channels to mono, resample to the model rate,
then pad short clips ('repeatpad': tile whole copies then zero-pad, as LAION-CLAP). Per batch:
periodic Hann window, centred `torch.stft` with reflect padding, power spectrum, mel
filterbank, dB.
"""
from __future__ import annotations

import io
import math

import numpy as np
import soundfile
import soxr
import torch

from xfast.data.config import AudioConfig
from xfast.data.skips import SampleSkipped

AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg")

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
                   scale: str = "slaney", norm: str = "slaney") -> torch.Tensor:
    """Triangular mel filters, float32 [n_fft // 2 + 1, n_mels].

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
    return torch.from_numpy(weights.T.astype(np.float32)).contiguous()


class AudioTransform:
    """bytes -> float32 mono waveform of exactly cfg.num_samples at cfg.sample_rate."""

    def __init__(self, cfg: AudioConfig, train: bool):
        self.cfg = cfg
        self.train = train

    def __call__(self, data: bytes, rng: np.random.Generator | None = None) -> np.ndarray:
        try:
            wave, rate = self._read_crop(data, rng)
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

    def _read_crop(self, data: bytes, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
        """Decode only the source samples covering one clip (seeking into long files)."""
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            rate, total = f.samplerate, f.frames
            need = math.ceil(self.cfg.num_samples * rate / self.cfg.sample_rate) + 1
            start = int(rng.integers(0, total - need + 1)) if self.train and 0 < need < total else 0
            if start and f.seekable():
                f.seek(start)
                return f.read(need, dtype="float32", always_2d=True), rate
            wave = f.read(dtype="float32", always_2d=True)
        return wave[start:start + need], rate


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
    """float32 waveforms [B, samples] -> log-mel in dB [B, 1, frames, n_mels] (HTSAT layout)."""

    def __init__(self, cfg: AudioConfig):
        self.n_fft = cfg.n_fft
        self.hop_length = cfg.hop_length
        self.window = torch.hann_window(cfg.n_fft, periodic=True, dtype=torch.float32)
        filters = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax,
                                 cfg.mel_scale, cfg.mel_norm)
        # Each filter row twice: applied to (re^2, im^2) pairs it sums the power inside the matmul.
        self.pair_filters = filters.repeat_interleave(2, dim=0)  # [2 * freqs, n_mels]
        # Clips per STFT call: keep the complex spectrogram of a chunk around 8 MB (cache sized);
        # one call over a whole batch of 10 s clips runs about 2x slower per clip.
        spectrogram_bytes = cfg.num_frames * (cfg.n_fft // 2 + 1) * 8
        self.chunk = max(1, (8 << 20) // spectrogram_bytes)

    def __call__(self, waves: torch.Tensor) -> torch.Tensor:
        if waves.dim() != 2:
            raise ValueError(f"expected waveforms [batch, samples], got shape {tuple(waves.shape)}")
        return torch.cat([self._logmel(part) for part in waves.split(self.chunk)])

    def _logmel(self, waves: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(waves, self.n_fft, self.hop_length, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)  # [B, freqs, frames]
        frames = torch.view_as_real(spec.transpose(1, 2).contiguous())  # [B, frames, freqs, 2]
        squares = frames.reshape(frames.shape[0], frames.shape[1], -1).square_()
        mel = torch.matmul(squares, self.pair_filters)  # [B, frames, n_mels]
        # Power to dB with reference 1 and floor 1e-10 (librosa's power_to_db, top_db off).
        return mel.clamp_(min=1e-10).log10_().mul_(10.0).unsqueeze(1)
