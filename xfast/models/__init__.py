"""CLIP / CLAP towers and training objectives with sentence-embedding (SimCSE) training.

    from xfast.config import parse
    from xfast.models import ModelConfig, ObjectiveConfig, Objective, build_model

    model = build_model(parse(ModelConfig, raw["model"], "model"))
    objective = Objective(parse(ObjectiveConfig, raw["objective"], "objective"))
    feats = model.features(batch, objective=objective, step=step, sentences=sents, nli=triplets)
    loss, parts = objective(feats, model.scale(), step=step)

Saved models (model.save_pretrained(dir)) load back with load_pretrained(dir); dir/text is a
plain HF (and sentence-transformers) sentence encoder, see xfast.models.io.
"""
from xfast.models.config import ModelConfig, ObjectiveConfig, SimCSEConfig, TowerConfig
from xfast.models.io import load_pretrained
from xfast.models.model import ContrastiveModel, build_model
from xfast.models.objective import Objective
from xfast.models.tokenizer import load_tokenizer, train_tokenizer

__all__ = ["ModelConfig", "TowerConfig", "ObjectiveConfig", "SimCSEConfig", "ContrastiveModel", "build_model",
           "load_pretrained", "Objective", "load_tokenizer", "train_tokenizer"]
