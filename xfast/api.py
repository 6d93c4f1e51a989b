"""Embeddings from a saved model in three lines:

    import xfast
    model = xfast.load("runs/my_clip/final")          # or a CLIPModel/ClapModel folder, an open_clip .pt
    text = model.encode_text(["a dog", "a cat"])      # [2, D], L2-normalised
    media = model.encode_image(["dog.jpg", pil_image])  # or encode_audio([array, "clip.flac"], sample_rate=...)
    probs = model.zeroshot(["dog.jpg"], ["dog", "cat"])  # [1, 2], rows sum to 1

The preprocessing is the one stored with the model (xfast_config.json "preprocessing": text
max_length, the image size / mean / std / filter or the audio front end), applied exactly as
xfast's evaluation pipeline applies it (centre crop; first clip_length seconds, padded).
"""
from __future__ import annotations

import functools
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from xfast.models.io import CONFIG_NAME


def load(path: str | os.PathLike, *, device: str | torch.device | None = None) -> "Embedder":
    """An Embedder for an xfast export (final/), a transformers CLIPModel/ClapModel folder, or an
    open_clip checkpoint file with its config JSON beside it."""
    from xfast.config import parse
    from xfast.models import ModelConfig, build_model, load_pretrained
    path = os.fspath(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        model = load_pretrained(path, map_location=device)
    else:
        from xfast.models.sources import read_source
        source = read_source(path)
        raw = {"init_from": path, "text": {}, source.modality: {}}
        model = build_model(parse(ModelConfig, raw, "model")).to(device)
    return Embedder(model)


class Embedder:
    """A ContrastiveModel in eval mode with its tokenizer and preprocessing (see the module docstring)."""

    def __init__(self, model):
        from xfast.models.io import resolve_preprocessing
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer; save it with one (model.text.tokenizer)")
        self.model = model.eval()
        self.tokenizer = model.tokenizer
        self.modality = model.modality
        self.preprocessing = resolve_preprocessing(model, model.preprocessing)
        self._device = next(model.parameters()).device

    @property
    def logit_scale(self) -> float:
        return float(self.model.scale().item())

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], *, batch_size: int = 64, normalize: bool = True) -> torch.Tensor:
        """[len(texts), embed_dim] float32 on CPU; texts are truncated to the stored max_length."""
        texts = _as_list(texts, "texts", str)
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                 max_length=self.preprocessing["text"]["max_length"], return_tensors="pt")
            out.append(self.model.encode_text(enc["input_ids"].to(self._device), enc["attention_mask"].to(self._device),
                                              normalized=normalize).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_image(self, images: Sequence, *, batch_size: int = 64, normalize: bool = True) -> torch.Tensor:
        """images: PIL images, file paths or encoded bytes; [len(images), embed_dim] float32 on CPU."""
        self._require("image")
        from xfast.config import parse
        from xfast.data.config import ImageConfig
        from xfast.data.image import ImageNormalizer, ImageTransform
        cfg = parse(ImageConfig, self.preprocessing["image"], "preprocessing.image")
        transform, normalizer = ImageTransform(cfg, train=False), ImageNormalizer(cfg)
        images = _as_list(images, "images", object)
        out = []
        for start in range(0, len(images), batch_size):
            pixels = np.stack([_decoded(transform, _image_bytes(x, i + start), f"images[{i + start}]")
                               for i, x in enumerate(images[start:start + batch_size])])
            out.append(self.model.encode_image(normalizer(pixels).to(self._device), normalized=normalize).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_audio(self, audios: Sequence, *, sample_rate: int | None = None, batch_size: int = 32,
                     normalize: bool = True) -> torch.Tensor:
        """audios: 1-D float waveforms at `sample_rate` (default: the model's), or file paths / bytes
        (decoded with soundfile, resampled); [len(audios), embed_dim] float32 on CPU."""
        self._require("audio")
        from xfast.config import parse
        from xfast.data.audio import AudioTransform, LogMel, pad_or_trim
        from xfast.data.config import AudioConfig
        if "audio" not in self.preprocessing:
            raise ValueError("this model stores no audio front end (xfast_config.json 'preprocessing.audio'); "
                             "re-export it with save_pretrained(..., preprocessing={'audio': {...}})")
        cfg = parse(AudioConfig, self.preprocessing["audio"], "preprocessing.audio")
        transform, logmel = AudioTransform(cfg, train=False), LogMel(cfg)
        rate = sample_rate or cfg.sample_rate
        audios = _as_list(audios, "audios", object)
        out = []
        for start in range(0, len(audios), batch_size):
            waves = []
            for i, x in enumerate(audios[start:start + batch_size]):
                if isinstance(x, (str, os.PathLike, bytes)):
                    data = x if isinstance(x, bytes) else Path(x).read_bytes()
                    ext = None if isinstance(x, bytes) else Path(x).suffix.lstrip(".").lower() or None
                    waves.append(_decoded(functools.partial(transform, ext=ext), data, f"audios[{start + i}]"))
                    continue
                wave = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
                if wave.ndim != 1 or wave.size == 0 or not np.isfinite(wave).all():
                    raise ValueError(f"audios[{start + i}]: expected a non-empty finite 1-D waveform, got shape "
                                     f"{wave.shape}")
                if rate != cfg.sample_rate:
                    import soxr
                    wave = soxr.resample(wave, rate, cfg.sample_rate).astype(np.float32)
                waves.append(pad_or_trim(wave, cfg.num_samples, cfg.padding))
            features = logmel(torch.from_numpy(np.stack(waves)))
            out.append(self.model.encode_audio(features.to(self._device), normalized=normalize).float().cpu())
        return torch.cat(out)

    def encode_media(self, media: Sequence, **kwargs) -> torch.Tensor:
        return (self.encode_image if self.modality == "image" else self.encode_audio)(media, **kwargs)

    @torch.no_grad()
    def zeroshot(self, media: Sequence, classnames: Sequence[str], templates: Sequence[str] | None = None,
                 **kwargs) -> torch.Tensor:
        """Class probabilities [len(media), len(classnames)]: softmax of logit_scale x cosine to each class
        embedding (the mean over `templates` of the normalised prompt embeddings, renormalised)."""
        from xfast.eval.zeroshot import build_class_embeddings, check_classnames, check_templates, default_templates
        classnames = check_classnames(list(classnames))
        templates = check_templates(list(templates) if templates is not None else list(default_templates(self.modality)))
        classes = build_class_embeddings(lambda texts: self.encode_text(texts), classnames, templates)
        emb = self.encode_media(media, **kwargs)
        return (self.logit_scale * emb @ classes.T).softmax(dim=-1)

    def _require(self, modality: str) -> None:
        if self.modality != modality:
            raise ValueError(f"this model embeds text and {self.modality}, not {modality}")


def _as_list(items, name: str, kind) -> list:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or len(items) == 0:
        raise ValueError(f"{name} must be a non-empty list, got {type(items).__name__}")
    if kind is str and not all(isinstance(t, str) for t in items):
        raise ValueError(f"{name}: every item must be a str")
    return list(items)


def _decoded(transform, data: bytes, name: str) -> np.ndarray:
    from xfast.data.skips import SampleSkipped
    try:
        return transform(data)
    except SampleSkipped as err:
        raise ValueError(f"{name}: cannot decode ({err})") from None


def _image_bytes(image, index: int) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    from PIL import Image
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # lossless: the transform then sees exactly these pixels
        return buffer.getvalue()
    raise ValueError(f"images[{index}]: expected a PIL image, a path or bytes, got {type(image).__name__}")
