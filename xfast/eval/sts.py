"""Semantic textual similarity: correlation between cosine similarity and gold scores.

Files follow the STS-B (GLUE tsv: columns sentence1, sentence2, score) and SICK-R (sentence_A,
sentence_B, relatedness_score) layouts; see `read_sts_file`.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from xfast.eval._checks import check_matrix, check_same_device, unit_rows

FIRST_COLUMNS = ("sentence1", "sentence_a", "sentence 1", "s1", "text1", "text_a")
SECOND_COLUMNS = ("sentence2", "sentence_b", "sentence 2", "s2", "text2", "text_b")
SCORE_COLUMNS = ("score", "relatedness_score", "similarity", "gold", "label")


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, tied values sharing the mean of their ranks (scipy's 'average')."""
    values, order = x.sort(stable=True)
    n = values.numel()
    starts_group = torch.ones(n, dtype=torch.bool, device=x.device)
    starts_group[1:] = values[1:] != values[:-1]
    group = torch.cumsum(starts_group.long(), 0) - 1
    size = torch.bincount(group).to(torch.float64)
    first = torch.cumsum(size, 0) - size
    ranks = torch.empty(n, dtype=torch.float64, device=x.device)
    ranks[order] = (first + (size + 1) / 2)[group]
    return ranks


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation in float64; NaN when either input is constant (undefined)."""
    if bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return math.nan
    x = x.to(torch.float64) - x.to(torch.float64).mean()
    y = y.to(torch.float64) - y.to(torch.float64).mean()
    denom = x.norm() * y.norm()
    return float(((x * y).sum() / denom).clamp(-1.0, 1.0))


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman correlation: Pearson correlation of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


def check_gold(gold, n: int, device: torch.device) -> torch.Tensor:
    try:
        gold = torch.as_tensor(gold, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"gold must be a 1-D sequence of numbers: {err}") from None
    if gold.dim() != 1 or gold.numel() != n:
        raise ValueError(f"gold must hold one score per pair ({n}), got shape {tuple(gold.shape)}")
    if not bool(torch.isfinite(gold).all()):
        raise ValueError("gold contains NaN or inf")
    if n and bool((gold == gold[0]).all()):
        raise ValueError("gold scores are all equal, so no correlation is defined")
    return gold.to(device)


def sts_correlation(emb1: torch.Tensor, emb2: torch.Tensor, gold) -> dict[str, float]:
    """Spearman and Pearson correlation between cos(emb1[i], emb2[i]) and gold[i].

    Needs at least 2 pairs. Spearman uses average ranks for ties. If every cosine is equal (a
    collapsed encoder) both correlations are NaN; constant gold scores are an input error.
    Returns {"spearman", "pearson", "pairs"}.
    """
    check_matrix("emb1", emb1, min_rows=2)
    check_matrix("emb2", emb2, dim=emb1.shape[1])
    check_same_device(("emb1", "emb2"), (emb1, emb2))
    if emb2.shape[0] != emb1.shape[0]:
        raise ValueError(f"emb2 has {emb2.shape[0]} rows but emb1 has {emb1.shape[0]}: they must be paired row by row")
    gold = check_gold(gold, emb1.shape[0], emb1.device)
    cosine = (unit_rows("emb1", emb1, torch.float64) * unit_rows("emb2", emb2, torch.float64)).sum(1)
    return {"spearman": spearman(cosine, gold), "pearson": pearson(cosine, gold), "pairs": float(emb1.shape[0])}


def _pick(header: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def read_sts_file(path: str | Path) -> tuple[list[str], list[str], list[float]]:
    """(sentences1, sentences2, scores) from a TSV/CSV file.

    With a header, columns are found by name (case-insensitive): first sentence in one of
    FIRST_COLUMNS, second in SECOND_COLUMNS, score in SCORE_COLUMNS; other columns are ignored
    (the GLUE STS-B tsv and SICK.txt load as they are). Without a header the file must have
    exactly three columns: sentence1, sentence2, score. Tab-separated when the first line holds a
    tab, else comma-separated; tab files are read without quote processing (STS-B sentences
    contain bare quotes). Rows with an empty score (unlabelled test sets) are an error.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"STS file {str(path)!r} does not exist")
    with path.open(newline="", encoding="utf-8") as f:
        text = f.read()
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"STS file {str(path)!r} is empty")
    if "\t" in lines[0]:
        rows = list(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
    else:
        rows = list(csv.reader(lines))
    numbered = [(line_no, r) for line_no, r in enumerate(rows, start=1) if any(cell.strip() for cell in r)]
    header = numbered[0][1]
    cols = (_pick(header, FIRST_COLUMNS), _pick(header, SECOND_COLUMNS), _pick(header, SCORE_COLUMNS))
    if all(c is not None for c in cols):
        body = numbered[1:]
    elif len(header) == 3:
        cols, body = (0, 1, 2), numbered
    else:
        raise ValueError(
            f"STS file {str(path)!r}: cannot find the columns; give a header naming them "
            f"(first sentence: {'/'.join(FIRST_COLUMNS)}; second: {'/'.join(SECOND_COLUMNS)}; "
            f"score: {'/'.join(SCORE_COLUMNS)}) or use exactly 3 columns; the first row is {header!r}"
        )
    s1, s2, scores = [], [], []
    for line_no, row in body:
        if len(row) <= max(cols):
            raise ValueError(f"STS file {str(path)!r} line {line_no}: expected at least {max(cols) + 1} columns, got {len(row)}")
        try:
            score = float(row[cols[2]])
        except ValueError:
            raise ValueError(f"STS file {str(path)!r} line {line_no}: score {row[cols[2]]!r} is not a number") from None
        if not math.isfinite(score):
            raise ValueError(f"STS file {str(path)!r} line {line_no}: score {row[cols[2]]!r} is not finite")
        s1.append(row[cols[0]])
        s2.append(row[cols[1]])
        scores.append(score)
    if not scores:
        raise ValueError(f"STS file {str(path)!r} has a header but no pairs")
    return s1, s2, scores
