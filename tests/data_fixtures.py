"""Small media, shards and a tokenizer made on the fly for the data pipeline tests."""
from __future__ import annotations

import functools
import io
import json
import os
import tarfile

import numpy as np
import soundfile
from PIL import Image

WORDS = "a an the dog cat bird car rain sea wind bell runs sits sings drives falls roars rings on in under " \
        "red blue green small big loud quiet photo sound of near grass road".split()


@functools.lru_cache(maxsize=None)
def make_tokenizer():
    """A WordLevel fast tokenizer over WORDS, built offline, with [PAD] as pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def caption(i: int) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, size=4))


def image_bytes(width: int = 40, height: int = 30, seed: int = 0, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1)
    noise = rng.integers(0, 32, size=base.shape)
    image = Image.fromarray(((base + noise) % 256).astype(np.uint8)).convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def audio_bytes(seconds: float = 0.5, rate: int = 16000, fmt: str = "FLAC", channels: int = 1, seed: int = 0) -> bytes:
    """A sine sweep (plus a little noise), `channels` channels, encoded as `fmt`."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 200 + 50 * seed
    wave = 0.5 * np.sin(2 * np.pi * (f0 * t + 400 * t * t))
    wave = wave + 0.01 * np.random.default_rng(seed).standard_normal(wave.shape)
    data = np.stack([wave * (c + 1) / channels for c in range(channels)], -1).astype(np.float32)
    out = io.BytesIO()
    soundfile.write(out, data, rate, format=fmt)
    return out.getvalue()


def write_tar(path, samples: list[dict], cut_bytes: int | None = None) -> str:
    """Write samples ({"__key__": k, ext: bytes|str|dict}) as a WebDataset tar; optionally cut it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for sample in samples:
            for ext, value in sample.items():
                if ext == "__key__":
                    continue
                if isinstance(value, (dict, list)):
                    value = json.dumps(value)
                if isinstance(value, str):
                    value = value.encode()
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(value)
                archive.addfile(info, io.BytesIO(value))
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data if cut_bytes is None else data[:cut_bytes])
    return str(path)


def image_samples(start: int, count: int, size=(40, 30)) -> list[dict]:
    return [{"__key__": f"{i:06d}", "jpg": image_bytes(*size, seed=i), "txt": caption(i),
             "json": {"caption": caption(i), "key": f"{i:06d}"}} for i in range(start, start + count)]


def audio_samples(start: int, count: int, seconds: float = 0.3, fmt: str = "FLAC") -> list[dict]:
    ext = {"FLAC": "flac", "WAV": "wav", "OGG": "ogg", "MP3": "mp3"}[fmt]
    return [{"__key__": f"{i:06d}", ext: audio_bytes(seconds, seed=i % 7, fmt=fmt),
             "json": {"text": [caption(i), caption(i + 1000)], "tag": [f"class{i % 3}"]}}
            for i in range(start, start + count)]


def write_shards(directory, per_shard: list[int], make=image_samples, sizes_json: bool = True) -> str:
    """Shards shards-0000.tar ... with the given sample counts; returns the brace pattern."""
    os.makedirs(directory, exist_ok=True)
    start = 0
    sizes = {}
    for shard, count in enumerate(per_shard):
        name = f"shards-{shard:04d}.tar"
        write_tar(os.path.join(directory, name), make(start, count))
        sizes[name] = count
        start += count
    if sizes_json:
        with open(os.path.join(directory, "sizes.json"), "w") as f:
            json.dump(sizes, f)
    return os.path.join(str(directory), f"shards-{{0000..{len(per_shard) - 1:04d}}}.tar")


def data_config(urls, modality="image", **overrides):
    """A parsed DataConfig with small sizes for tests."""
    from xfast.config import parse
    from xfast.data import DataConfig

    raw = {"sources": [{"urls": urls}], "modality": modality, "batch_size": 4, "num_workers": 0,
           "shuffle_buffer": 8, "image": {"size": 16},
           "audio": {"sample_rate": 16000, "duration_s": 0.25, "n_fft": 256, "hop_length": 128, "n_mels": 16,
                     "fmin": 0.0, "fmax": 8000.0},
           "text": {"max_length": 8}}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return parse(DataConfig, raw, "data")


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch["__key__"]]
