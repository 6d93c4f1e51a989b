"""Per-modality sample processing (raw sample -> item) and batching (items -> batch dict).

`process` raises SampleSkipped for unusable samples; `collate` builds the batch layout the
models expect (see COMMON.md): tokenised text, normalised pixels, log-mel or waveforms.
Evaluation items keep all captions ("captions") and labels ("tags").
"""
from __future__ import annotations

import numpy as np
import torch

from xfast.data.audio import AUDIO_EXTENSIONS, AudioTransform, LogMel
from xfast.data.config import DataConfig
from xfast.data.image import IMAGE_EXTENSIONS, ImageNormalizer, ImageTransform, shared_empty
from xfast.data.skips import SampleSkipped
from xfast.data.text import Tokenize, find_captions, find_tags, nli_triplet, sentence
from xfast.data.transfer import build_shared


def _media(sample: dict, extensions: tuple[str, ...]) -> tuple[str, bytes]:
    """(extension, bytes) of the sample's first file with one of `extensions`."""
    for ext in extensions:
        if ext in sample:
            return ext, sample[ext]
    raise SampleSkipped("missing_media", f"no file with extension {'|'.join(extensions)}")


class _CaptionedMedia:
    """Shared caption handling of image and audio samples."""

    corrupt_kind = "corrupt_metadata"

    def __init__(self, cfg: DataConfig, tokenizer, train: bool):
        self.text = cfg.text
        self.train = train
        self.tokenize = Tokenize(tokenizer, cfg.text.max_length)

    def _caption_item(self, sample: dict, rng: np.random.Generator) -> dict:
        captions = find_captions(sample, self.text.caption_keys)
        if self.train:
            pick = int(rng.integers(len(captions))) if self.text.train_caption == "random" else 0
            return {"__key__": sample["__key__"], "text": captions[pick]}
        return {"__key__": sample["__key__"], "text": captions[0], "captions": captions,
                "tags": find_tags(sample, self.text.tag_field)}

    def _collate_text(self, items: list[dict]) -> dict:
        input_ids, attention_mask = self.tokenize([item["text"] for item in items])
        batch = {"__key__": [item["__key__"] for item in items], "input_ids": input_ids,
                 "attention_mask": attention_mask}
        if not self.train:
            batch["captions"] = [item["captions"] for item in items]
            if any(item["tags"] for item in items):
                batch["tags"] = [item["tags"] for item in items]
        return batch


class ImageCaptionProcessor(_CaptionedMedia):
    corrupt_kind = "corrupt_image"

    def __init__(self, cfg: DataConfig, tokenizer, train: bool):
        super().__init__(cfg, tokenizer, train)
        self.transform = ImageTransform(cfg.image, train)
        self.normalize = ImageNormalizer(cfg.image)

    def process(self, sample: dict, rng: np.random.Generator) -> dict:
        _, data = _media(sample, IMAGE_EXTENSIONS)
        item = self._caption_item(sample, rng)  # before decoding: a missing caption is cheap to find
        item["pixels"] = self.transform(data, rng)
        return item

    def collate(self, items: list[dict]) -> dict:
        batch = self._collate_text(items)
        pixels = np.stack([item["pixels"] for item in items])
        batch["pixel_values"] = self.normalize(pixels, shared=build_shared(batch, pixels.size * 4))  # float32
        return batch


class AudioCaptionProcessor(_CaptionedMedia):
    corrupt_kind = "corrupt_audio"

    def __init__(self, cfg: DataConfig, tokenizer, train: bool):
        super().__init__(cfg, tokenizer, train)
        self.transform = AudioTransform(cfg.audio, train)
        self.output = cfg.audio.output
        self.logmel = LogMel(cfg.audio) if self.output == "logmel" else None

    def process(self, sample: dict, rng: np.random.Generator) -> dict:
        ext, data = _media(sample, AUDIO_EXTENSIONS)
        item = self._caption_item(sample, rng)
        wave = self.transform(data, rng, ext)
        # The log-mel per clip, in the worker: batches then stack [frames, n_mels], not whole waveforms.
        item["audio"] = wave if self.logmel is None else self.logmel.clip(wave)
        return item

    def collate(self, items: list[dict]) -> dict:
        batch = self._collate_text(items)
        clips = [item["audio"] for item in items]
        dtype = np.result_type(*clips)
        if build_shared(batch, len(clips) * clips[0].size * dtype.itemsize):  # stacked into shared memory: sent without a copy
            dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
            audio = shared_empty((len(clips), *clips[0].shape), dtype)
            np.stack(clips, out=audio.numpy())
        else:
            audio = torch.from_numpy(np.stack(clips))
        if self.logmel is not None:
            batch["input_features"] = audio[:, None]  # [B, 1, frames, n_mels]
        else:
            batch["waveform"] = audio
        return batch


class SentenceProcessor:
    """Unsupervised SimCSE: one sentence per sample (the model encodes it twice)."""

    corrupt_kind = "corrupt_metadata"

    def __init__(self, cfg: DataConfig, tokenizer, train: bool):
        self.text = cfg.text
        self.tokenize = Tokenize(tokenizer, cfg.text.max_length)

    def process(self, sample: dict, rng: np.random.Generator) -> dict:
        return {"__key__": sample["__key__"], "text": sentence(sample, self.text)}

    def collate(self, items: list[dict]) -> dict:
        input_ids, attention_mask = self.tokenize([item["text"] for item in items])
        return {"__key__": [item["__key__"] for item in items], "input_ids": input_ids,
                "attention_mask": attention_mask}


class NLIProcessor:
    """Supervised SimCSE: anchor, positive (entailment) and hard negative (contradiction)."""

    corrupt_kind = "corrupt_metadata"
    roles = ("anchor", "positive", "negative")

    def __init__(self, cfg: DataConfig, tokenizer, train: bool):
        self.text = cfg.text
        self.tokenize = Tokenize(tokenizer, cfg.text.max_length)

    def process(self, sample: dict, rng: np.random.Generator) -> dict:
        return {"__key__": sample["__key__"], "texts": nli_triplet(sample, self.text)}

    def collate(self, items: list[dict]) -> dict:
        batch: dict = {"__key__": [item["__key__"] for item in items]}
        for i, role in enumerate(self.roles):
            input_ids, attention_mask = self.tokenize([item["texts"][i] for item in items])
            batch[f"{role}_input_ids"] = input_ids
            batch[f"{role}_attention_mask"] = attention_mask
        return batch


PROCESSORS = {"image": ImageCaptionProcessor, "audio": AudioCaptionProcessor,
              "text": SentenceProcessor, "nli": NLIProcessor}
