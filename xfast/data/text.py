"""Captions, sentences and NLI triplets out of raw samples, and batch tokenisation."""
from __future__ import annotations

import json

import torch

from xfast.data.config import TextConfig
from xfast.data.skips import SampleSkipped


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SampleSkipped("corrupt_metadata", f"text is not UTF-8: {err}") from None


def sample_json(sample: dict) -> dict | None:
    """The sample's parsed .json (None without one); parsed once and cached in the sample."""
    if "__json__" not in sample:
        raw = sample.get("json")
        if raw is None:
            sample["__json__"] = None
        else:
            try:
                value = json.loads(_utf8(raw))
            except ValueError as err:
                raise SampleSkipped("corrupt_metadata", f"bad .json: {err}") from None
            if not isinstance(value, dict):
                raise SampleSkipped("corrupt_metadata", f".json holds a {type(value).__name__}, not an object")
            sample["__json__"] = value
    return sample["__json__"]


def _caption_list(value, where: str) -> list[str]:
    if isinstance(value, str):
        if not value.strip():
            raise SampleSkipped("missing_caption", f"empty caption in {where}")
        return [value.strip()]
    if isinstance(value, list):
        captions = [v.strip() for v in value if isinstance(v, str) and v.strip()]
        if not captions:
            raise SampleSkipped("empty_caption_list", f"no caption in the list {where}")
        return captions
    raise SampleSkipped("corrupt_metadata", f"{where} holds a {type(value).__name__}, not text")


def find_captions(sample: dict, caption_keys: list[str]) -> list[str]:
    """All captions of a sample from the first place in `caption_keys` that has them."""
    for place in caption_keys:
        if place == "txt":
            if "txt" in sample:
                return _caption_list(_utf8(sample["txt"]), ".txt")
            continue
        meta = sample_json(sample)
        field = place[len("json:"):]
        if meta is not None and field in meta:
            return _caption_list(meta[field], f".json field {field!r}")
    raise SampleSkipped("missing_caption", f"none of {caption_keys} present")


def find_tags(sample: dict, field: str) -> list[str]:
    """Labels of a sample (a string or a list in its .json), [] when it has none."""
    meta = sample_json(sample)
    if meta is None or field not in meta:
        return []
    value = meta[field]
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values]


def nli_triplet(sample: dict, cfg: TextConfig) -> list[str]:
    """[anchor, positive, hard negative] from a .json/.jsonl record or a CSV row."""
    if "csv" in sample:
        record, names = sample["csv"], cfg.nli_csv_columns
        if record is None:
            raise SampleSkipped("corrupt_metadata", "CSV row is not UTF-8 or does not parse")
    else:
        record, names = sample_json(sample), cfg.nli_fields
        if record is None:
            raise SampleSkipped("missing_text", "no .json record")
    texts = []
    for name in names:
        value = record.get(name)
        if not isinstance(value, str) or not value.strip():
            raise SampleSkipped("missing_text", f"field {name!r} missing or empty")
        texts.append(value.strip())
    return texts


def sentence(sample: dict, cfg: TextConfig) -> str:
    """One sentence for unsupervised training: a line of a text file or a shard's caption."""
    try:
        return find_captions(sample, cfg.caption_keys)[0]
    except SampleSkipped as skip:
        if skip.kind == "corrupt_metadata":
            raise
        raise SampleSkipped("missing_text", str(skip)) from None


class Tokenize:
    """list[str] -> (input_ids, attention_mask), Long [B, max_length], with an HF fast tokenizer.

    Calls the tokenizer's Rust backend directly (a copy of it, set to truncate and pad to
    max_length as the HF call with padding="max_length", truncation=True would): the same ids,
    without the per-sample Python dicts and list-to-tensor conversion of the HF call (about half
    of its time at batch 1024). Slow (Python) tokenizers go through the HF call.
    """

    def __init__(self, tokenizer, max_length: int):
        if tokenizer is None:
            raise ValueError("a tokenizer is needed: pass the text tower's HF tokenizer")
        if getattr(tokenizer, "pad_token", None) is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token; set tokenizer.pad_token")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.backend = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            from tokenizers import Tokenizer
            self.backend = Tokenizer.from_str(backend.to_str())
            self.backend.enable_truncation(max_length, direction=tokenizer.truncation_side)
            self.backend.enable_padding(direction=tokenizer.padding_side, pad_id=tokenizer.pad_token_id,
                                        pad_type_id=tokenizer.pad_token_type_id, pad_token=tokenizer.pad_token,
                                        length=max_length)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend is None:
            out = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            return out["input_ids"].long(), out["attention_mask"].long()
        encodings = self.backend.encode_batch_fast(texts)  # no character offsets: not needed here
        input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.long).view(len(texts), self.max_length)
        attention_mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return input_ids, attention_mask.view(len(texts), self.max_length)
