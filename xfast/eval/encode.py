"""Glue between a model, its tokenizer, evaluation batches and the metric functions.

The model is anything with `.modality` ("image" | "audio") and the ContrastiveModel encoders
`encode_text(input_ids, attention_mask)`, `encode_image(pixel_values)`,
`encode_audio(features)`; the tokenizer is a Hugging Face tokenizer. Batches are the dicts of
xfast.data's evaluation loader: "pixel_values" or "input_features" (see xfast.modalities), "captions"
(list[list[str]]), a label key and "__key__".
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from xfast.modalities import MEDIA_INPUT, media_input

LABEL_KEYS = ("label", "labels", "tag", "tags")
TEXT_SPACES = {"joint": "encode_text", "sentence": "sentence_embedding"}


def model_device(model) -> torch.device:
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


def model_modality(model) -> str:
    modality = getattr(model, "modality", None)
    if modality not in MEDIA_INPUT:
        raise ValueError(f"model.modality must be 'image' or 'audio', got {modality!r}")
    return modality


def _check_output(what: str, emb, rows: int) -> torch.Tensor:
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != rows:
        got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise ValueError(f"{what} returned {got}, expected a [{rows}, dim] tensor")
    return emb.detach().float().cpu()


@torch.no_grad()
def encode_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    space: str = "joint",
    progress: bool = False,
) -> torch.Tensor:
    """[len(texts), D] float32 CPU embeddings, pooled as the text tower pools.

    space="joint": `model.encode_text` (the shared cross-modal space, L2-normalised);
    space="sentence": `model.sentence_embedding` (the language encoder's own pooled output
    before projection, what STS and SimCSE evaluate).
    Texts are tokenised `batch_size` at a time (padded to the longest, truncated to
    `max_length`, default the tokenizer's model_max_length).
    """
    if isinstance(texts, str) or not texts:
        raise ValueError(f"texts must be a non-empty list of strings, got {texts!r}")
    if space not in TEXT_SPACES:
        raise ValueError(f"space must be one of {TEXT_SPACES}, got {space!r}")
    encode = getattr(model, TEXT_SPACES[space], None)
    if encode is None:
        raise ValueError(f"space={space!r} needs model.{TEXT_SPACES[space]}(input_ids, attention_mask)")
    device = model_device(model)
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="texts", disable=not progress):
        chunk = list(texts[start : start + batch_size])
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        emb = encode(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        out.append(_check_output(f"model.{TEXT_SPACES[space]}", emb, len(chunk)))
    return torch.cat(out)


@torch.no_grad()
def encode_media(model, batch: dict) -> torch.Tensor:
    """[B, D] float32 CPU embeddings of a batch's images or audio."""
    modality = model_modality(model)
    x = media_input(batch, modality).to(model_device(model))
    emb = model.encode_image(x) if modality == "image" else model.encode_audio(x)
    return _check_output(f"model.encode_{modality}", emb, x.shape[0])


@dataclass
class EvalSet:
    """Embeddings of a held-out split: media [N, D], captions [T, D] with their item index
    text_to_media [T], and per-item labels (raw, as the batches carried them) and keys."""

    media_emb: torch.Tensor
    text_emb: torch.Tensor | None
    text_to_media: torch.Tensor | None
    labels: list = field(default_factory=list)
    keys: list[str] = field(default_factory=list)


def _as_list(value, n: int, key: str) -> list:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"batch[{key!r}] must hold one entry per item ({n})")
    return list(value)


def embed_eval_set(
    model,
    tokenizer,
    batches: Iterable[dict],
    *,
    captions: bool = True,
    label_key: str | None = None,
    labels: bool = False,
    batch_size: int = 64,
    max_items: int | None = None,
    progress: bool = False,
) -> EvalSet:
    """Encode every batch's media, then all captions (several per item) in text batches.

    With labels=True each item's label is read from `label_key` (default: the first of
    LABEL_KEYS a batch has). max_items stops after that many items (the rest of the last
    batch is dropped).
    """
    media, texts, owner, raw_labels, keys = [], [], [], [], []
    for batch in tqdm(batches, desc="media", disable=not progress):
        first = len(keys)
        if max_items is not None:
            if first >= max_items:
                break
            batch = _head(batch, max_items - first)
        emb = encode_media(model, batch)
        n = emb.shape[0]
        media.append(emb)
        keys.extend(str(k) for k in batch.get("__key__", range(first, first + n)))
        if captions:
            if "captions" not in batch:
                raise ValueError(f"retrieval needs batch['captions'] (list of caption lists), got keys {sorted(batch)}")
            for i, item_captions in enumerate(_as_list(batch["captions"], n, "captions")):
                if isinstance(item_captions, str):
                    item_captions = [item_captions]
                if not item_captions:
                    raise ValueError(f"item {keys[first + i]!r} has no caption")
                texts.extend(item_captions)
                owner.extend([first + i] * len(item_captions))
        if labels:
            key = label_key or next((k for k in LABEL_KEYS if k in batch), None)
            if key is None or key not in batch:
                wanted = repr(label_key) if label_key else f"one of {LABEL_KEYS}"
                raise ValueError(f"zero-shot needs labels in batch[{wanted}], got keys {sorted(batch)}")
            raw_labels.extend(_as_list(batch[key], n, key))
    if not media:
        raise ValueError("the evaluation data yielded no batches")
    text_emb = encode_texts(model, tokenizer, texts, batch_size=batch_size, progress=progress) if captions else None
    return EvalSet(
        torch.cat(media),
        text_emb,
        torch.tensor(owner, dtype=torch.int64) if captions else None,
        raw_labels,
        keys,
    )


def _head(batch: dict, n: int) -> dict:
    """The first n items of a batch (tensors and per-item lists are sliced)."""
    return {k: v[:n] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in batch.items()}


def _normalise_name(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def labels_to_indices(raw_labels: Sequence, classnames: Sequence[str]) -> torch.Tensor:
    """Class indices of raw labels: an int is an index, a string a class name (matched exactly,
    else ignoring case, underscores and repeated spaces, else a string of digits is an index, as
    xfast.data reads numeric .json tags as strings), a one-element list its element."""
    exact = {name: i for i, name in enumerate(classnames)}
    loose = {_normalise_name(name): i for i, name in enumerate(classnames)}
    out = []
    for item, label in enumerate(raw_labels):
        if isinstance(label, (list, tuple)):
            if len(label) != 1:
                raise ValueError(f"item {item} has {len(label)} labels {label!r}; zero-shot classification needs exactly one")
            label = label[0]
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise ValueError(f"item {item} has label {label!r}; expected a class index or a class name")
        if isinstance(label, int):
            if not 0 <= label < len(classnames):
                raise ValueError(f"item {item} has class index {label}, outside the {len(classnames)} class names")
            out.append(label)
        elif label in exact:
            out.append(exact[label])
        elif _normalise_name(label) in loose:
            out.append(loose[_normalise_name(label)])
        elif label.strip().isdigit() and int(label) < len(classnames):
            out.append(int(label))
        else:
            raise ValueError(f"item {item} has label {label!r}, which is not among the class names ({len(classnames)} given)")
    return torch.tensor(out, dtype=torch.int64)


def classnames_from_labels(raw_labels: Sequence) -> list[str]:
    """Sorted distinct string labels: the class list when no --classnames is given."""
    names = set()
    for label in raw_labels:
        label = label[0] if isinstance(label, (list, tuple)) and len(label) == 1 else label
        if not isinstance(label, str):
            raise ValueError(f"labels are not class names (found {label!r}): give the class names explicitly")
        names.add(label)
    return sorted(names)


NAME_COLUMNS = ("display_name", "classname", "class_name", "name", "category", "class", "label")


def read_classnames(spec: str | Sequence[str]) -> list[str]:
    """Class names from a list, or a file: .json (a list, or {name: index} as LAION-CLAP's
    class_labels json), .csv (a display_name/classname/name/category/class/label column, ordered
    by an "index" column when there is one, as AudioSet's class_labels_indices.csv), or text
    with one name a line."""
    if not isinstance(spec, str):
        return list(spec)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"classnames file {spec!r} does not exist")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return [name for name, _ in sorted(data.items(), key=lambda kv: kv[1])]
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            return data
        raise ValueError(f"classnames file {spec!r}: expected a JSON list of names or a {{name: index}} object")
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError(f"classnames file {spec!r} has no rows")
        column = next((c for c in NAME_COLUMNS if c in rows[0]), None)
        if column is None:
            raise ValueError(f"classnames file {spec!r}: no column named one of {NAME_COLUMNS}, got {list(rows[0])}")
        if "index" in rows[0]:
            rows.sort(key=lambda r: int(r["index"]))
        return [r[column] for r in rows]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


KEY_COLUMNS = ("__key__", "key", "filename", "file", "path", "id", "ytid")
LABEL_COLUMNS = ("label", "category", "class", "tag", "target")


def read_label_csv(path: str) -> dict[str, str]:
    """{sample key: label} from a CSV with a key column (one of KEY_COLUMNS; file names also
    match by stem, so ESC-50's esc50.csv works as is) and a label column (LABEL_COLUMNS)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"labels CSV {path!r} does not exist")
    with p.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"labels CSV {path!r} has no rows")
    key_col = next((c for c in KEY_COLUMNS if c in rows[0]), None)
    label_col = next((c for c in LABEL_COLUMNS if c in rows[0]), None)
    if key_col is None or label_col is None:
        raise ValueError(f"labels CSV {path!r} needs a key column {KEY_COLUMNS} and a label column {LABEL_COLUMNS}, got {list(rows[0])}")
    table = {}
    for row in rows:
        label = row[label_col]
        table[row[key_col]] = int(label) if label.strip().lstrip("-").isdigit() else label
        table.setdefault(Path(row[key_col]).stem, table[row[key_col]])
    return table


def labels_from_csv(keys: Sequence[str], table: dict) -> list:
    missing = [k for k in keys if k not in table and Path(k).name not in table]
    if missing:
        raise ValueError(f"{len(missing)} sample key(s) are not in the labels CSV, e.g. {missing[0]!r}")
    return [table[k] if k in table else table[Path(k).name] for k in keys]
