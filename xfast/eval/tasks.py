"""Evaluation task configs (the "eval.tasks" entries of a run, `xfast eval --task`), importable
without torch so that `xfast train --check` validates them in a fraction of a second."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from xfast.config import ConfigError, parse

STS_SUFFIXES = (".tsv", ".csv", ".txt")


@dataclass
class ZeroShotTask:
    data: str = field(metadata={"help": "evaluation shards (pattern/list/dir) whose samples carry a label"})
    classnames: list[str] | str | None = field(default=None, metadata={
        "help": "class names in label-index order, or a file (.txt one a line, .json, .csv); default: the sorted "
                "distinct string labels"})
    templates: list[str] | None = field(default=None, metadata={
        "help": "prompt templates with '{}' for the class name; default 'a photo of a {}.' (image) or "
                "'This is a sound of {}.' (audio)"})
    label_key: str | None = field(default=None, metadata={
        "help": "field of each sample's .json holding its label (default: the data's text.tag_field, 'tag')"})
    labels_csv: str | None = field(default=None, metadata={
        "help": "CSV mapping sample keys to labels (used instead of labels in the shards)"})
    ks: list[int] = field(default_factory=lambda: [1, 5], metadata={"help": "top-k accuracies to report"})


@dataclass
class RetrievalTask:
    data: str = field(metadata={"help": "evaluation shards with all captions of each item"})
    ks: list[int] = field(default_factory=lambda: [1, 5, 10], metadata={"help": "recall cut-offs"})
    map_k: int = field(default=10, metadata={"help": "cut-off of mAP"})


TEXT_SPACE_HELP = ("text embeddings compared: 'sentence' = the language encoder's pooled output before "
                   "projection (model.sentence_embedding), 'joint' = the shared space (model.encode_text)")


@dataclass
class STSTask:
    data: str = field(metadata={"help": "TSV/CSV of sentence1, sentence2, score (STS-B / SICK-R layout)"})
    space: Literal["sentence", "joint"] = field(default="sentence", metadata={"help": TEXT_SPACE_HELP})


@dataclass
class GeometryTask:
    data: str = field(metadata={
        "help": "evaluation shards (media + captions), or an STS file (.tsv/.csv/.txt) for the text space alone"})
    sts_positive_threshold: float = field(default=4.0, metadata={
        "help": "STS file: pairs scoring at least this are the positives of text alignment (SimCSE's analysis)"})
    space: Literal["sentence", "joint"] = field(default="sentence", metadata={
        "help": f"STS file only: {TEXT_SPACE_HELP} (shards always use the joint space)"})


TASKS: dict[str, type] = {"zeroshot": ZeroShotTask, "retrieval": RetrievalTask, "sts": STSTask, "geometry": GeometryTask}


def parse_task(raw: dict, path: str):
    """A task dataclass from {"task": kind, ...options}; ConfigError names the bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected an object with a 'task' key, got {type(raw).__name__}")
    options = dict(raw)
    kind = options.pop("task", None)
    if kind not in TASKS:
        raise ConfigError(f"{path}.task: {kind!r} is not a task; choose one of {', '.join(map(repr, TASKS))}")
    task = parse(TASKS[kind], options, path)
    if isinstance(task, ZeroShotTask) and task.templates is not None:
        try:
            check_templates(task.templates)
        except ValueError as err:
            raise ConfigError(f"{path}.templates: {err}") from None
    return task


def check_templates(templates: Sequence[str]) -> list[str]:
    if isinstance(templates, str) or not templates:
        raise ValueError(f"templates must be a non-empty list of strings, got {templates!r}")
    for template in templates:
        if not isinstance(template, str) or "{}" not in template:
            raise ValueError(f"every template needs a '{{}}' where the class name goes, got {template!r}")
    return list(templates)
