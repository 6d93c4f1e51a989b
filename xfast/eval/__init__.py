"""Evaluation and representation analysis of contrastive cross-modal checkpoints.

Metric functions work on embedding tensors (usable in notebooks); `evaluate` runs configured
tasks on a model (the trainer's periodic hook); `xfast eval` (xfast.eval.cli) is the command
line and xfast.eval.plots draws the figures.
"""
from xfast.eval.encode import EvalSet, embed_eval_set, encode_media, encode_texts
from xfast.eval.geometry import alignment, consistency_gaps, geometry_metrics, uniformity
from xfast.eval.retrieval import RetrievalRanks, recall_at, retrieval_metrics, retrieval_ranks
from xfast.eval.runner import evaluate, parse_task, run_task
from xfast.eval.sts import read_sts_file, sts_correlation
from xfast.eval.zeroshot import average_prompts, build_class_embeddings, zeroshot_classify

__all__ = [
    "alignment",
    "average_prompts",
    "build_class_embeddings",
    "consistency_gaps",
    "embed_eval_set",
    "encode_media",
    "encode_texts",
    "evaluate",
    "EvalSet",
    "geometry_metrics",
    "parse_task",
    "read_sts_file",
    "recall_at",
    "retrieval_metrics",
    "retrieval_ranks",
    "RetrievalRanks",
    "run_task",
    "sts_correlation",
    "uniformity",
    "zeroshot_classify",
]
