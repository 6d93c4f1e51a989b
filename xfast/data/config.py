"""The "data" config section: sources, modality, batching, and per-modality preprocessing.

Image and audio settings come from a named preset (`clip`, `laion_clap`); any key given
explicitly overrides the preset. With `preset: null` every key must be given.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from xfast.config import ConfigError

# OpenAI CLIP's image preprocessing (also open_clip's default for OpenAI models).
IMAGE_PRESETS: dict[str, dict] = {
    "clip": {
        "size": 224,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "train_crop_scale": [0.9, 1.0],
        "train_crop_ratio": [3 / 4, 4 / 3],
    },
}

# LAION-CLAP's HTSAT audio front end without fusion ("rand_trunc"): librosa-style slaney mel
# filters with slaney area normalisation, power spectrogram in dB (ref 1, amin 1e-10, no top_db).
AUDIO_PRESETS: dict[str, dict] = {
    "laion_clap": {
        "sample_rate": 48000,
        "duration_s": 10.0,
        "n_fft": 1024,
        "hop_length": 480,
        "n_mels": 64,
        "fmin": 50.0,
        "fmax": 14000.0,
        "mel_scale": "slaney",
        "mel_norm": "slaney",
        "padding": "repeatpad",
    },
}


def _fill_from_preset(section, presets: dict[str, dict]) -> None:
    if section.preset is None:
        return
    if section.preset not in presets:
        return  # reported by validate() with the allowed names
    for key, value in presets[section.preset].items():
        if getattr(section, key) is None:
            setattr(section, key, list(value) if isinstance(value, list) else value)


def _require_filled(section, path: str) -> None:
    for f in dataclasses.fields(section):
        if getattr(section, f.name) is None and f.name != "preset":
            raise ConfigError(f"{path}.{f.name}: required when {path}.preset is null")


def _check_range(path: str, pair: list[float], low: float, high: float | None = None) -> None:
    if len(pair) != 2 or not (low < pair[0] <= pair[1]) or (high is not None and pair[1] > high):
        bound = f"<= {high}" if high is not None else ""
        raise ConfigError(f"{path}: expected [min, max] with {low} < min <= max {bound}, got {pair}")


@dataclass
class SourceConfig:
    """One stream of shards; several sources are mixed by weight (resampled mode)."""

    urls: str | list[str] = field(metadata={"help": "shard URLs: local paths or directories, brace patterns "
                                            "('shards-{0000..0099}.tar'), '::'-joined lists, 'pipe:CMD' for object "
                                            "stores; .txt (one sentence a line), .csv and .jsonl files for text"})
    weight: float = field(default=1.0, metadata={"help": "relative sampling weight of this source (resampled mode)"})

    def validate(self, path: str) -> None:
        if not self.urls:
            raise ConfigError(f"{path}.urls: empty")
        if not self.weight > 0:
            raise ConfigError(f"{path}.weight: must be > 0, got {self.weight}")


@dataclass
class ImageConfig:
    preset: Literal["clip"] | None = field(default="clip", metadata={"help": "defaults for the keys left unset"})
    size: int | None = field(default=None, metadata={"help": "output height and width in pixels"})
    mean: list[float] | None = field(default=None, metadata={"help": "per-channel RGB mean (0..1 scale)"})
    std: list[float] | None = field(default=None, metadata={"help": "per-channel RGB std (0..1 scale)"})
    interpolation: Literal["bicubic", "bilinear"] | None = field(default=None, metadata={"help": "resize filter"})
    train_crop_scale: list[float] | None = field(
        default=None, metadata={"help": "random resized crop: [min, max] fraction of the image area (training)"})
    train_crop_ratio: list[float] | None = field(
        default=None, metadata={"help": "random resized crop: [min, max] aspect ratio (training)"})
    jpeg_draft: bool = field(default=True, metadata={
        "help": "let libjpeg decode large JPEGs at a reduced scale that still covers the output size (much faster; "
                "pixels differ slightly from a full-size decode)"})

    def __post_init__(self):
        _fill_from_preset(self, IMAGE_PRESETS)

    def validate(self, path: str) -> None:
        _require_filled(self, path)
        if self.size <= 0:
            raise ConfigError(f"{path}.size: must be > 0, got {self.size}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3:
                raise ConfigError(f"{path}.{name}: expected 3 values (R, G, B), got {len(values)}")
        if min(self.std) <= 0:
            raise ConfigError(f"{path}.std: values must be > 0, got {self.std}")
        _check_range(f"{path}.train_crop_scale", self.train_crop_scale, 0.0, 1.0)
        _check_range(f"{path}.train_crop_ratio", self.train_crop_ratio, 0.0)


@dataclass
class AudioConfig:
    preset: Literal["laion_clap"] | None = field(default="laion_clap", metadata={"help": "defaults for unset keys"})
    sample_rate: int | None = field(default=None, metadata={"help": "model sample rate in Hz (audio is resampled)"})
    duration_s: float | None = field(default=None, metadata={"help": "clip length in seconds: longer audio is "
                                                                     "cropped, shorter audio padded"})
    n_fft: int | None = field(default=None, metadata={"help": "STFT size = Hann window length in samples"})
    hop_length: int | None = field(default=None, metadata={"help": "STFT hop in samples"})
    n_mels: int | None = field(default=None, metadata={"help": "number of mel bins"})
    fmin: float | None = field(default=None, metadata={"help": "lowest mel filter edge in Hz"})
    fmax: float | None = field(default=None, metadata={"help": "highest mel filter edge in Hz (<= sample_rate / 2)"})
    mel_scale: Literal["slaney", "htk"] | None = field(default=None, metadata={
        "help": "mel scale: 'slaney' (librosa default, LAION-CLAP HTSAT) or 'htk' (torchaudio default)"})
    mel_norm: Literal["slaney", "none"] | None = field(default=None, metadata={
        "help": "'slaney' divides each filter by its width (constant energy per band), 'none' keeps peak 1"})
    padding: Literal["repeatpad", "pad"] | None = field(default=None, metadata={
        "help": "short clips: 'repeatpad' tiles the clip then zero-pads (LAION-CLAP), 'pad' zero-pads"})
    output: Literal["logmel", "waveform"] = field(default="logmel", metadata={
        "help": "'logmel': input_features [B,1,frames,n_mels] in dB; 'waveform': waveform [B,samples]"})
    stft_dtype: Literal["float32", "float64"] = field(default="float32", metadata={
        "help": "precision of the log-mel's STFT: float32 (within 4e-3 dB of float64 on real audio; 1.7x faster) "
                "or float64 (HF's ClapFeatureExtractor / librosa values to float32 rounding)"})

    def __post_init__(self):
        _fill_from_preset(self, AUDIO_PRESETS)

    @property
    def num_samples(self) -> int:
        return int(round(self.duration_s * self.sample_rate))

    @property
    def num_frames(self) -> int:
        """Frames of the centred STFT over one clip."""
        return self.num_samples // self.hop_length + 1

    def validate(self, path: str) -> None:
        _require_filled(self, path)
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}: must be > 0, got {getattr(self, name)}")
        if not self.duration_s > 0:
            raise ConfigError(f"{path}.duration_s: must be > 0, got {self.duration_s}")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ConfigError(f"{path}: need 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin}, "
                              f"fmax={self.fmax}, sample_rate={self.sample_rate}")
        if self.n_mels > self.n_fft // 2 + 1:
            raise ConfigError(f"{path}.n_mels: {self.n_mels} mel bins exceed the {self.n_fft // 2 + 1} STFT bins")
        if self.num_samples <= self.n_fft // 2:
            raise ConfigError(f"{path}.duration_s: clip of {self.num_samples} samples is shorter than half the "
                              f"STFT window ({self.n_fft})")


@dataclass
class TextConfig:
    max_length: int = field(default=77, metadata={"help": "tokens per text (padded and truncated to this)"})
    caption_keys: list[str] = field(default_factory=lambda: ["json:text", "txt", "json:caption"], metadata={
        "help": "where captions are looked for, first found wins: 'json:FIELD' is a field of the sample's .json "
                "(a string or a list of captions; LAION-CLAP and `xfast shards` use 'text'), 'txt' its .txt file "
                "(img2dataset)"})
    tag_field: str = field(default="tag", metadata={"help": "field of the .json holding labels/tags (eval)"})
    train_caption: Literal["random", "first"] = field(default="random", metadata={
        "help": "which caption of a list a training sample uses"})
    nli_fields: list[str] = field(default_factory=lambda: ["anchor", "positive", "negative"], metadata={
        "help": "fields of an NLI .json/.jsonl record: anchor, positive, hard negative"})
    nli_csv_columns: list[str] = field(default_factory=lambda: ["sent0", "sent1", "hard_neg"], metadata={
        "help": "CSV columns of an NLI file (SimCSE's layout): anchor, positive, hard negative"})

    def validate(self, path: str) -> None:
        if self.max_length <= 1:
            raise ConfigError(f"{path}.max_length: must be > 1, got {self.max_length}")
        if not self.caption_keys:
            raise ConfigError(f"{path}.caption_keys: at least one place to look for captions is needed")
        for i, key in enumerate(self.caption_keys):
            if key != "txt" and not (key.startswith("json:") and len(key) > 5):
                raise ConfigError(f"{path}.caption_keys[{i}]: {key!r} is neither 'txt' nor 'json:FIELD'")
        for name in ("nli_fields", "nli_csv_columns"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"{path}.{name}: expected 3 names (anchor, positive, negative)")


@dataclass
class DataConfig:
    """Section "data" of the training config."""

    sources: list[SourceConfig] = field(metadata={"help": "list of {urls, weight}"})
    modality: Literal["image", "audio", "text", "nli"] = field(default="image", metadata={
        "help": "image-caption, audio-caption, unsupervised sentences (SimCSE) or NLI triplets"})
    batch_size: int = field(default=256, metadata={"help": "samples per batch on each rank"})
    num_workers: int = field(default=4, metadata={
        "help": "DataLoader worker processes per rank (0: the main process). Part of the data order: shards are dealt "
                "to ranks x workers, so a run resumes only with the count it saved (hence a fixed default rather than "
                "one read from the machine). Give the workers the cores the training step leaves: one decodes about "
                "3000 small JPEGs/s; the demo configs use 1 per rank on 2 cores"})
    persistent_workers: bool = field(default=True, metadata={"help": "keep workers alive between epochs"})
    prefetch_factor: int = field(default=2, metadata={"help": "batches each worker prepares ahead"})
    shard_shuffle: bool = field(default=True, metadata={"help": "shuffle the shard order each epoch (training)"})
    shuffle_buffer: int = field(default=2000, metadata={
        "help": "samples each worker keeps to shuffle from (training; 0 turns sample shuffling off)"})
    resampled: bool = field(default=False, metadata={
        "help": "draw shards with replacement (weighted by source) for a fixed samples_per_epoch"})
    samples_per_epoch: int | None = field(default=None, metadata={
        "help": "samples in one epoch over all ranks (resampled mode; rounded up to whole batches per worker)"})
    drop_last: bool = field(default=True, metadata={
        "help": "training: drop each worker's last incomplete batch (evaluation keeps it)"})
    seed: int = field(default=0, metadata={"help": "seeds shard order, shuffle buffer and augmentation per epoch"})
    max_consecutive_skips: int = field(default=10000, metadata={
        "help": "a worker stops with an error after this many unusable samples/shards in a row"})
    image: ImageConfig = field(default_factory=ImageConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def validate(self, path: str) -> None:
        if not self.sources:
            raise ConfigError(f"{path}.sources: at least one source is needed")
        for name in ("batch_size", "prefetch_factor", "max_consecutive_skips"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("num_workers", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.resampled:
            if self.samples_per_epoch is None or self.samples_per_epoch <= 0:
                raise ConfigError(f"{path}.samples_per_epoch: resampled mode needs a positive number of samples")
        else:
            if self.samples_per_epoch is not None:
                raise ConfigError(f"{path}.samples_per_epoch: only used with resampled: true (an epoch is one pass)")
            weighted = [i for i, s in enumerate(self.sources) if s.weight != 1.0]
            if weighted:
                raise ConfigError(f"{path}.sources[{weighted[0]}].weight: weights need resampled: true "
                                  f"(a non-resampled epoch reads every shard once)")
