"""CLIP / CLAP towers and training objectives with sentence-embedding (SimCSE) training.

    from xfast.config import parse
    from xfast.models import ModelConfig, ObjectiveConfig, Objective, build_model

    model = build_model(parse(ModelConfig, raw["model"], "model"))
    objective = Objective(parse(ObjectiveConfig, raw["objective"], "objective"))
    feats = model.features(batch, objective=objective, step=step, sentences=sents, nli=triplets)
    loss, parts = objective(feats, model.scale(), step=step)

Saved models (model.save_pretrained(dir)) load back with load_pretrained(dir); dir/text is a
plain HF (and sentence-transformers) sentence encoder, see xfast.models.io (the format).
"""
from xfast._lazy import lazy_exports

# Imported on first use, so that the config modules load without transformers.
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["ModelConfig", "ObjectiveConfig", "SimCSEConfig", "TowerConfig"], "xfast.models.config"),
    "load_pretrained": "xfast.models.model",
    **dict.fromkeys(["ContrastiveModel", "build_model"], "xfast.models.model"),
    "Objective": "xfast.models.objective",
    **dict.fromkeys(["load_tokenizer", "train_tokenizer"], "xfast.models.tokenizer"),
})

__all__ = ["ModelConfig", "TowerConfig", "ObjectiveConfig", "SimCSEConfig", "ContrastiveModel", "build_model",
           "load_pretrained", "Objective", "load_tokenizer", "train_tokenizer"]
