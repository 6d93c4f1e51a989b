"""Tiny whole-model sources for the init_from / export tests (holds no tests): transformers
CLIPModel / ClapModel folders built from config objects, and an open_clip checkpoint written in
open_clip's state-dict layout with an independent plain-torch float64 forward as its oracle."""
from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from transformers import ClapConfig, ClapModel, CLIPConfig, CLIPModel

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
HTSAT_TINY = dict(spec_size=64, num_mel_bins=16, patch_size=4, patch_stride=4, patch_embeds_hidden_size=16,
                  depths=[1, 1], num_attention_heads=[2, 2], hidden_size=32, window_size=4, enable_fusion=False)


def clip_model(seed: int = 0, *, vocab_size: int = 120, eos: int = 3) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(TINY, vocab_size=vocab_size, max_position_embeddings=24, pad_token_id=0, bos_token_id=2,
                         eos_token_id=eos),
        vision_config=dict(TINY, image_size=32, patch_size=8), projection_dim=16, logit_scale_init_value=3.1)
    return CLIPModel(config).eval()


def clap_model(seed: int = 0, *, vocab_size: int = 120, pad: int = 1, bos: int = 0, eos: int = 2) -> ClapModel:
    torch.manual_seed(seed)
    config = ClapConfig(
        text_config=dict(TINY, vocab_size=vocab_size, max_position_embeddings=40, pad_token_id=pad, bos_token_id=bos,
                         eos_token_id=eos, type_vocab_size=1),
        audio_config=HTSAT_TINY, projection_dim=16, logit_scale_init_value=20.0)
    model = ClapModel(config).eval()
    with torch.no_grad():  # trained scales differ from the init value and from each other
        model.logit_scale_a.fill_(math.log(25.0))
        model.logit_scale_t.fill_(math.log(25.0))
    return model


# -- open_clip layout

OPEN_CLIP_CFG = {"embed_dim": 16, "quick_gelu": True,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 20, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2}}


def open_clip_state(cfg: dict = OPEN_CLIP_CFG, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the names and shapes of open_clip's CLIP (scaled so activations stay O(1))."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    v, t, d = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    grid = v["image_size"] // v["patch_size"]
    state = {"logit_scale": torch.tensor(math.log(30.0)), "token_embedding.weight": r(t["vocab_size"], t["width"]),
             "positional_embedding": r(t["context_length"], t["width"]), "text_projection": r(t["width"], d),
             "ln_final.weight": 1 + r(t["width"]), "ln_final.bias": r(t["width"]),
             "visual.conv1.weight": r(v["width"], 3, v["patch_size"], v["patch_size"], scale=0.05),
             "visual.class_embedding": r(v["width"]), "visual.positional_embedding": r(grid * grid + 1, v["width"]),
             "visual.proj": r(v["width"], d)}
    for ln in ("visual.ln_pre", "visual.ln_post"):
        state[f"{ln}.weight"], state[f"{ln}.bias"] = 1 + r(v["width"]), r(v["width"])
    for prefix, width, layers in (("transformer.", t["width"], t["layers"]), ("visual.transformer.", v["width"], v["layers"])):
        for i in range(layers):
            b = f"{prefix}resblocks.{i}."
            state.update({b + "attn.in_proj_weight": r(3 * width, width), b + "attn.in_proj_bias": r(3 * width),
                          b + "attn.out_proj.weight": r(width, width), b + "attn.out_proj.bias": r(width),
                          b + "ln_1.weight": 1 + r(width), b + "ln_1.bias": r(width),
                          b + "ln_2.weight": 1 + r(width), b + "ln_2.bias": r(width),
                          b + "mlp.c_fc.weight": r(4 * width, width), b + "mlp.c_fc.bias": r(4 * width),
                          b + "mlp.c_proj.weight": r(width, 4 * width), b + "mlp.c_proj.bias": r(width)})
    return state


def write_open_clip(folder, cfg: dict = OPEN_CLIP_CFG, seed: int = 0) -> str:
    """open_clip's training checkpoint layout: {"epoch", "state_dict"} with DDP's "module." prefix."""
    state = open_clip_state(cfg, seed)
    path = folder / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    (folder / "epoch_1.json").write_text(json.dumps(cfg))
    return str(path)


def _block(x, s, b, heads, mask):
    """One open_clip ResidualAttentionBlock: x + attn(ln_1 x); x + mlp(ln_2 x), QuickGELU."""
    width = x.shape[-1]
    h = F.layer_norm(x, (width,), s[b + "ln_1.weight"], s[b + "ln_1.bias"], 1e-5)
    q, k, v = (h @ s[b + "attn.in_proj_weight"].T + s[b + "attn.in_proj_bias"]).chunk(3, dim=-1)
    split = lambda z: z.unflatten(-1, (heads, width // heads)).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores + mask
    attn = (scores.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)
    x = x + attn @ s[b + "attn.out_proj.weight"].T + s[b + "attn.out_proj.bias"]
    h = F.layer_norm(x, (width,), s[b + "ln_2.weight"], s[b + "ln_2.bias"], 1e-5)
    h = h @ s[b + "mlp.c_fc.weight"].T + s[b + "mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    return x + h @ s[b + "mlp.c_proj.weight"].T + s[b + "mlp.c_proj.bias"]


def open_clip_encode_text(state, ids, cfg: dict = OPEN_CLIP_CFG):
    s = {k: v.double() for k, v in state.items()}
    t = cfg["text_cfg"]
    length = ids.shape[1]
    x = s["token_embedding.weight"][ids] + s["positional_embedding"][:length]
    mask = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(t["layers"]):
        x = _block(x, s, f"transformer.resblocks.{i}.", t["heads"], mask)
    x = F.layer_norm(x, (t["width"],), s["ln_final.weight"], s["ln_final.bias"], 1e-5)
    return F.normalize(x[torch.arange(len(ids)), ids.argmax(-1)] @ s["text_projection"], dim=-1)


def open_clip_encode_image(state, pixels, cfg: dict = OPEN_CLIP_CFG):
    s = {k: v.double() for k, v in state.items()}
    v = cfg["vision_cfg"]
    x = F.conv2d(pixels.double(), s["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    cls = s["visual.class_embedding"].expand(len(x), 1, -1)
    x = torch.cat([cls, x], dim=1) + s["visual.positional_embedding"]
    x = F.layer_norm(x, (v["width"],), s["visual.ln_pre.weight"], s["visual.ln_pre.bias"], 1e-5)
    for i in range(v["layers"]):
        x = _block(x, s, f"visual.transformer.resblocks.{i}.", v["width"] // v["head_width"], None)
    pooled = F.layer_norm(x[:, 0], (v["width"],), s["visual.ln_post.weight"], s["visual.ln_post.bias"], 1e-5)
    return F.normalize(pooled @ s["visual.proj"], dim=-1)
