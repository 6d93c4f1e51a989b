"""Whole-batch (GradCache) accumulation through DeepSpeed equals one big-batch torch step."""
import math
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip("deepspeed")

import xfast  # noqa: E402
from tests.dist_utils import start_ranks  # noqa: E402
from xfast.training.accumulation import whole_batch_step  # noqa: E402
from xfast.training.engine import WarmupCosine, deepspeed_config, init_distributed, param_groups  # noqa: E402


class Tower(nn.Module):
    def __init__(self, dim_in):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, 16)
        self.norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(0.3)  # dropout makes the RNG replay of pass 2 matter
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        return nn.functional.normalize(self.fc2(self.drop(torch.relu(self.norm(self.fc1(x))))), dim=-1)


class TwoTowers(nn.Module):
    """Returns (per_sample, shared) like the trainer's task module."""

    def __init__(self):
        super().__init__()
        self.text = Tower(5)
        self.image = Tower(7)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(10.0)))

    def forward(self, batch):
        features = {"text": self.text(batch["x"]), "image": self.image(batch["y"])}
        if "s1" in batch:  # an extra sentence stream (two views) with its own row count
            features.update(sent_a=self.text(batch["s1"]), sent_b=self.text(batch["s2"]))
        return features, {"scale": self.logit_scale.exp()}


def clip_objective(features, shared, group=None):
    """CLIP loss, plus SimCSE on the sentence stream when there is one."""
    loss = xfast.clip_loss(features["text"], features["image"], shared["scale"], group=group)
    if "sent_a" not in features:
        return loss, {"clip": loss}
    simcse = xfast.simcse_loss(features["sent_a"], features["sent_b"], temperature=0.1, group=group)
    return loss + 0.5 * simcse, {"clip": loss, "simcse": simcse}


@pytest.fixture(scope="module", autouse=True)
def process_group():
    init_distributed()


@pytest.mark.slow
@pytest.mark.parametrize("stage, micro_batches", [(0, 3), (2, 3), (3, 3), (2, 1), (3, 1)])
def test_whole_batch_gradient_matches_one_big_batch(stage, micro_batches):
    torch.manual_seed(0)
    model = TwoTowers()
    reference = TwoTowers()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(12, 5), torch.randn(12, 7)
    size = 12 // micro_batches
    micro = [{"x": x[i:i + size], "y": y[i:i + size]} for i in range(0, 12, size)]
    config = deepspeed_config(micro_batch_size=size, accumulation_steps=micro_batches, world_size=1,
                              zero_stage=stage, precision="fp32", gradient_clipping=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.0),
                                      config=config)
    grads = {}
    rng = torch.get_rng_state()
    steps_before = engine.global_steps
    original_step = engine.step

    def step_and_capture():  # the accumulated gradient, just before the optimizer step
        if engine.is_gradient_accumulation_boundary():
            for name, param in engine.module.named_parameters():
                grads[name] = deepspeed.utils.safe_get_full_grad(param).clone()
        original_step()

    engine.step = step_and_capture
    loss, parts, shared = whole_batch_step(engine, micro, clip_objective)
    assert engine.global_steps == steps_before + 1

    # Reference: one forward over all 12 samples with the same dropout masks (the masks are
    # drawn per micro-batch from the same RNG stream), one loss, one backward.
    torch.set_rng_state(rng)
    outs = [reference({"x": b["x"], "y": b["y"]}) for b in micro]
    feats = {k: torch.cat([o[0][k] for o in outs]) for k in ("text", "image")}
    ref_loss = xfast.clip_loss(feats["text"], feats["image"], outs[0][1]["scale"])
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(parts["clip"], ref_loss.detach())
    torch.testing.assert_close(shared["scale"], torch.full((1,), 10.0))
    for name, param in reference.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)


class AveragingEngine:
    """The engine interface whole_batch_step uses, doing what DeepSpeed's data parallelism does:
    accumulate over micro-batches, then average gradients over ranks at the boundary."""

    def __init__(self, module, accumulation_steps):
        self.module, self.accumulation_steps, self.micro_steps = module, accumulation_steps, 0
        self.averaged = None

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss, scale_wrt_gas=True):
        assert scale_wrt_gas is False
        loss.backward()

    def step(self):
        self.micro_steps += 1
        if self.micro_steps % self.accumulation_steps == 0:
            world = torch.distributed.get_world_size()
            for param in self.module.parameters():
                torch.distributed.all_reduce(param.grad)
                param.grad /= world
            self.averaged = {n: p.grad.clone() for n, p in self.module.named_parameters()}


def two_rank_inputs(pair_rows, sentence_rows):
    torch.manual_seed(0)
    model = TwoTowers().eval()  # no dropout: ranks draw different masks than one process would
    inputs = {"x": torch.randn(sum(pair_rows), 5), "y": torch.randn(sum(pair_rows), 7)}
    rows = dict.fromkeys(inputs, pair_rows)
    if sentence_rows:
        inputs.update(s1=torch.randn(sum(sentence_rows), 5), s2=torch.randn(sum(sentence_rows), 5))
        rows.update(s1=sentence_rows, s2=sentence_rows)
    return model, inputs, rows


def _two_rank_worker(rank, store, micro_batches, pair_rows, sentence_rows, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model, inputs, rows = two_rank_inputs(pair_rows, sentence_rows)
    mine = {k: v.split(rows[k])[rank].tensor_split(micro_batches) for k, v in inputs.items()}
    micro = [{k: chunks[i] for k, chunks in mine.items()} for i in range(micro_batches)]
    engine = AveragingEngine(model, micro_batches)
    loss, _, _ = whole_batch_step(engine, micro, clip_objective)
    torch.save({"loss": loss, "grads": engine.averaged}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("micro_batches, pair_rows, sentence_rows",
                         [(1, (8, 8), None), (2, (8, 8), None), (1, (10, 6), (3, 7)), (2, (10, 6), (3, 7))])
@pytest.mark.multiprocess
def test_two_ranks_average_to_the_whole_batch_gradient(tmp_path, micro_batches, pair_rows, sentence_rows):
    """Each rank computes the distributed loss on its own rows (uneven across ranks, and an extra
    stream with other row counts); after DeepSpeed-style averaging the gradient equals one process
    computing the loss over all samples."""
    out = tmp_path / "grads.pt"
    start_ranks(_two_rank_worker, (str(tmp_path / "store"), micro_batches, pair_rows, sentence_rows, str(out)), 2)
    result, other_rank = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    reference, inputs, _ = two_rank_inputs(pair_rows, sentence_rows)
    features, shared = reference(inputs)
    loss, _ = clip_objective(features, shared)
    loss.backward()
    torch.testing.assert_close(result["loss"], loss.detach())
    torch.testing.assert_close(other_rank["loss"], loss.detach())  # every rank reports the global loss
    for name, param in reference.named_parameters():
        torch.testing.assert_close(result["grads"][name], param.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_whole_batch_differs_from_independent_micro_losses():
    """Sanity of the reference: k small losses give a different gradient (so the test above can fail)."""
    torch.manual_seed(1)
    model = TwoTowers().eval()
    x, y = torch.randn(8, 5), torch.randn(8, 7)
    feats, shared = model({"x": x, "y": y})
    whole = torch.autograd.grad(xfast.clip_loss(feats["text"], feats["image"], shared["scale"]),
                                model.text.fc1.weight, retain_graph=True)[0]
    small = sum(torch.autograd.grad(xfast.clip_loss(feats["text"][i:i + 4], feats["image"][i:i + 4],
                                                    shared["scale"]) / 2, model.text.fc1.weight,
                                    retain_graph=True)[0] for i in (0, 4))
    assert not torch.allclose(whole, small, atol=1e-4)


def test_bad_model_output_is_named():
    class Bad(TwoTowers):
        def forward(self, batch):
            out, shared = super().forward(batch)
            out["text"] = out["text"].sum()
            return out, shared

    model = Bad()
    config = deepspeed_config(micro_batch_size=4, accumulation_steps=1, world_size=1, zero_stage=0,
                              precision="fp32", gradient_clipping=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.0),
                                      config=config)
    with pytest.raises(ValueError, match="feature 'text' must be a \\[rows, ...\\] tensor"):
        whole_batch_step(engine, [{"x": torch.randn(4, 5), "y": torch.randn(4, 7)}], clip_objective)


def test_param_groups_decay_and_tower_lr():
    model = TwoTowers()
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.1, tower_lr={"text": 1e-4})}
    assert set(groups) == {"text", "text/no_decay", "default", "default/no_decay"}
    assert groups["text"]["names"] == ["text.fc1.weight", "text.fc2.weight"]
    assert groups["text"]["lr"] == 1e-4 and groups["text"]["weight_decay"] == 0.1
    assert set(groups["text/no_decay"]["names"]) == {"text.fc1.bias", "text.norm.weight", "text.norm.bias",
                                                      "text.fc2.bias"}
    assert groups["text/no_decay"]["weight_decay"] == 0.0
    assert "logit_scale" in groups["default/no_decay"]["names"]
    assert groups["default"]["lr"] == 1e-3
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == len(list(model.parameters()))


def test_tower_lr_prefix_must_exist():
    from xfast.config import ConfigError
    with pytest.raises(ConfigError, match="train.tower_lr.audio: no parameter"):
        param_groups(TwoTowers(), lr=1e-3, weight_decay=0.1, tower_lr={"audio": 1e-4})


def test_warmup_cosine_schedule():
    schedule = WarmupCosine(warmup=4, total=14, floor=0.1)
    factors = [schedule(s) for s in range(16)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factors[4] == pytest.approx(1.0)
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5)
    assert factors[14] == pytest.approx(0.1) and factors[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
