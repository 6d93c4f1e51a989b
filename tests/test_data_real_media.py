"""Real public media (CC0 animal recordings in MP3, real photos) through the data path: every
file decodes from bytes as from its path, crops stay inside the real audio, the log-mel matches
HF's ClapFeatureExtractor, and `xfast shards` keeps every file. See media_corpus.py for the files."""
import csv
import io
import math

import numpy as np
import pytest
import soundfile
import soxr
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from tests.data_fixtures import data_config
from tests.media_corpus import PHOTOS, SOUNDS, sklearn_photos, wheel_files
from tests.test_data_audio_io import window_start
from tests.test_data_transforms import float32_rounding_bound, float32_stft_bound
from xfast.config import parse
from xfast.data import build_loader
from xfast.data.audio import AudioTransform, LogMel, mel_filterbank, pad_or_trim
from xfast.data.audio_io import decode_audio
from xfast.data.config import AudioConfig, ImageConfig
from xfast.data.image import ImageTransform, center_crop_box
from xfast.data.shards import main as shards_main


@pytest.fixture(scope="module")
def clips():
    return wheel_files(*SOUNDS)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return wheel_files(*PHOTOS) + sklearn_photos(tmp_path_factory.mktemp("sklearn"))


def read_path(path, frames: int = -1) -> tuple[np.ndarray, int]:
    return soundfile.read(str(path), frames=frames, dtype="float32", always_2d=True)


def test_every_clip_decodes_from_bytes_as_from_its_path(clips):
    for path in clips:
        ref, rate = read_path(path)
        wave, got_rate = decode_audio(path.read_bytes(), "mp3")
        assert got_rate == rate, path.name
        np.testing.assert_array_equal(wave, ref, err_msg=path.name)  # bit-identical, length included


def test_evaluation_clip_equals_the_same_steps_from_the_path(clips):
    cfg = parse(AudioConfig, {}, "audio")  # laion_clap: 10 s at 48 kHz
    transform = AudioTransform(cfg, train=False)
    for path in clips:
        out = transform(path.read_bytes(), None, "mp3")
        rate = soundfile.info(str(path)).samplerate
        wave = read_path(path, math.ceil(cfg.num_samples * rate / cfg.sample_rate) + 1)[0].mean(axis=1)
        if rate != cfg.sample_rate:
            wave = soxr.resample(wave, rate, cfg.sample_rate)
        np.testing.assert_array_equal(out, pad_or_trim(wave, cfg.num_samples, cfg.padding), err_msg=path.name)


def test_training_crops_stay_inside_the_audio_that_decodes(clips):
    """A crop that the header's frame count has room for but the decoded audio hardly has (three of
    the clips' headers count up to 2320 frames more than decode): every crop is a window of the
    decoded audio, never padded past its end."""
    for path in clips:
        ref, rate = read_path(path)
        mono = ref.mean(axis=1)
        num_samples = mono.shape[0] - 40  # at the file's rate: no resampling, so windows compare
        cfg = parse(AudioConfig, {"sample_rate": rate, "duration_s": num_samples / rate, "n_fft": 256,
                                  "hop_length": 128, "n_mels": 16, "fmin": 0.0, "fmax": rate / 2}, "audio")
        assert cfg.num_samples == num_samples
        data = path.read_bytes()
        for seed in range(3):
            crop = AudioTransform(cfg, train=True)(data, np.random.default_rng(seed), "mp3")
            assert 0 <= window_start(mono, crop) <= 39, f"{path.name}, seed {seed}"


@pytest.mark.slow
def test_logmel_matches_clap_feature_extractor_on_real_clips(clips):
    """float64: HF's values to float32 rounding. float32 (the default): within the float32 STFT's
    error bound of the exact values (measured worst case on these clips: 5.0e-3 dB)."""
    from transformers import ClapFeatureExtractor

    cfg = parse(AudioConfig, {"stft_dtype": "float64"}, "audio")
    extractor = ClapFeatureExtractor(frequency_min=50, truncation="rand_trunc", padding="repeatpad")
    exact, fast = LogMel(cfg), LogMel(parse(AudioConfig, {}, "audio"))
    filters = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax, dtype=torch.float64).numpy()
    for path in clips:
        wave, rate = decode_audio(path.read_bytes(), "mp3")
        wave = soxr.resample(wave.mean(axis=1), rate, cfg.sample_rate)  # all clips are under 10 s
        ref = extractor(wave, sampling_rate=cfg.sample_rate, return_tensors="np")["input_features"][0, 0]
        wave = pad_or_trim(wave, cfg.num_samples, cfg.padding)
        mine = exact.clip(wave)
        assert mine.shape == ref.shape == (cfg.num_frames, cfg.n_mels)
        assert np.all(np.abs(mine - ref) <= float32_rounding_bound(ref)), path.name
        frames = sliding_window_view(np.pad(wave.astype(np.float64), cfg.n_fft // 2, mode="reflect"),
                                     cfg.n_fft)[::cfg.hop_length] * exact.window
        mel = np.abs(np.fft.rfft(frames)) ** 2 @ filters
        assert np.all(np.abs(fast.clip(wave) - ref) <= float32_stft_bound(frames, filters, mel)), path.name


def write_table(path, files, captions) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        writer.writerows(zip(files, captions, strict=True))


def test_shards_of_real_clips_keep_every_clip(clips, tmp_path, tokenizer, capsys):
    table = tmp_path / "clips.csv"
    write_table(table, [p.name for p in clips], [f"the sound of a {p.stem}" for p in clips])
    out = tmp_path / "shards"
    assert shards_main([str(clips[0].parent), "--captions", str(table), "--out", str(out), "--shard-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "modality: audio (inferred from the files: 10 .mp3" in printed and "left" not in printed
    loader = build_loader(data_config(str(out), modality="audio"), tokenizer, train=False)
    captions = [c[0] for batch in loader for c in batch["captions"]]
    assert captions == [f"the sound of a {p.stem}" for p in clips]
    assert sum(loader.skip_counts().values()) == 0
    assert shards_main(["--check", str(out)]) == 0
    assert "3 shards, 10 samples" in capsys.readouterr().out


def test_every_photo_decodes_and_is_kept(photos, tmp_path, tokenizer, capsys):
    cfg = parse(ImageConfig, {"size": 64, "jpeg_draft": False}, "image")
    for path in photos:
        data = path.read_bytes()
        with Image.open(path) as image:
            from_path = np.asarray(image.convert("RGB"))
        with Image.open(io.BytesIO(data)) as image:
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), from_path, err_msg=path.name)
        out = ImageTransform(cfg, train=False)(data)
        reference = Image.fromarray(from_path).resize((64, 64), Image.Resampling.BICUBIC,
                                                      box=center_crop_box(*from_path.shape[1::-1]))
        np.testing.assert_array_equal(out, np.asarray(reference), err_msg=path.name)
        crop = ImageTransform(cfg, train=True)(data, np.random.default_rng(0))
        assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in photos:
        (folder / path.name).write_bytes(path.read_bytes())
    write_table(tmp_path / "photos.csv", [p.name for p in photos], [f"a photo: {p.stem}" for p in photos])
    assert shards_main([str(folder), "--captions", str(tmp_path / "photos.csv"), "--out", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {len(photos)} samples" in printed and "modality: image (inferred" in printed
    assert "left" not in printed
