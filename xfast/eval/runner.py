"""Evaluation tasks on a model: what `xfast eval` and the trainer's periodic hook run.

A task is a dict with "task" (zeroshot | retrieval | sts | geometry), "data" and options; see
the dataclasses in xfast.eval.tasks (parsed strictly with xfast.config.parse, so unknown keys are errors).
`evaluate(model, tokenizer, {"clotho": {"task": "retrieval", "data": "clotho-test-{0..3}.tar"}})`
returns {"clotho/text_to_audio/R@1": ..., ...}.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xfast.config import parse
from xfast.eval.encode import (
    classnames_from_labels,
    embed_eval_set,
    encode_texts,
    labels_from_csv,
    labels_to_indices,
    model_modality,
    read_classnames,
    read_label_csv,
)
from xfast.eval.geometry import alignment, geometry_metrics, uniformity
from xfast.eval.retrieval import RetrievalRanks, retrieval_ranks, summarize_ranks
from xfast.eval.sts import read_sts_file, sts_correlation
from xfast.eval.tasks import STS_SUFFIXES, GeometryTask, RetrievalTask, STSTask, ZeroShotTask, parse_task
from xfast.eval.zeroshot import build_class_embeddings, default_templates, zeroshot_classify


@dataclass
class TaskResult:
    metrics: dict[str, float]
    ranks: RetrievalRanks | None = None


LoadBatches = Callable[..., Iterable[dict]]


def xfast_data_batches(data: str, *, modality: str, tokenizer, batch_size: int, data_config=None):
    """Evaluation batches from xfast.data.build_loader(train=False): one ordered pass over
    `data` with centre crops / clip starts, all captions in "captions", labels in "tags", the
    last partial batch kept. `data_config` is a "data" section (e.g. the training run's), typed
    (a DataConfig) or raw (a dict): its image/audio/text preprocessing and num_workers are
    reused; sources, modality and batching are set here."""
    from xfast.data import DataConfig, SourceConfig, build_loader

    settings = dict(modality=modality, batch_size=batch_size, shard_shuffle=False, shuffle_buffer=0,
                    persistent_workers=False)
    if isinstance(data_config, DataConfig):
        cfg = DataConfig(sources=[SourceConfig(urls=data)], image=data_config.image, audio=data_config.audio,
                         text=data_config.text, num_workers=data_config.num_workers, **settings)
        cfg.validate("data")
        return build_loader(cfg, tokenizer, train=False)
    raw = {k: v for k, v in (data_config or {}).items() if k in ("image", "audio", "text", "num_workers")}
    raw.update(sources=[{"urls": data}], **settings)
    raw.setdefault("num_workers", 0)
    return build_loader(parse(DataConfig, raw, "data"), tokenizer, train=False)


def _with_tag_field(data_config, field_name: str):
    """A copy of the data section (typed or raw) reading labels from the .json field `field_name`."""
    if dataclasses.is_dataclass(data_config):
        return dataclasses.replace(data_config, text=dataclasses.replace(data_config.text, tag_field=field_name))
    raw = dict(data_config or {})
    raw["text"] = {**raw.get("text", {}), "tag_field": field_name}
    return raw


def _text_max_length(data_config) -> int | None:
    if dataclasses.is_dataclass(data_config):
        return data_config.text.max_length
    return ((data_config or {}).get("text") or {}).get("max_length")


def run_task(
    model,
    tokenizer,
    task,
    *,
    batch_size: int = 64,
    block: int = 256,
    max_items: int | None = None,
    progress: bool = False,
    load_batches: LoadBatches = xfast_data_batches,
    data_config=None,
) -> TaskResult:
    """Run one task (a TASKS dataclass or its raw dict) in eval mode and return its metrics
    (and ranks for retrieval).

    load_batches(data, modality=, tokenizer=, batch_size=, data_config=) yields evaluation
    batches (default: xfast.data's evaluation loader); max_items caps the media items read.
    """
    if isinstance(task, dict):
        task = parse_task(task, "task")
    with eval_mode(model):
        return _run(model, tokenizer, task, batch_size=batch_size, block=block, max_items=max_items,
                    progress=progress, load_batches=load_batches, data_config=data_config)


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() inside (no dropout), the previous train/eval mode restored after."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if was_training and hasattr(model, "train"):
            model.train()


def _run(model, tokenizer, task, *, batch_size, block, max_items, progress, load_batches, data_config) -> TaskResult:
    def batches():
        raw = data_config
        if isinstance(task, ZeroShotTask) and task.label_key is not None:
            raw = _with_tag_field(data_config, task.label_key)
        return load_batches(task.data, modality=model_modality(model), tokenizer=tokenizer,
                            batch_size=batch_size, data_config=raw)

    # Texts are truncated where training truncated them, when the run's data section says.
    max_length = _text_max_length(data_config)

    def texts(sentences, space="joint"):
        return encode_texts(model, tokenizer, sentences, batch_size=batch_size, max_length=max_length,
                            space=space, progress=progress)

    if isinstance(task, STSTask) or (isinstance(task, GeometryTask) and Path(task.data).suffix in STS_SUFFIXES):
        s1, s2, gold = read_sts_file(task.data)
        unique = sorted(set(s1) | set(s2))
        emb = dict(zip(unique, texts(unique, task.space)))
        emb1 = torch.stack([emb[s] for s in s1])
        emb2 = torch.stack([emb[s] for s in s2])
        if isinstance(task, STSTask):
            return TaskResult(sts_correlation(emb1, emb2, gold))
        positive = [i for i, score in enumerate(gold) if score >= task.sts_positive_threshold]
        if not positive:
            raise ValueError(f"{task.data}: no pair scores >= sts_positive_threshold={task.sts_positive_threshold}")
        return TaskResult({
            "text/alignment": alignment(emb1[positive], emb2[positive]),
            "text/uniformity": uniformity(torch.stack(list(emb.values())), block=block),
        })

    modality = model_modality(model)
    if isinstance(task, ZeroShotTask):
        evalset = embed_eval_set(model, tokenizer, batches(), captions=False, labels=task.labels_csv is None,
                                 batch_size=batch_size, max_items=max_items,
                                 progress=progress)
        raw_labels = labels_from_csv(evalset.keys, read_label_csv(task.labels_csv)) if task.labels_csv else evalset.labels
        classnames = read_classnames(task.classnames) if task.classnames is not None else classnames_from_labels(raw_labels)
        labels = labels_to_indices(raw_labels, classnames)
        templates = task.templates or list(default_templates(modality))
        class_emb = build_class_embeddings(texts, classnames, templates, batch_size=batch_size)
        metrics = zeroshot_classify(evalset.media_emb, class_emb, labels, ks=task.ks, block=block)
        metrics["classes"] = float(len(classnames))
        return TaskResult(metrics)

    evalset = embed_eval_set(model, tokenizer, batches(), batch_size=batch_size, max_items=max_items,
                             progress=progress)
    if isinstance(task, RetrievalTask):
        ranks = retrieval_ranks(evalset.media_emb, evalset.text_emb, evalset.text_to_media, block=block, map_k=task.map_k)
        return TaskResult(summarize_ranks(ranks, ks=task.ks, media_name=modality), ranks)
    return TaskResult(geometry_metrics(evalset.media_emb, evalset.text_emb, evalset.text_to_media,
                                       block=block, media_name=modality))


def evaluate(
    model,
    tokenizer,
    tasks: dict[str, Any],
    *,
    batch_size: int = 64,
    block: int = 256,
    max_items: int | None = None,
    progress: bool = False,
    load_batches: LoadBatches = xfast_data_batches,
    data_config=None,
) -> dict[str, float]:
    """Run named tasks, e.g. {"esc50": {"task": "zeroshot", "data": ..., "classnames": ...}},
    and return one flat dict "{name}/{metric}" -> float (ready for a logger).

    The model is put in eval mode for the duration and its previous mode restored, so the
    trainer can call this between steps. Tasks are parsed before anything runs, so a bad config
    fails at once.
    """
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"tasks must be a non-empty dict of name -> task config, got {tasks!r}")
    parsed = {name: t if dataclasses.is_dataclass(t) else parse_task(t, f"eval.tasks.{name}") for name, t in tasks.items()}
    out: dict[str, float] = {}
    for name, task in parsed.items():
        result = run_task(model, tokenizer, task, batch_size=batch_size, block=block, max_items=max_items,
                          progress=progress, load_batches=load_batches, data_config=data_config)
        out.update({f"{name}/{key}": value for key, value in result.metrics.items()})
    return out
