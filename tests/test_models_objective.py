"""Objective: each part against a plain PyTorch computation of its formula, weighting, stages,
the features helper, and config errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import start_ranks
from tests.model_cases import (
    CAPTIONS,
    make_model,
    media_inputs,
    nli_inputs,
    objective,
    paired_batch,
    text_inputs,
)
from xfast.config import ConfigError, parse
from xfast.models import ObjectiveConfig

N, D = 6, 8



def unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def plain_clip(media, text, scale, eps):
    logits = scale * media @ text.T
    labels = torch.arange(len(media))
    return (F.cross_entropy(logits, labels, label_smoothing=eps)
            + F.cross_entropy(logits.T, labels, label_smoothing=eps)) / 2


def plain_cyclip(media, text, scale):
    # CyCLIP's code: squared differences of scaled logits, mean over N^2, divided by scale^2, times N.
    n = len(media)
    mm, tt, mt = scale * media @ media.T, scale * text @ text.T, scale * media @ text.T
    in_modal = (mm - tt).square().mean() / scale ** 2 * n
    cross_modal = (mt - mt.T).square().mean() / scale ** 2 * n
    return in_modal, cross_modal


def plain_simcse(z1, z2, negatives=None, temperature=0.05, hard_negative_weight=0.0):
    a, p = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    logits = a @ p.T / temperature
    if negatives is not None:
        neg = a @ F.normalize(negatives, dim=-1).T / temperature
        neg = neg + hard_negative_weight * torch.eye(len(a), dtype=a.dtype)
        logits = torch.cat([logits, neg], dim=1)
    return F.cross_entropy(logits, torch.arange(len(a)))


def test_clip_and_cyclip_parts_match_plain_formulas():
    media, text = unit(N, D, seed=0), unit(N, D, seed=1)
    scale = torch.tensor([14.0], dtype=torch.float64)
    obj = objective({"contrastive_weight": 0.7, "label_smoothing": 0.1, "cyclip_lambda1": 0.25,
                     "cyclip_lambda2": 0.5})
    total, parts = obj({"media": media, "text": text}, scale)
    assert set(parts) == {"clip", "cyclip_in", "cyclip_cross", "total"}
    torch.testing.assert_close(parts["clip"], plain_clip(media, text, 14.0, 0.1))
    in_modal, cross_modal = plain_cyclip(media, text, 14.0)
    torch.testing.assert_close(parts["cyclip_in"], in_modal)
    torch.testing.assert_close(parts["cyclip_cross"], cross_modal)
    torch.testing.assert_close(total, 0.7 * parts["clip"] + 0.25 * in_modal + 0.5 * cross_modal)
    assert parts["total"] is total


@pytest.mark.parametrize("embedding", ["pooled", "projected"])
def test_unsup_simcse_parts_match_plain_formula(embedding):
    media, text, view2 = unit(N, D, seed=0), unit(N, D, seed=1), unit(N, D, seed=2)
    pooled, sent_a, sent_b = unit(N, 5, seed=3), unit(N + 2, 5, seed=4), unit(N + 2, 5, seed=5)
    scale = torch.tensor([10.0], dtype=torch.float64)
    obj = objective({"simcse": {"mode": "unsup", "weight": 0.3, "temperature": 0.1, "source": "both",
                                "embedding": embedding}})
    first = text if embedding == "projected" else pooled
    if embedding == "pooled":
        view2 = unit(N, 5, seed=2)
    feats = {"media": media, "text": text, "text_pooled": pooled, "text_view2": view2,
             "sent_a": sent_a, "sent_b": sent_b}
    total, parts = obj(feats, scale)
    torch.testing.assert_close(parts["simcse_captions"], plain_simcse(first, view2, temperature=0.1))
    torch.testing.assert_close(parts["simcse_sentences"], plain_simcse(sent_a, sent_b, temperature=0.1))
    torch.testing.assert_close(parts["simcse"], (parts["simcse_captions"] + parts["simcse_sentences"]) / 2)
    torch.testing.assert_close(total, plain_clip(media, text, 10.0, 0.0) + 0.3 * parts["simcse"])


def test_sup_simcse_matches_plain_formula_with_hard_negative_weight():
    anchor, positive, negative = unit(N, D, seed=0), unit(N, D, seed=1), unit(N, D, seed=2)
    obj = objective({"simcse": {"mode": "sup", "hard_negative_weight": 0.5}})
    feats = {"media": unit(N, 4, seed=3), "text": unit(N, 4, seed=4), "nli_anchor": anchor,
             "nli_positive": positive, "nli_negative": negative}
    total, parts = obj(feats, torch.tensor([5.0], dtype=torch.float64))
    torch.testing.assert_close(parts["simcse"], plain_simcse(anchor, positive, negative, 0.05, 0.5))
    assert set(parts) == {"clip", "simcse", "total"}


def test_objective_gradients_match_plain_formula():
    media, text = unit(N, D, seed=0).requires_grad_(), unit(N, D, seed=1).requires_grad_()
    scale = torch.tensor([12.0], dtype=torch.float64, requires_grad=True)
    obj = objective({"cyclip_lambda1": 0.25, "cyclip_lambda2": 0.25})
    total, _ = obj({"media": media, "text": text}, scale)
    got = torch.autograd.grad(total, (media, text, scale))
    in_modal, cross_modal = plain_cyclip(media, text, 12.0)
    expected = torch.autograd.grad(plain_clip(media, text, scale, 0.0) + 0.25 * in_modal + 0.25 * cross_modal,
                                   (media, text, scale))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_sequential_schedule_stages(tok):
    obj = objective({"cyclip_lambda1": 0.25, "simcse": {"mode": "sup", "schedule": "sequential",
                                                        "stage1_steps": 3}})
    assert [obj.stage(s) for s in (0, 2, 3, 10)] == ["sentence", "sentence", "cross_modal", "cross_modal"]
    assert obj.required_features(0) == ("nli_anchor", "nli_positive", "nli_negative")
    assert obj.required_features(3) == ("media", "text")
    with pytest.raises(ValueError, match="sequential' needs the optimizer step"):
        obj.stage(None)
    model = make_model(tok).train()
    feats = model.features(None, objective=obj, step=0, nli=nli_inputs(model))
    assert set(feats) == {"nli_anchor", "nli_positive", "nli_negative"}
    total, parts = obj(feats, None, step=0)
    assert set(parts) == {"simcse", "total"}
    torch.testing.assert_close(total, parts["simcse"])
    feats = model.features(paired_batch(model), objective=obj, step=3)
    assert set(feats) == {"media", "text"}
    _, parts = obj(feats, model.scale(), step=3)
    assert set(parts) == {"clip", "cyclip_in", "total"}


def test_plan_names_the_streams_and_features_of_each_step(tok):
    obj = objective({"simcse": {"mode": "unsup", "source": "both", "schedule": "sequential", "stage1_steps": 2}})
    first, later = obj.plan(0), obj.plan(2)
    assert (first.stage, first.streams, first.features) == (
        "sentence", ("pairs", "sentences"), ("text_view2", "text_pooled", "sent_a", "sent_b"))
    assert (later.stage, later.streams, later.features) == ("cross_modal", ("pairs",), ("media", "text"))
    assert objective({"simcse": {"mode": "sup"}}).plan(0).streams == ("pairs", "nli")
    assert objective({"contrastive_weight": 0, "simcse": {"mode": "sup"}}).plan(0).streams == ("nli",)
    # A plan handed over gives what the step would compute from `step`.
    model = make_model(tok).train()
    batch, sentences = paired_batch(model), text_inputs(model, CAPTIONS[:4])
    torch.manual_seed(0)
    by_step = model.features(batch, objective=obj, step=0, sentences=sentences)
    torch.manual_seed(0)
    by_plan = model.features(batch, plan=first, sentences=sentences)
    assert set(by_plan) == set(first.features)
    for key in by_step:
        torch.testing.assert_close(by_plan[key], by_step[key], rtol=0, atol=0)
    total, _ = obj(by_step, None, step=0)
    torch.testing.assert_close(obj(by_plan, None, plan=first)[0], total, rtol=0, atol=0)


def test_text_only_objective_needs_no_media(tok):
    obj = objective({"contrastive_weight": 0.0, "simcse": {"mode": "unsup", "source": "sentences"}})
    assert obj.needs_sentences and not obj.needs_nli
    model = make_model(tok).train()
    feats = model.features(None, objective=obj, sentences=text_inputs(model, CAPTIONS[:6]))
    assert set(feats) == {"sent_a", "sent_b"} and feats["sent_a"].shape == (6, 32)
    total, parts = obj(feats)
    assert set(parts) == {"simcse_sentences", "simcse", "total"}
    total.backward()
    assert model.text.backbone.embeddings.word_embeddings.weight.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize("embedding", ["pooled", "projected"])
def test_features_keys_and_spaces(tok, embedding):
    model = make_model(tok).train()
    obj = objective({"simcse": {"mode": "unsup", "source": "captions", "embedding": embedding}})
    feats = model.features(paired_batch(model), objective=obj)
    expected = {"media", "text", "text_view2"} | ({"text_pooled"} if embedding == "pooled" else set())
    assert set(feats) == expected
    assert feats["text_view2"].shape == ((4, 32) if embedding == "pooled" else (4, 16))
    obj(feats, model.scale())[0].backward()
    sup = objective({"simcse": {"mode": "sup", "embedding": embedding}})
    feats = model.features(paired_batch(model), objective=sup, nli=nli_inputs(model))
    assert feats["nli_negative"].shape == ((4, 32) if embedding == "pooled" else (4, 16))


def test_features_of_micro_batches_concatenate_to_the_whole_batch(tok):
    model = make_model(tok, media="audio", media_type="htsat").eval()
    obj = objective({"simcse": {"mode": "unsup"}})
    batch = paired_batch(model)
    whole = model.features(batch, objective=obj)
    halves = [model.features({k: v[i:i + 2] for k, v in batch.items()}, objective=obj) for i in (0, 2)]
    for key in whole:
        torch.testing.assert_close(torch.cat([h[key] for h in halves]), whole[key], atol=1e-5, rtol=1e-5)
    total, _ = obj({k: torch.cat([h[k] for h in halves]) for k in whole}, model.scale())
    torch.testing.assert_close(total, obj(whole, model.scale())[0], atol=1e-5, rtol=1e-5)


def test_missing_inputs_are_named(tok):
    model = make_model(tok)
    sup = objective({"simcse": {"mode": "sup"}})
    with pytest.raises(ValueError, match="needs the 'nli' input"):
        model.features(paired_batch(model), objective=sup)
    nli = nli_inputs(model)
    del nli["negative_attention_mask"]
    with pytest.raises(ValueError, match="nli lacks negative_attention_mask"):
        model.features(paired_batch(model), objective=sup, nli=nli)
    with pytest.raises(ValueError, match="needs the 'batch' input"):
        model.features(None)
    with pytest.raises(ValueError, match="features lack nli_anchor, nli_positive, nli_negative"):
        sup({"media": torch.randn(4, 8), "text": torch.randn(4, 8)}, torch.tensor([10.0]))
    with pytest.raises(ValueError, match="needs logit_scale"):
        objective()({"media": torch.randn(4, 8), "text": torch.randn(4, 8)})
    with pytest.raises(ValueError, match="batch size"):
        objective()({"media": torch.randn(4, 8), "text": torch.randn(3, 8)}, torch.tensor([10.0]))
    with pytest.raises(ValueError, match="pixel_values has 3 rows but input_ids has 4"):
        model.features({**text_inputs(model), **media_inputs(model, batch=3)}, objective=objective())
    with pytest.raises(TypeError, match="xfast.models.Objective"):
        model.features(paired_batch(model), objective={"simcse": {}})


@pytest.mark.parametrize("raw,message", [
    ({"simcse": {"mode": "unsup", "schedule": "sequential"}}, r"objective\.simcse\.stage1_steps: .*>= 1"),
    ({"simcse": {"mode": "unsup", "stage1_steps": 5}}, r"objective\.simcse\.stage1_steps: only applies"),
    ({"simcse": {"mode": "unsup", "hard_negative_weight": 1.0}}, r"objective\.simcse\.hard_negative_weight"),
    ({"simcse": {"mode": "sup", "source": "both"}}, r"objective\.simcse\.source: only applies to mode 'unsup'"),
    ({"simcse": {"mode": "semi"}}, r"objective\.simcse\.mode: 'semi' is not allowed; choose one of 'none'"),
    ({"simcse": {"mode": "unsup", "temperature": 0}}, r"objective\.simcse\.temperature: must be positive"),
    ({"label_smoothing": 1.0}, r"objective\.label_smoothing"),
    ({"cyclip_lambda1": -1}, r"objective\.cyclip_lambda1: must be a finite number >= 0"),
    ({"contrastive_weight": 0}, r"objective: nothing to train"),
    ({"contrastive_weight": 0, "simcse": {"mode": "sup", "schedule": "sequential", "stage1_steps": 2}},
     r"objective\.contrastive_weight: schedule 'sequential' needs a cross-modal stage"),
    ({"simcse": {"mode": "unsup", "lambda_se": 1}}, r"objective\.simcse\.lambda_se: unknown key"),
])
def test_objective_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse(ObjectiveConfig, raw, "objective")


@pytest.mark.slow
def test_nli_features_equal_per_part_embeddings(tok):
    model = make_model(tok).eval()
    sup = objective({"simcse": {"mode": "sup"}})
    nli = nli_inputs(model)
    # positives padded to another length take the per-part path
    longer = text_inputs(model, CAPTIONS[1:5], length=16)
    for triplets in (nli, {**nli, "positive_input_ids": longer["input_ids"],
                           "positive_attention_mask": longer["attention_mask"]}):
        feats = model.features(paired_batch(model), objective=sup, nli=triplets)
        for part in ("anchor", "positive", "negative"):
            expected = model.sentence_embedding(triplets[f"{part}_input_ids"], triplets[f"{part}_attention_mask"])
            torch.testing.assert_close(feats[f"nli_{part}"], expected, atol=1e-5, rtol=1e-5)


GROUP_CONFIGS = [
    {"contrastive_weight": 0.7, "label_smoothing": 0.1, "cyclip_lambda1": 0.25, "cyclip_lambda2": 0.5,
     "simcse": {"mode": "unsup", "weight": 0.3, "temperature": 0.1, "source": "both", "embedding": "pooled"}},
    {"simcse": {"mode": "sup", "hard_negative_weight": 0.5, "weight": 0.4}},
]
# Rows per rank of each feature stream: uneven across ranks, and different between streams.
GROUP_ROWS = {"media": (4, 2), "text": (4, 2), "text_pooled": (4, 2), "text_view2": (4, 2), "sent_a": (5, 3),
              "sent_b": (5, 3), "nli_anchor": (1, 4), "nli_positive": (1, 4), "nli_negative": (1, 4)}


def group_inputs():
    feats = {k: unit(sum(rows), 8, seed=i) for i, (k, rows) in enumerate(GROUP_ROWS.items())}
    return feats, torch.tensor([11.0], dtype=torch.float64)


def _objective_rank_worker(rank, store, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    feats, scale = group_inputs()
    results = []
    for raw in GROUP_CONFIGS:
        local = {k: v.split(GROUP_ROWS[k])[rank].clone().requires_grad_() for k, v in feats.items()}
        local_scale = scale.clone().requires_grad_()
        total, parts = objective(raw)(local, local_scale, group=torch.distributed.group.WORLD)
        grads = torch.autograd.grad(total, [*local.values(), local_scale], allow_unused=True)
        results.append({"parts": {k: v.detach() for k, v in parts.items()},
                        "grads": dict(zip([*local, "scale"], grads))})
    torch.save(results, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.multiprocess
def test_objective_over_a_group_equals_the_single_process_one(tmp_path):
    """Two ranks with uneven rows (and streams of different lengths) give the global loss on every
    rank, and gradients that average over ranks (DDP/DeepSpeed) to the single-process ones."""
    out = str(tmp_path / "objective")
    start_ranks(_objective_rank_worker, (str(tmp_path / "store"), out), 2)
    per_rank = [torch.load(f"{out}.{rank}") for rank in range(2)]
    feats, scale = group_inputs()
    for index, raw in enumerate(GROUP_CONFIGS):
        leaves = {k: v.clone().requires_grad_() for k, v in feats.items()}
        ref_scale = scale.clone().requires_grad_()
        total, parts = objective(raw)(leaves, ref_scale)
        expected = dict(zip([*leaves, "scale"], torch.autograd.grad(total, [*leaves.values(), ref_scale],
                                                                    allow_unused=True)))
        for rank in range(2):
            got = per_rank[rank][index]
            assert set(got["parts"]) == set(parts)
            for name, value in parts.items():
                torch.testing.assert_close(got["parts"][name], value.detach(), msg=f"{index}: {name}")
            for name, grad in expected.items():
                if name == "scale" or grad is None:
                    continue
                # grad_reduction="mean": W times this rank's slice of the single-process gradient.
                torch.testing.assert_close(got["grads"][name], 2 * grad.split(GROUP_ROWS[name])[rank],
                                           msg=f"{index}: {name}")
        if expected["scale"] is None:
            assert all(per_rank[r][index]["grads"]["scale"] is None for r in range(2))
        else:  # each rank holds W times its share: the average over ranks is the whole gradient
            average = sum(per_rank[r][index]["grads"]["scale"] for r in range(2)) / 2
            torch.testing.assert_close(average, expected["scale"])
        unused = [k for k, g in expected.items() if g is None]
        assert all(per_rank[r][index]["grads"][k] is None for r in range(2) for k in unused)
