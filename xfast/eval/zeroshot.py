"""Zero-shot classification: class names through prompt templates, prompts averaged per class."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from xfast.backends import accumulation_dtype
from xfast.eval._checks import check_block, check_index, check_ks, check_matrix, check_same_device, unit_rows
from xfast.eval.tasks import check_templates

IMAGE_TEMPLATES = ("a photo of a {}.",)
AUDIO_TEMPLATES = ("This is a sound of {}.",)


def default_templates(modality: str) -> tuple[str, ...]:
    if modality == "image":
        return IMAGE_TEMPLATES
    if modality == "audio":
        return AUDIO_TEMPLATES
    raise ValueError(f"modality must be 'image' or 'audio', got {modality!r}")


def check_classnames(classnames: Sequence[str]) -> list[str]:
    if isinstance(classnames, str) or not classnames:
        raise ValueError(f"classnames must be a non-empty list of strings, got {classnames!r}")
    for name in classnames:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"classnames must hold non-blank strings, got {name!r}")
    if len(set(classnames)) != len(classnames):
        duplicate = next(n for n in classnames if classnames.count(n) > 1)
        raise ValueError(f"classnames lists {duplicate!r} twice")
    return list(classnames)


def average_prompts(class_text_emb: torch.Tensor) -> torch.Tensor:
    """[C, P, D] prompt embeddings -> [C, D]: normalise each prompt, average, renormalise (as CLIP)."""
    if not isinstance(class_text_emb, torch.Tensor) or class_text_emb.dim() != 3:
        shape = tuple(class_text_emb.shape) if isinstance(class_text_emb, torch.Tensor) else type(class_text_emb).__name__
        raise ValueError(f"class_text_emb must be [classes, prompts, dim], got {shape}")
    c, p, d = class_text_emb.shape
    check_matrix("class_text_emb", class_text_emb.reshape(c * p, d))
    dtype = accumulation_dtype(class_text_emb)
    prompts = unit_rows("class_text_emb", class_text_emb.reshape(c * p, d), dtype).reshape(c, p, d)
    return unit_rows("class_text_emb (prompt average)", prompts.mean(1), dtype)


def build_class_embeddings(
    encode_text_fn: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """[C, D] class embeddings: every template filled with every class name, encoded by
    `encode_text_fn(list_of_strings) -> [n, D]` in chunks of `batch_size` prompts, then averaged
    per class by `average_prompts`. A template's "{}" is replaced literally (braces in class
    names are safe)."""
    classnames = check_classnames(classnames)
    templates = check_templates(templates)
    batch_size = check_block(batch_size)
    prompts = [t.replace("{}", name) for name in classnames for t in templates]
    chunks = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="class prompts", disable=not progress):
        chunk = prompts[start : start + batch_size]
        emb = encode_text_fn(chunk)
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(chunk):
            got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise ValueError(f"encode_text_fn must return a [{len(chunk)}, dim] tensor for {len(chunk)} prompts, got {got}")
        chunks.append(emb.detach())
    emb = torch.cat(chunks)
    return average_prompts(emb.reshape(len(classnames), len(templates), emb.shape[1]))


def zeroshot_classify(
    media_emb: torch.Tensor,
    class_text_emb: torch.Tensor,
    labels,
    *,
    ks=(1, 5),
    block: int = 256,
) -> dict[str, float]:
    """Top-k accuracy of predicting labels[i] as the class whose text embedding is closest (cosine).

    class_text_emb is [C, D] (already averaged) or [C, P, D] (averaged here). The true class's
    rank is the number of classes scoring >= it (ties count against it, like the retrieval
    ranks), and top-k is the fraction of items with rank <= k; k >= C gives 1 by definition.
    Keys: "top{k}" for each k and "mean_per_class_top1" (top-1 accuracy of each class present
    in `labels`, averaged over those classes).
    """
    ks = check_ks(ks)
    block = check_block(block)
    check_matrix("media_emb", media_emb)
    if isinstance(class_text_emb, torch.Tensor) and class_text_emb.dim() == 3:
        classes = average_prompts(class_text_emb)
    else:
        classes = check_matrix("class_text_emb", class_text_emb)
    if classes.shape[1] != media_emb.shape[1]:
        raise ValueError(f"class_text_emb has embedding dim {classes.shape[1]} but media_emb has {media_emb.shape[1]}")
    check_same_device(("media_emb", "class_text_emb"), (media_emb, classes))
    num_classes = classes.shape[0]
    labels = check_index(
        "labels", labels, length=media_emb.shape[0], upper=num_classes, upper_name="classes", device=media_emb.device
    )
    dtype = accumulation_dtype(media_emb)
    media = unit_rows("media_emb", media_emb, dtype)
    classes = unit_rows("class_text_emb", classes, dtype)
    ranks = torch.empty_like(labels)
    for start in range(0, media.shape[0], block):
        scores = media[start : start + block] @ classes.T
        true_score = scores.gather(1, labels[start : start + block, None])
        ranks[start : start + block] = (scores >= true_score).sum(1)
    out = {f"top{k}": float((ranks <= k).double().mean()) for k in ks}
    correct = (ranks == 1).double()
    present = torch.bincount(labels, minlength=num_classes) > 0
    per_class = torch.zeros(num_classes, dtype=torch.float64, device=labels.device).index_add_(0, labels, correct)
    per_class = per_class[present] / torch.bincount(labels, minlength=num_classes)[present]
    out["mean_per_class_top1"] = float(per_class.mean())
    return out
