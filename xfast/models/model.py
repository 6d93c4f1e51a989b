"""ContrastiveModel: text tower + one media tower + learnable logit scale (CLIP / CLAP)."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from xfast._checks import DeferredChecks
from xfast.config import ConfigError
from xfast.modalities import MEDIA_INPUT, media_input
from xfast.models import io
from xfast.models.config import ModelConfig
from xfast.models.objective import FeaturePlan, feature_plan
from xfast.models.tokenizer import load_tokenizer, vocab_facts
from xfast.models.towers import EncoderTower, build_backbone, normalize


class ContrastiveModel(nn.Module):
    """Two towers mapping text and image/audio into one L2-normalised space.

    encode_* return L2-normalised [B, embed_dim]; pass normalized=False for the raw projection.
    sentence_embedding() is the text tower's pooled output before projection (what STS and
    SimCSE use). features() computes what an Objective needs for one (micro-)batch; forward()
    is features(), so a DeepSpeed engine can be called like the model.
    """

    def __init__(self, cfg: ModelConfig, text: EncoderTower, media: EncoderTower, tokenizer=None):
        super().__init__()
        self.config = cfg
        self.modality = cfg.modality
        self.text = text
        self.media = media
        self.tokenizer = tokenizer
        self._plans_checked: set = set()  # FeaturePlans whose config checks passed
        self._compiled_pair = None  # both towers' embeddings as one compiled region (compile_towers)
        # Media front end and text length the model expects (xfast.data config fields), kept in exports.
        self.preprocessing: dict = {}
        self.logit_scale_max = cfg.logit_scale_max
        # Shape (1,), not 0-dim: DeepSpeed ZeRO cannot broadcast 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(cfg.logit_scale_init)),
                                        requires_grad=cfg.learn_logit_scale)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped at logit_scale_max, shape (1,)."""
        return self.logit_scale.exp().clamp(max=self.logit_scale_max)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                    normalized: bool = True) -> torch.Tensor:
        return self._encode_text(input_ids, attention_mask, None, normalized)

    def _encode_text(self, input_ids, attention_mask, checks: DeferredChecks | None, normalized: bool = True):
        inputs = self.text.check_inputs(checks, input_ids=input_ids, attention_mask=attention_mask)
        _, projected = _forward(self.text, inputs, checks)
        return normalize(projected) if normalized else projected

    def sentence_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text tower's pooled output [B, hidden] (unnormalised, before projection)."""
        sentence, _ = self.text(**self.text.check_inputs(None, input_ids=input_ids, attention_mask=attention_mask))
        return sentence

    def encode_image(self, pixel_values: torch.Tensor, *, normalized: bool = True) -> torch.Tensor:
        self._require_modality("image")
        return self._encode_media(pixel_values, None, normalized)

    def encode_audio(self, input_features: torch.Tensor, *, normalized: bool = True) -> torch.Tensor:
        """input_features: log-mel Float[B, 1, frames, n_mels] (see xfast.models.towers)."""
        self._require_modality("audio")
        return self._encode_media(input_features, None, normalized)

    def encode_media(self, batch: Mapping, *, normalized: bool = True) -> torch.Tensor:
        """encode_image(batch["pixel_values"]) or encode_audio(batch["input_features"])."""
        return self._encode_media(media_input(batch, self.modality), None, normalized)

    def _encode_media(self, media: torch.Tensor, checks: DeferredChecks | None, normalized: bool = True):
        inputs = self.media.check_inputs(checks, **{MEDIA_INPUT[self.modality]: media})
        _, projected = _forward(self.media, inputs, checks)
        return normalize(projected) if normalized else projected

    def data_requirements(self) -> dict:
        """What the data pipeline must produce: max_text_length and the media input's sizes."""
        return {**self.text.requirements(), **self.media.requirements()}

    def features(self, batch: Mapping | None = None, *, objective=None, step: int | None = None,
                 plan: FeaturePlan | None = None, sentences: Mapping | None = None,
                 nli: Mapping | None = None) -> dict[str, torch.Tensor]:
        """The embeddings `objective` needs at `step` (all of them [rows, dim]); a caller that
        already holds the step's plan (objective.plan(step)) passes it as `plan` instead.

        Without either: {"media", "text"}. Concatenate the dicts of several micro-batches
        along dim 0 and call the objective once to keep the contrastive batch whole.
        Bad input values (NaN media, empty or wrongly padded text rows) raise a ValueError
        naming the problem before this returns; their checks are read from the device once.
        """
        plan = feature_plan(objective, step, plan)
        checks = DeferredChecks()
        out = self._features(checks, plan, batch, sentences, nli)
        checks.read()
        return out

    def _features(self, checks: DeferredChecks, plan: FeaturePlan, batch, sentences, nli) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if plan.unsup and plan not in self._plans_checked:  # config checks: once per kind of step
            if self.text.freeze == "all":
                raise ConfigError("model.text.freeze: unsupervised SimCSE trains the text tower, but freeze 'all' "
                                  "keeps it fixed and in eval mode (no dropout, identical views)")
            if self.text.dropout_probability() == 0:
                raise ConfigError("model.text.overrides: unsupervised SimCSE needs dropout in the text tower (its two "
                                  "views would be identical); set e.g. hidden_dropout_prob or attention_dropout > 0")
            self._plans_checked.add(plan)
        if plan.cross_modal or plan.captions:
            _require(batch, ("input_ids", "attention_mask"), "batch")
        if plan.cross_modal:
            key = MEDIA_INPUT[self.modality]
            if key in batch and len(batch[key]) != len(batch["input_ids"]):
                raise ValueError(f"batch: {key} has {len(batch[key])} rows but input_ids has "
                                 f"{len(batch['input_ids'])}; pairs must line up")
            if self._compiled_pair is not None and not plan.captions:
                media = self.media.check_inputs(checks, **{key: media_input(batch, self.modality)})
                text = self.text.check_inputs(checks, input_ids=batch["input_ids"],
                                              attention_mask=batch["attention_mask"])
                with checks.consuming(), torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=True):
                    # guards built with this skip a whole module tree whose attribute dicts are
                    # unchanged (no attribute of the towers is reassigned in a run)
                    out["media"], out["text"] = self._compiled_pair(media, text)
            else:
                out["media"] = self._encode_media(media_input(batch, self.modality), checks)
        projected = plan.embedding == "projected"
        if plan.captions:
            # Both dropout views of the captions in one forward pass of the doubled batch.
            views = self._text_views(batch["input_ids"], batch["attention_mask"], 2, checks)
            (sent1, proj1), (sent2, proj2) = views
            out["text_view2"] = normalize(proj2) if projected else sent2
            if not projected:
                out["text_pooled"] = sent1
            if plan.cross_modal or projected:
                out["text"] = normalize(proj1)
        elif plan.cross_modal and "text" not in out:
            out["text"] = self._encode_text(batch["input_ids"], batch["attention_mask"], checks)
        if plan.sentences:
            _require(sentences, ("input_ids", "attention_mask"), "sentences")
            (s1, p1), (s2, p2) = self._text_views(sentences["input_ids"], sentences["attention_mask"], 2, checks)
            out["sent_a"], out["sent_b"] = (normalize(p1), normalize(p2)) if projected else (s1, s2)
        if plan.nli:
            keys = [f"{part}_{kind}" for part in ("anchor", "positive", "negative")
                    for kind in ("input_ids", "attention_mask")]
            _require(nli, keys, "nli")
            parts = [self.text.check_inputs(checks, input_ids=nli[f"{part}_input_ids"],
                                            attention_mask=nli[f"{part}_attention_mask"])
                     for part in ("anchor", "positive", "negative")]
            if len({p["input_ids"].shape for p in parts}) == 1:
                # One forward pass over the stacked triplets (the data pads them to one length).
                sentence, proj = _forward(self.text, {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, checks)
                encoded = list(zip(sentence.chunk(3), proj.chunk(3)))
            else:
                encoded = [_forward(self.text, p, checks) for p in parts]
            for part, (sentence, proj) in zip(("anchor", "positive", "negative"), encoded):
                out[f"nli_{part}"] = normalize(proj) if projected else sentence
        return out

    forward = features

    def _text_views(self, input_ids, attention_mask, copies: int, checks: DeferredChecks):
        inputs = self.text.check_inputs(checks, input_ids=input_ids, attention_mask=attention_mask)
        sentence, projected = _forward(self.text, {k: v.repeat(copies, 1) for k, v in inputs.items()}, checks)
        return list(zip(sentence.chunk(copies), projected.chunk(copies)))

    def compile_towers(self, *, mode: str = "default", dynamic: bool | None = None, backend: str = "inductor") -> None:
        """torch.compile both towers' forward in place (nn.Module.compile): parameter names, the
        state_dict and checkpoints stay those of the eager model. A step that only pairs media and
        captions (no SimCSE views) runs both towers and the normalisation of their embeddings as
        ONE compiled region instead: one guard check, one autograd node and one set of compiled-call
        wrappers per step instead of two, and the normalisation fused into the graph (media first,
        then text, as eager: the same dropout masks). Its guards are built with dynamo's recursive
        dict tags: an unchanged module tree (no attribute reassigned, which a new parameter, module
        or train/eval switch would be) is one check instead of one per parameter (tested: a reassigned
        parameter is seen). A deepcopy or an unpickled model runs eager (as nn.Module.compile's).
        Input checks and the loss stay eager.
        Inductor draws random numbers (dropout) through torch's own RNG
        (fallback_random) so that a compiled step uses the masks an eager one would, and the second
        forward of whole-batch accumulation replays those of the first. `mode` is inductor's (the
        other backends only trace), without CUDA graphs: their outputs are overwritten by the next
        replay, and accumulation keeps every micro-batch's tower outputs."""
        if mode not in ("default", "max-autotune-no-cudagraphs"):
            raise ValueError(f"compile_towers: mode {mode!r} is not supported; 'default' or "
                             f"'max-autotune-no-cudagraphs' (the others capture CUDA graphs, whose outputs "
                             f"the next replay overwrites while accumulation still holds them)")
        options = None
        if backend == "inductor":  # the mode as its options, as torch.compile takes one or the other
            from torch._inductor import list_mode_options
            options = {**list_mode_options(mode, dynamic), "fallback_random": True, "triton.cudagraphs": False}
        for tower in (self.text, self.media):
            tower.compile(backend=backend, dynamic=dynamic, options=options)
        self._compiled_pair = torch.compile(self._embed_pair, backend=backend, dynamic=dynamic, options=options)

    def __getstate__(self):
        # As nn.Module drops a compiled module's _compiled_call_impl: the compiled pair is bound to
        # this instance (a copy calling it would run this model's towers), so a deepcopy or an
        # unpickled model runs eager until compile_towers is called on it.
        state = super().__getstate__()
        state["_compiled_pair"] = None
        return state

    def _embed_pair(self, media: dict, text: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (media, text) embeddings of checked inputs; compiled by compile_towers. The
        towers' uncompiled call (_call_impl, hooks included): this whole function is one graph."""
        _, media_projected = self.media._call_impl(**media)
        _, text_projected = self.text._call_impl(**text)
        return normalize(media_projected), normalize(text_projected)

    def _require_modality(self, modality: str) -> None:
        if self.modality != modality:
            raise ValueError(f"this model's media tower is {self.modality!r}, not {modality!r}")

    def save_pretrained(self, out_dir, *, preprocessing: dict | None = None) -> str:
        """A transformers CLIPModel/ClapModel folder when the towers fit one, else HF towers + heads;
        plus text/ (sentence-transformers) and xfast_config.json. See xfast.models.io."""
        return io.save_pretrained(self, out_dir, preprocessing=preprocessing)


def _forward(tower, inputs: dict, checks: DeferredChecks | None):
    """tower(**inputs); an error in it is reported as the deferred data problem if there is one."""
    if checks is None:  # check_inputs has read the checks already
        return tower(**inputs)
    with checks.consuming():
        return tower(**inputs)


def _require(source: Mapping | None, keys, name: str) -> None:
    if source is None:
        raise ValueError(f"the objective needs the {name!r} input (keys {', '.join(keys)}) but none was given")
    missing = [k for k in keys if k not in source]
    if missing:
        raise ValueError(f"{name} lacks {', '.join(missing)}; it has {', '.join(sorted(source))}")


def build_model(cfg: ModelConfig, *, path: str = "model") -> ContrastiveModel:
    """Build both towers from presets or local folders (never a hub); random parts use torch's RNG."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model takes a ModelConfig (xfast.config.parse(ModelConfig, raw, 'model')), "
                        f"got {type(cfg).__name__}")
    cfg.validate(path)
    tokenizer = None
    if cfg.text.tokenizer is not None or cfg.text.pretrained is not None:
        try:
            tokenizer = load_tokenizer(cfg.text)
        except ValueError:
            if cfg.text.tokenizer is not None:
                raise
            # A pretrained text folder without a tokenizer: the caller brings its own.
    vocab = vocab_facts(tokenizer) if tokenizer is not None else None
    source = cfg.source(path)
    bases = {m: t.config for m, t in source.towers().items()} if source is not None else {}
    text_backbone = build_backbone(cfg.text, f"{path}.text", vocab=vocab, base=bases.get("text"))
    text = EncoderTower("text", cfg.text, text_backbone, cfg.embed_dim, path)
    media_backbone = build_backbone(cfg.media, f"{path}.{cfg.modality}", base=bases.get(cfg.modality))
    media = EncoderTower(cfg.modality, cfg.media, media_backbone, cfg.embed_dim, path)
    model = ContrastiveModel(cfg, text, media, tokenizer)
    if source is not None:
        from xfast.models.sources import fit_to_model, source_state_dict
        state = fit_to_model(source_state_dict(source), model, f"{path}.init_from {source.path!r}")
        model.load_state_dict(state, strict=False)  # strict=False: only the buffers fit_to_model ignores
        model.preprocessing = source.preprocessing
    return model


def load_pretrained(model_dir, *, map_location: str | torch.device = "cpu") -> ContrastiveModel:
    """Rebuild a ContrastiveModel written by save_pretrained (for evaluation or fine-tuning)."""
    cfg, doc = io.read_pretrained(model_dir)
    model = build_model(cfg)
    io.load_weights(model, model_dir, doc, map_location=map_location)
    return model.to(map_location)
