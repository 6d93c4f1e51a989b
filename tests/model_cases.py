"""Builders shared by the tests/test_models_*.py files (tiny towers, batch 4); holds no tests."""
from __future__ import annotations

import torch

from xfast.config import parse
from xfast.models import ModelConfig, Objective, ObjectiveConfig, build_model, train_tokenizer

CAPTIONS = ["a dog runs in the park", "two cats sleep on a red sofa", "a bird sings on a branch",
            "children play football on the beach", "a man rides a bicycle down the street",
            "rain falls on the quiet city at night", "an old car parked near the river"]
MEDIA_TYPES = {"image": ("vit", "clip_vision"), "audio": ("htsat", "ast")}


def make_tokenizer(folder) -> str:
    train_tokenizer(CAPTIONS, 120, str(folder))
    return str(folder)


def model_cfg(tokenizer: str, *, text=None, media="image", media_type="vit", media_extra=None,
              embed_dim=16) -> ModelConfig:
    raw = {"text": {"type": "bert", "preset": "tiny", "tokenizer": tokenizer, **(text or {})},
           media: {"type": media_type, "preset": "tiny", **(media_extra or {})}, "embed_dim": embed_dim}
    return parse(ModelConfig, raw, "model")


def make_model(tokenizer: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return build_model(model_cfg(tokenizer, **kwargs))


def objective(raw: dict | None = None) -> Objective:
    return Objective(parse(ObjectiveConfig, raw or {}, "objective"))


def text_inputs(model, texts=None, length: int = 12) -> dict:
    enc = model.tokenizer(texts or CAPTIONS[:4], padding="max_length", truncation=True, max_length=length,
                          return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def media_inputs(model, batch: int = 4, frames: int | None = None) -> dict:
    req = model.data_requirements()
    if model.modality == "image":
        return {"pixel_values": torch.randn(batch, 3, req["image_size"], req["image_size"])}
    return {"input_features": torch.randn(batch, 1, frames or req["max_frames"], req["n_mels"])}


def paired_batch(model, **kwargs) -> dict:
    return {**text_inputs(model), **media_inputs(model, **kwargs)}


def nli_inputs(model) -> dict:
    out = {}
    for part, texts in (("anchor", CAPTIONS[:4]), ("positive", CAPTIONS[1:5]), ("negative", CAPTIONS[3:7])):
        enc = text_inputs(model, texts)
        out[f"{part}_input_ids"], out[f"{part}_attention_mask"] = enc["input_ids"], enc["attention_mask"]
    return out
