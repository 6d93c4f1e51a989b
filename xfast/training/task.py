"""The module DeepSpeed wraps: a ContrastiveModel plus its Objective, in the shape that
xfast.training.accumulation expects (batch -> per-sample features, shared tensors)."""
from __future__ import annotations

import torch
from torch import nn


class ContrastiveTask(nn.Module):
    """forward(inputs) -> (features, {"logit_scale": model.scale()}).

    inputs: {"plan": the step's FeaturePlan (objective.plan(step)), and the batch of each stream
    the plan names: "pairs" (image/audio-caption batch), "sentences" (unsup SimCSE stream),
    "nli" (triplets)}. Only the model holds parameters; the objective is plain code run on the
    features of the whole batch by `loss`.
    """

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, inputs: dict):
        features = self.model(inputs.get("pairs"), plan=inputs["plan"], sentences=inputs.get("sentences"),
                              nli=inputs.get("nli"))
        # scale() reads model.logit_scale outside the model's own forward: under ZeRO-3 that
        # parameter is registered as an external parameter of this module (see shard_hooks).
        return features, {"logit_scale": self.model.scale()}

    def loss(self, features: dict[str, torch.Tensor], shared: dict[str, torch.Tensor], plan, *, group=None):
        """The objective on this rank's features under the step's plan; group: see Objective.__call__."""
        return self.objective(features, shared["logit_scale"], plan=plan, group=group)

    def register_zero3_external_parameters(self) -> None:
        """Parameters the model owns directly (the logit scale) but this module's forward reads
        after the model's forward returned: ZeRO-3 must gather them for this module too."""
        import deepspeed
        for param in self.model.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(self, param)
