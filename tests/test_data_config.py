import pytest

from xfast.config import ConfigError, describe, parse, to_dict
from xfast.data import DataConfig
from xfast.data.config import AUDIO_PRESETS, IMAGE_PRESETS


def _parse(**raw):
    return parse(DataConfig, {"sources": [{"urls": "x-{0..3}.tar"}], **raw}, "data")


def test_presets_fill_unset_keys():
    cfg = _parse()
    assert cfg.image.size == 224 and cfg.image.mean == IMAGE_PRESETS["clip"]["mean"]
    laion = AUDIO_PRESETS["laion_clap"]
    assert (cfg.audio.sample_rate, cfg.audio.duration_s, cfg.audio.n_fft, cfg.audio.hop_length, cfg.audio.n_mels,
            cfg.audio.fmin, cfg.audio.fmax) == (48000, 10.0, 1024, 480, 64, 50.0, 14000.0)
    assert cfg.audio.mel_scale == laion["mel_scale"] == "slaney"
    assert cfg.audio.num_samples == 480000 and cfg.audio.num_frames == 1001


def test_explicit_keys_override_preset_and_round_trip():
    cfg = _parse(image={"size": 336}, audio={"n_mels": 128, "output": "waveform"})
    assert cfg.image.size == 336 and cfg.image.std == IMAGE_PRESETS["clip"]["std"]
    assert cfg.audio.n_mels == 128 and cfg.audio.hop_length == 480 and cfg.audio.output == "waveform"
    assert parse(DataConfig, to_dict(cfg), "data") == cfg


@pytest.mark.parametrize("raw, message", [
    ({"resampled": True}, "data.samples_per_epoch"),
    ({"samples_per_epoch": 100}, "data.samples_per_epoch: only used with resampled"),
    ({"sources": [{"urls": "a.tar", "weight": 2.0}]}, "data.sources[0].weight: weights need resampled"),
    ({"sources": [{"urls": "a.tar", "weight": -1.0}], "resampled": True, "samples_per_epoch": 8},
     "data.sources[0].weight: must be > 0"),
    ({"sources": []}, "data.sources: at least one"),
    ({"batch_size": 0}, "data.batch_size"),
    ({"num_workers": -1}, "data.num_workers"),
    ({"modality": "video"}, "data.modality"),
    ({"shufle_buffer": 3}, "did you mean 'shuffle_buffer'"),
    ({"audio": {"fmax": 30000.0}}, "data.audio: need 0 <= fmin < fmax <= sample_rate/2"),
    ({"audio": {"n_mels": 600}}, "data.audio.n_mels"),
    ({"audio": {"preset": None, "sample_rate": 16000}}, "data.audio.duration_s: required when"),
    ({"audio": {"output": "mfcc"}}, "data.audio.output"),
    ({"image": {"mean": [0.5, 0.5]}}, "data.image.mean: expected 3 values"),
    ({"image": {"std": [1.0, 0.0, 1.0]}}, "data.image.std"),
    ({"image": {"train_crop_scale": [0.9, 1.5]}}, "data.image.train_crop_scale"),
    ({"text": {"caption_keys": ["caption"]}}, "data.text.caption_keys[0]"),
    ({"text": {"max_length": 1}}, "data.text.max_length"),
])
def test_impossible_configs_name_the_key(raw, message):
    if "sources" not in raw:
        raw = {"sources": [{"urls": "a.tar"}], **raw}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse(DataConfig, raw, "data")


def test_describe_documents_every_key():
    rows = describe(DataConfig, "data")
    keys = {row[0] for row in rows}
    assert {"data.sources", "data.audio.hop_length", "data.image.size", "data.text.max_length"} <= keys
    assert all(row[3] for row in rows), [row[0] for row in rows if not row[3]]
