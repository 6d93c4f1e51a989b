"""One spec per tower type: HF classes, modality, poolings, presets, input requirements.

A new tower type is one TowerSpec in SPECS (plus its pooling function); config validation
(xfast.models.config) and the towers (xfast.models.towers) read everything from it.

Inputs each tower takes (what the data pipeline must produce):
- text: input_ids / attention_mask Long[B, L], right-padded, L <= max_text_length
  (max_position_embeddings; minus 2 for RoBERTa, whose positions start after the pad id).
- image: pixel_values Float[B, num_channels, image_size, image_size], normalised.
- htsat: input_features Float[B, 1, frames, n_mels] log-mel with n_mels == num_mel_bins and
  frames <= spec_size * (spec_size // num_mel_bins); shorter inputs are stretched to that many
  frames by ClapAudioModel (bicubic), as LAION-CLAP does for 10 s clips (1001 -> 1024 frames).
  is_longer is not used: feature fusion is off (one mel channel). The base preset (LAION-CLAP's
  HTSAT) takes 64 mels x <= 1024 frames (48 kHz, hop 480, 10 s); tiny takes 16 mels x <= 256.
- ast: input_features Float[B, 1, frames, n_mels] (squeezed to ASTModel's [B, frames, n_mels])
  with frames == max_length and n_mels == num_mel_bins exactly (base: 1024 x 128; tiny 64 x 16).

This module imports neither torch nor transformers (configs validate without them): sizes are
read from HF configs as plain dicts (xfast.models.hf_configs), HF classes by name when asked.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xfast.config import ConfigError

if TYPE_CHECKING:
    import torch

MODALITIES = ("text", "image", "audio")
PRESETS = ("tiny", "base")
# Batch keys of each modality's input.
INPUT_KEYS: dict[str, tuple[str, ...]] = {"text": ("input_ids", "attention_mask"), "image": ("pixel_values",),
                                          "audio": ("input_features",)}


@dataclass(frozen=True)
class TowerSpec:
    """Everything xfast knows about one tower type.

    pool(backbone, inputs, pooling) -> [B, hidden] runs the HF model on the modality's inputs
    (INPUT_KEYS) and pools; requirements(config) -> what the data must produce (see the module
    docstring); check_config(config, path) raises ConfigError on sizes the type cannot run;
    `config` is the tower's HF config as a dict (hf_configs.tower_config, or config.to_dict()).
    """
    type: str
    modality: str
    config_class: str | None  # transformers class names; None: any AutoModel ("auto", pretrained only)
    model_class: str | None
    model_type: str | None  # what a pretrained folder's config.json must declare
    poolings: tuple[str, ...]  # allowed; the first is the default
    pool: Callable[..., torch.Tensor]
    requirements: Callable[..., dict]
    presets: Mapping[str, dict] = field(default_factory=dict)  # preset -> HF config overrides of the class defaults
    check_config: Callable[..., None] | None = None
    exact_frames: bool = False  # audio: the frame count must equal max_frames (not just fit)

    def hf_config_class(self):
        import transformers
        return getattr(transformers, self.config_class)

    def hf_model_class(self):
        import transformers
        return getattr(transformers, self.model_class)


# -- pooling: each returns [B, hidden] from the backbone's output.

def _pool_text(backbone, inputs, pooling: str) -> torch.Tensor:
    attention_mask = inputs["attention_mask"]
    hidden = backbone(input_ids=inputs["input_ids"], attention_mask=attention_mask).last_hidden_state
    if pooling in ("cls", "cls_mlp"):
        return hidden[:, 0]
    if pooling == "mean":
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)
    # eos: the last real token of each right-padded row (CLIP's EOT, BERT's [SEP]). An empty row would
    # index -1 (a device-side assert on CUDA, which kills the context) before the deferred check that
    # names it is read: clamp, so the forward stays in bounds and the check reports it.
    last = (attention_mask.sum(1) - 1).clamp_min(0).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, last).squeeze(1)


def _pool_vit(backbone, inputs, pooling: str) -> torch.Tensor:
    hidden = backbone(pixel_values=inputs["pixel_values"]).last_hidden_state  # the final-normed tokens
    return hidden[:, 0] if pooling == "cls" else hidden[:, 1:].mean(1)


def _pool_clip_vision(backbone, inputs, pooling: str) -> torch.Tensor:
    out = backbone(pixel_values=inputs["pixel_values"])
    if pooling == "cls":
        return out.pooler_output  # CLIP's post-layernormed CLS
    # transformers 4 nests the layers under .vision_model; 5 does not.
    post_layernorm = getattr(backbone, "vision_model", backbone).post_layernorm
    return post_layernorm(out.last_hidden_state[:, 1:].mean(1))


def _pool_htsat(backbone, inputs, pooling: str) -> torch.Tensor:
    # LAION-CLAP's average over the last stage's tokens (ClapAudioModel's pooler_output).
    return backbone(input_features=inputs["input_features"]).pooler_output


def _pool_ast(backbone, inputs, pooling: str) -> torch.Tensor:
    out = backbone(input_values=inputs["input_features"][:, 0])
    if pooling == "cls_dist":
        return out.pooler_output  # the mean of the CLS and distillation tokens
    hidden = out.last_hidden_state
    return hidden[:, 0] if pooling == "cls" else hidden[:, 2:].mean(1)


# -- what the data must produce; a value is None where an 'auto' tower's config does not state it.

def _text_requirements(c: Mapping) -> dict:
    positions = c.get("max_position_embeddings")
    offset = 2 if c.get("model_type") in ("roberta", "xlm-roberta") else 0  # positions start after the pad id
    return {"max_text_length": None if positions is None else positions - offset}


def _image_requirements(c: Mapping) -> dict:
    return {"image_size": c["image_size"], "num_channels": c["num_channels"]}


def _htsat_requirements(c: Mapping) -> dict:
    return {"n_mels": c["num_mel_bins"], "max_frames": c["spec_size"] * (c["spec_size"] // c["num_mel_bins"])}


def _ast_requirements(c: Mapping) -> dict:
    return {"n_mels": c["num_mel_bins"], "max_frames": c["max_length"]}


# -- sizes an architecture cannot run (a key the config does not state is left to the model build).

def _check_heads(c: Mapping, path: str) -> None:
    hidden, heads = c.get("hidden_size"), c.get("num_attention_heads")
    if isinstance(heads, int) and hidden is not None and hidden % heads:
        raise ConfigError(f"{path}.overrides.hidden_size: {hidden} is not divisible by num_attention_heads ({heads})")


def _check_htsat(c: Mapping, path: str) -> None:
    depths, heads = c["depths"], c["num_attention_heads"]
    merged = c["patch_embeds_hidden_size"] * 2 ** (len(depths) - 1)
    if c.get("hidden_size") != merged:
        raise ConfigError(f"{path}.overrides.hidden_size: htsat needs hidden_size == patch_embeds_hidden_size * "
                          f"2**(len(depths)-1) = {merged}, got {c.get('hidden_size')}")
    if len(heads) != len(depths):
        raise ConfigError(f"{path}.overrides.num_attention_heads: one head count per stage "
                          f"({len(depths)} depths), got {heads}")
    for stage, count in enumerate(heads):
        dim = c["patch_embeds_hidden_size"] * 2 ** stage
        if dim % count:
            raise ConfigError(f"{path}.overrides.num_attention_heads: stage {stage} width {dim} is not "
                              f"divisible by {count} heads")
    if c["enable_fusion"]:
        raise ConfigError(f"{path}.overrides.enable_fusion: not supported; the audio tower takes one log-mel "
                          f"channel [B, 1, frames, n_mels]")
    if c["spec_size"] % c["num_mel_bins"]:
        raise ConfigError(f"{path}.overrides.num_mel_bins: htsat needs spec_size ({c['spec_size']}) to be a "
                          f"multiple of num_mel_bins ({c['num_mel_bins']})")


# "base" starts from the HF class defaults, which are the reference sizes: BERT-base, ViT-B/16,
# CLIP ViT-B/32's towers, AST-base and LAION-CLAP's HTSAT; only RoBERTa needs its own numbers.
_TINY_TRANSFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
# Tiny text towers share the special-token layout of xfast.models.train_tokenizer:
# [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.
_TINY_TEXT = dict(_TINY_TRANSFORMER, vocab_size=1000, max_position_embeddings=64, pad_token_id=0)
TEXT_POOLINGS = ("cls", "cls_mlp", "mean", "eos")

SPECS: dict[str, TowerSpec] = {spec.type: spec for spec in (
    TowerSpec("bert", "text", "BertConfig", "BertModel", "bert", TEXT_POOLINGS, _pool_text, _text_requirements,
              presets={"tiny": _TINY_TEXT}, check_config=_check_heads),
    TowerSpec("roberta", "text", "RobertaConfig", "RobertaModel", "roberta", TEXT_POOLINGS, _pool_text,
              _text_requirements, check_config=_check_heads, presets={
                  "base": dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                               pad_token_id=1, bos_token_id=0, eos_token_id=2),
                  "tiny": dict(_TINY_TEXT, max_position_embeddings=66)}),
    # CLIP's text transformer has no dropout but attention dropout; SimCSE needs some.
    TowerSpec("clip_text", "text", "CLIPTextConfig", "CLIPTextModel", "clip_text_model",
              ("eos",) + tuple(p for p in TEXT_POOLINGS if p != "eos"), _pool_text, _text_requirements,
              presets={"tiny": dict(_TINY_TEXT, bos_token_id=2, eos_token_id=3, attention_dropout=0.1)},
              check_config=_check_heads),
    # Any AutoModel text encoder from a local folder.
    TowerSpec("auto", "text", None, None, None, TEXT_POOLINGS, _pool_text, _text_requirements,
              check_config=_check_heads),
    # vit: the final-normed CLS token; clip_vision: CLIP's post-layernormed CLS (pooler_output).
    TowerSpec("vit", "image", "ViTConfig", "ViTModel", "vit", ("cls", "mean"), _pool_vit, _image_requirements,
              presets={"tiny": dict(_TINY_TRANSFORMER, image_size=32, patch_size=8)}, check_config=_check_heads),
    TowerSpec("clip_vision", "image", "CLIPVisionConfig", "CLIPVisionModel", "clip_vision_model", ("cls", "mean"),
              _pool_clip_vision, _image_requirements,
              presets={"tiny": dict(_TINY_TRANSFORMER, image_size=32, patch_size=8)}, check_config=_check_heads),
    TowerSpec("htsat", "audio", "ClapAudioConfig", "ClapAudioModel", "clap_audio_model", ("mean",), _pool_htsat,
              _htsat_requirements, check_config=_check_htsat, presets={
                  "tiny": dict(spec_size=64, num_mel_bins=16, patch_size=4, patch_stride=4,
                               patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2],
                               hidden_size=32, window_size=4, enable_fusion=False)}),
    # ast: "cls_dist" averages the CLS and distillation tokens (ASTModel's pooler_output).
    TowerSpec("ast", "audio", "ASTConfig", "ASTModel", "audio-spectrogram-transformer", ("cls_dist", "cls", "mean"),
              _pool_ast, _ast_requirements, exact_frames=True, check_config=_check_heads, presets={
                  "tiny": dict(_TINY_TRANSFORMER, patch_size=16, num_mel_bins=16, max_length=64, frequency_stride=16,
                               time_stride=16)}),
)}
# Tower types per modality, in SPECS order.
TOWER_TYPES: dict[str, tuple[str, ...]] = {m: tuple(t for t, s in SPECS.items() if s.modality == m)
                                           for m in MODALITIES}
