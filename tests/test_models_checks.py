"""Data-value checks of the towers: same messages, one device-to-host read per features() call."""
from __future__ import annotations

import pytest
import torch

from tests.model_cases import make_model, nli_inputs, objective, paired_batch
from xfast._checks import DeferredChecks
from xfast.models.specs import _pool_text


class Reads:
    """Counts DeferredChecks reads and their flags, and bool(tensor) calls (each a host sync on a GPU)."""

    def __init__(self, monkeypatch):
        self.reads, self.flags, self.bools = 0, [], 0
        problem, to_bool = DeferredChecks.problem, torch.Tensor.__bool__

        def counted_problem(checks):
            self.reads += 1
            self.flags.append(list(checks._messages))
            return problem(checks)

        def counted_bool(t):
            self.bools += 1
            return to_bool(t)

        monkeypatch.setattr(DeferredChecks, "problem", counted_problem)
        monkeypatch.setattr(torch.Tensor, "__bool__", counted_bool)


def bad(batch: dict, key: str, value) -> dict:
    out = dict(batch)
    out[key] = value
    return out


@pytest.mark.parametrize("media,media_type,key", [("image", "vit", "pixel_values"), ("audio", "htsat", "input_features")])
def test_features_read_every_value_check_once(tok, monkeypatch, media, media_type, key):
    model = make_model(tok, text={"pooling": "eos"}, media=media, media_type=media_type)
    batch = paired_batch(model)
    counter = Reads(monkeypatch)
    model.text.check_inputs(DeferredChecks(), **{k: batch[k] for k in ("input_ids", "attention_mask")})
    model.media.check_inputs(DeferredChecks(), **{key: batch[key]})
    assert counter.bools == 0 and counter.reads == 0  # the checks themselves never wait for the device
    model.features(batch)
    assert counter.reads == 1
    assert counter.flags == [[f"{key} contains NaN or inf",  # media first, then text, as features() encodes them
                              "attention_mask has a row with no tokens",
                              "eos pooling needs right-padded input (attention_mask rows of 1s then 0s)"]]


def test_supervised_simcse_step_reads_once(tok, monkeypatch):
    model = make_model(tok)
    obj = objective({"simcse": {"mode": "sup", "schedule": "joint"}})
    counter = Reads(monkeypatch)
    feats = model.features(paired_batch(model), objective=obj, nli=nli_inputs(model))
    assert {"nli_anchor", "media", "text"} <= set(feats)
    assert counter.reads == 1 and len(counter.flags[0]) == 5  # media + text + 3 NLI parts


@pytest.mark.parametrize("media,media_type,key", [("image", "vit", "pixel_values"), ("audio", "htsat", "input_features")])
def test_features_refuse_bad_values_with_the_checks_messages(tok, media, media_type, key):
    model = make_model(tok, text={"pooling": "eos"}, media=media, media_type=media_type)
    batch = paired_batch(model)
    nan_media = batch[key].clone()
    nan_media[1, 0, 2, 3] = float("nan")
    inf_media = batch[key].clone()
    inf_media[-1, 0, -1, -1] = -float("inf")
    empty_row = batch["attention_mask"].clone()
    empty_row[2] = 0
    left_padded = batch["attention_mask"].flip(1)
    cases = [(bad(batch, key, nan_media), f"{key} contains NaN or inf"),
             (bad(batch, key, inf_media), f"{key} contains NaN or inf"),
             (bad(batch, "attention_mask", empty_row), "attention_mask has a row with no tokens"),
             (bad(batch, "attention_mask", left_padded), r"eos pooling needs right-padded input")]
    for inputs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.features(inputs)
    # Media are encoded first: with both problems, the media's is named (as before the checks were deferred).
    with pytest.raises(ValueError, match=f"{key} contains NaN"):
        model.features(bad(bad(batch, key, nan_media), "attention_mask", empty_row))


def test_a_refused_batch_leaves_no_gradient(tok):
    # The check is read before features() returns: no loss, so nothing reaches the optimizer or a checkpoint.
    model = make_model(tok)
    batch = paired_batch(model)
    batch["pixel_values"] = batch["pixel_values"].clone()
    batch["pixel_values"][0] = float("nan")
    with pytest.raises(ValueError, match="pixel_values contains NaN or inf"):
        model.features(batch)
    assert all(p.grad is None for p in model.parameters())


def test_deferred_checks_name_the_problem_when_the_work_breaks_first():
    checks = DeferredChecks()
    with pytest.raises(ValueError, match="rows are empty") as info:
        with checks.consuming():
            checks.add(torch.tensor([False, True]), "rows are empty")
            raise IndexError("index -1 is out of bounds")
    assert isinstance(info.value.__cause__, IndexError)
    # No problem flagged: the original error propagates unchanged.
    with pytest.raises(IndexError):
        with checks.consuming():
            checks.add(torch.tensor(False), "rows are empty")
            raise IndexError("index -1 is out of bounds")
    # The first problem added wins; flags are cleared after a read.
    checks.add(torch.tensor(False), "a")
    checks.add(torch.tensor([True]), "b")
    checks.add(torch.tensor(True), "c")
    with pytest.raises(ValueError, match="^b$"):
        checks.read()
    checks.read()  # nothing pending


def test_eos_pooling_of_an_empty_row_stays_in_bounds(tok):
    # Unclamped, the empty row's index is -1: an IndexError on CPU, a device-side assert on CUDA
    # (which kills the context) before the deferred check naming the row is read.
    hidden = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])

    class Backbone:
        def __call__(self, input_ids, attention_mask):
            return type("Out", (), {"last_hidden_state": hidden})()

    pooled = _pool_text(Backbone(), {"input_ids": mask, "attention_mask": mask}, "eos")
    torch.testing.assert_close(pooled, torch.stack([hidden[0, 2], hidden[1, 0], hidden[2, 4]]), rtol=0, atol=0)
    model = make_model(tok, text={"pooling": "eos"})
    batch = paired_batch(model)
    batch["attention_mask"] = batch["attention_mask"].clone()
    batch["attention_mask"][1] = 0
    with pytest.raises(ValueError, match="attention_mask has a row with no tokens") as info:
        model.features(batch)
    assert info.value.__cause__ is None  # named by the check itself, not by a forward that broke


def test_a_structural_error_is_not_relabelled_as_a_data_problem(tok):
    # NaN media are flagged (deferred) before the NLI inputs are looked at: the missing key is the
    # error the caller must see, not the media's problem.
    model = make_model(tok)
    obj = objective({"simcse": {"mode": "sup", "schedule": "joint"}})
    batch = paired_batch(model)
    batch["pixel_values"] = batch["pixel_values"].clone()
    batch["pixel_values"][0] = float("nan")
    nli = nli_inputs(model)
    del nli["negative_attention_mask"]
    with pytest.raises(ValueError, match="nli lacks negative_attention_mask"):
        model.features(batch, objective=obj, nli=nli)
