"""Training objective: cross-modal InfoNCE + CyCLIP regularisers + SimCSE, from an ObjectiveConfig.

total = contrastive_weight * clip + cyclip_lambda1 * cyclip_in + cyclip_lambda2 * cyclip_cross
        + simcse.weight * simcse
Every term is also returned unweighted in `parts`. Features (all [rows, dim]):
- "media", "text": L2-normalised shared-space embeddings of the paired batch;
- unsupervised SimCSE on captions: "text_view2", the second dropout view of the captions, paired
  with "text_pooled" (embedding "pooled") or "text" (embedding "projected");
- unsupervised SimCSE on a sentence stream: "sent_a", "sent_b" (two dropout views);
- supervised SimCSE: "nli_anchor", "nli_positive", "nli_negative".
With schedule "sequential", steps < stage1_steps are the sentence stage (SimCSE alone) and the
rest the cross-modal stage (no SimCSE); pass `step` to features() and to the objective.
With every cross-modal weight at 0 the objective is SimCSE alone and needs no paired media: a
text-only run, e.g. the first stage of a sequential study run as two separate runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from xfast.models.config import ObjectiveConfig
from xfast.ops.clip_loss import clip_loss
from xfast.ops.cyclip_loss import cyclip_loss
from xfast.ops.simcse_loss import simcse_loss

STAGES = ("joint", "cross_modal", "sentence")


# The data stream each part of a step reads: the paired media-caption batch, the external
# sentence stream (unsupervised SimCSE), the NLI triplets (supervised SimCSE).
STREAMS = ("pairs", "sentences", "nli")


@dataclass(frozen=True)
class FeaturePlan:
    """What one step computes: which embeddings, from which data streams. Computed once per step
    (Objective.plan) and handed to the model, the objective and the data loop."""
    cross_modal: bool
    captions: bool
    sentences: bool
    nli: bool
    embedding: str
    stage: str = "cross_modal"

    @property
    def unsup(self) -> bool:
        return self.captions or self.sentences

    @property
    def streams(self) -> tuple[str, ...]:
        """The data streams this step reads, in STREAMS order (the first one counts the samples)."""
        wanted = {"pairs": self.cross_modal or self.captions, "sentences": self.sentences, "nli": self.nli}
        return tuple(name for name in STREAMS if wanted[name])

    @property
    def features(self) -> tuple[str, ...]:
        """The feature keys the objective reads."""
        keys = []
        if self.cross_modal:
            keys += ["media", "text"]
        if self.captions:
            keys += ["text_view2", "text" if self.embedding == "projected" else "text_pooled"]
        if self.sentences:
            keys += ["sent_a", "sent_b"]
        if self.nli:
            keys += ["nli_anchor", "nli_positive", "nli_negative"]
        return tuple(dict.fromkeys(keys))


class Objective:
    """Objective(cfg)(features, logit_scale, step=..., group=None) -> (total, parts)."""

    def __init__(self, cfg: ObjectiveConfig):
        if not isinstance(cfg, ObjectiveConfig):
            raise TypeError(f"Objective takes an ObjectiveConfig, got {type(cfg).__name__}")
        cfg.validate("objective")
        self.cfg = cfg

    def stage(self, step: int | None = None) -> str:
        """'joint' (cross-modal + SimCSE), 'cross_modal' or 'sentence' (SimCSE only) at `step`."""
        se = self.cfg.simcse
        if se.mode == "none":
            return "cross_modal"
        if se.schedule == "joint":
            return "joint"
        if step is None or isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"objective.simcse.schedule 'sequential' needs the optimizer step (an int >= 0), "
                             f"got {step!r}")
        return "sentence" if step < se.stage1_steps else "cross_modal"

    @property
    def needs_sentences(self) -> bool:
        """Whether some step reads the external sentence stream (unsupervised SimCSE)."""
        se = self.cfg.simcse
        return se.mode == "unsup" and se.source in ("sentences", "both")

    @property
    def needs_nli(self) -> bool:
        """Whether some step reads the NLI triplet stream (supervised SimCSE)."""
        return self.cfg.simcse.mode == "sup"

    def plan(self, step: int | None = None) -> FeaturePlan:
        stage = self.stage(step)
        se = self.cfg.simcse
        simcse = stage != "cross_modal"
        unsup = simcse and se.mode == "unsup"
        return FeaturePlan(cross_modal=stage != "sentence" and self.cfg.cross_modal,
                           captions=unsup and se.source in ("captions", "both"),
                           sentences=unsup and se.source in ("sentences", "both"),
                           nli=simcse and se.mode == "sup", embedding=se.embedding, stage=stage)

    def required_features(self, step: int | None = None) -> tuple[str, ...]:
        return self.plan(step).features

    def __call__(self, features: dict[str, torch.Tensor], logit_scale=None, *,
                 step: int | None = None, plan: FeaturePlan | None = None,
                 group=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """logit_scale: the multiplier (model.scale()), needed unless the step is SimCSE-only.
        plan: this step's plan (self.plan(step)) when the caller already has it.

        group: a torch.distributed process group, passed to every loss: each rank gives its own
        rows (counts may differ between ranks and between feature streams) and gets the loss of
        the global batch, with xfast.distributed's gradient convention (grad_reduction="mean":
        exact after DDP/DeepSpeed average the gradients over ranks)."""
        if not isinstance(features, dict):
            raise TypeError(f"features must be a dict of tensors, got {type(features).__name__}")
        p = self.plan(step) if plan is None else plan
        missing = [k for k in p.features if k not in features]
        if missing:
            raise ValueError(f"features lack {', '.join(missing)} (stage {p.stage!r}); they have "
                             f"{', '.join(sorted(features)) or 'nothing'}")
        cfg, se = self.cfg, self.cfg.simcse
        parts: dict[str, torch.Tensor] = {}
        weighted = []
        if p.cross_modal:
            if logit_scale is None:
                raise ValueError("the cross-modal loss needs logit_scale (model.scale())")
            media, text = features["media"], features["text"]
            if cfg.contrastive_weight:
                parts["clip"] = clip_loss(media, text, logit_scale, label_smoothing=cfg.label_smoothing,
                                          group=group)
                weighted.append(cfg.contrastive_weight * parts["clip"])
            if cfg.cyclip_lambda1 or cfg.cyclip_lambda2:
                # On the normalised embeddings: CyCLIP's logits divided by the scale squared.
                in_modal, cross_modal = cyclip_loss(media, text, group=group)
                if cfg.cyclip_lambda1:
                    parts["cyclip_in"] = in_modal
                    weighted.append(cfg.cyclip_lambda1 * in_modal)
                if cfg.cyclip_lambda2:
                    parts["cyclip_cross"] = cross_modal
                    weighted.append(cfg.cyclip_lambda2 * cross_modal)
        simcse_terms = []
        if p.captions:
            first = features["text"] if p.embedding == "projected" else features["text_pooled"]
            parts["simcse_captions"] = simcse_loss(first, features["text_view2"], temperature=se.temperature,
                                                    group=group)
            simcse_terms.append(parts["simcse_captions"])
        if p.sentences:
            parts["simcse_sentences"] = simcse_loss(features["sent_a"], features["sent_b"],
                                                    temperature=se.temperature, group=group)
            simcse_terms.append(parts["simcse_sentences"])
        if p.nli:
            simcse_terms.append(simcse_loss(features["nli_anchor"], features["nli_positive"],
                                            features["nli_negative"], temperature=se.temperature,
                                            hard_negative_weight=se.hard_negative_weight, group=group))
        if simcse_terms:
            parts["simcse"] = torch.stack(simcse_terms).mean()
            weighted.append(se.weight * parts["simcse"])
        total = sum(weighted[1:], weighted[0])
        parts["total"] = total
        return total, parts


def feature_plan(objective: Objective | None, step: int | None, plan: FeaturePlan | None = None) -> FeaturePlan:
    """What ContrastiveModel.features computes: `plan` when given, else the objective's plan at
    `step`, else (no objective) the paired embeddings only."""
    if plan is not None:
        if not isinstance(plan, FeaturePlan):
            raise TypeError(f"plan must be an xfast.models.objective.FeaturePlan, got {type(plan).__name__}")
        return plan
    if objective is None:
        return FeaturePlan(cross_modal=True, captions=False, sentences=False, nli=False, embedding="pooled")
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be an xfast.models.Objective, got {type(objective).__name__}")
    return objective.plan(step)
