"""Write a ContrastiveModel as a transformers CLIPModel / ClapModel folder with its processor's config.

The weights are renamed with xfast.models.sources' tables (the inverse of model.init_from), so an
export loads back through init_from unchanged. The processor files carry xfast's preprocessing:
CLIPImageProcessor resizes the shorter side and centre-crops as xfast's evaluation transform does
(xfast crops and resizes in one Pillow call, so pixels can differ slightly at the borders of
non-square images); ClapFeatureExtractor ("rand_trunc", slaney mel) computes xfast's log-mel
(for clips longer than the model's duration it takes a random window, xfast's evaluation the start).
"""
from __future__ import annotations

from transformers import (
    ClapAudioConfig,
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    ClapTextConfig,
    CLIPConfig,
    CLIPModel,
)
from transformers.utils import logging as hf_logging

from xfast.models.sources import _ROBERTA_KEYS, to_hf_state_dict

_DROP = ("model_type", "transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype")


def _fields(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _DROP}


def write_hf_model(model, out_dir: str, kind: str, preprocessing: dict) -> dict:
    """config.json + model.safetensors (+ tokenizer, processor config); returns notes for xfast_config.json."""
    text_cfg, media_cfg = model.text.backbone.config, model.media.backbone.config
    dim = model.config.embed_dim
    scale = float(model.logit_scale.detach().exp().item())
    if kind == "clip":
        config = CLIPConfig(text_config=_fields(text_cfg), vision_config=_fields(media_cfg), projection_dim=dim,
                            logit_scale_init_value=float(model.logit_scale.item()))
        config.text_config.projection_dim = config.vision_config.projection_dim = dim
        hf_model = CLIPModel(config)
    else:
        text = ClapTextConfig(**{k: getattr(text_cfg, k) for k in _ROBERTA_KEYS}, projection_dim=dim,
                              projection_hidden_act="relu")
        audio = ClapAudioConfig(**{**_fields(media_cfg), "projection_dim": dim, "projection_hidden_act": "relu"})
        config = ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=dim,
                            logit_scale_init_value=scale)
        hf_model = ClapModel(config)
    state = to_hf_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, kind)
    own = hf_model.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not k.endswith(("position_ids", "token_type_ids")))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{kind} export: the renamed weights do not fit {type(hf_model).__name__}: missing "
                         f"{missing[:8]}, unexpected {unexpected[:8]}")
    hf_model.load_state_dict(state, strict=False)
    hf_model.save_pretrained(out_dir)
    notes = {}
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(out_dir)
    else:
        notes["tokenizer"] = "not written: the model has no tokenizer"
    media = preprocessing.get(model.modality)
    if kind == "clip":
        size = media["size"]
        # Written as the standard CLIPImageProcessor (what every transformers version loads); without
        # torchvision, resolving that name makes transformers warn that it picks its PIL backend.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            _clip_image_processor(size, media).save_pretrained(out_dir)
        finally:
            hf_logging.set_verbosity(verbosity)
    elif media is None:
        notes["feature_extractor"] = "not written: no audio front end known (pass preprocessing={'audio': ...})"
    elif (media["mel_scale"], media["mel_norm"]) != ("slaney", "slaney"):
        notes["feature_extractor"] = (f"not written: ClapFeatureExtractor computes slaney mel filters with slaney "
                                      f"norm, this model was trained on {media['mel_scale']}/{media['mel_norm']}")
    elif not float(media["duration_s"]).is_integer():
        notes["feature_extractor"] = (f"not written: ClapFeatureExtractor takes whole seconds (max_length_s), this "
                                      f"model was trained on {media['duration_s']} s clips")
    else:
        ClapFeatureExtractor(
            feature_size=media["n_mels"], sampling_rate=media["sample_rate"], hop_length=media["hop_length"],
            max_length_s=int(media["duration_s"]), fft_window_size=media["n_fft"], padding_value=0.0,
            return_attention_mask=False, frequency_min=media["fmin"], frequency_max=media["fmax"],
            truncation="rand_trunc", padding=media["padding"]).save_pretrained(out_dir)
    return notes


def _clip_image_processor(size: int, media: dict):
    from transformers import CLIPImageProcessor  # resolving the name is what warns (see the caller)
    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": size}, do_center_crop=True,
                              crop_size={"height": size, "width": size},
                              resample=3 if media["interpolation"] == "bicubic" else 2, do_rescale=True,
                              rescale_factor=1 / 255, do_normalize=True, image_mean=media["mean"],
                              image_std=media["std"], do_convert_rgb=True)
