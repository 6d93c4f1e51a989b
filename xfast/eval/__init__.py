"""Evaluation and representation analysis of contrastive cross-modal checkpoints.

Metric functions work on embedding tensors (usable in notebooks); `evaluate` runs configured
tasks on a model (the trainer's periodic hook); `xfast eval` (xfast.eval.cli) is the command
line and xfast.eval.plots draws the figures.
"""
from xfast._lazy import lazy_exports

# Imported on first use, so that xfast.eval.tasks (the task configs) loads without torch.
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["EvalSet", "embed_eval_set", "encode_media", "encode_texts"], "xfast.eval.encode"),
    **dict.fromkeys(["alignment", "consistency_gaps", "geometry_metrics", "uniformity"], "xfast.eval.geometry"),
    **dict.fromkeys(["RetrievalRanks", "recall_at", "retrieval_metrics", "retrieval_ranks"], "xfast.eval.retrieval"),
    **dict.fromkeys(["evaluate", "parse_task", "run_task"], "xfast.eval.runner"),
    **dict.fromkeys(["read_sts_file", "sts_correlation"], "xfast.eval.sts"),
    **dict.fromkeys(["average_prompts", "build_class_embeddings", "zeroshot_classify"], "xfast.eval.zeroshot"),
})

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
