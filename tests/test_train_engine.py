"""The DeepSpeed config xfast builds: its speed defaults leave every step's arithmetic unchanged,
and a user's explicit keys win."""
import math
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip("deepspeed")

import xfast  # noqa: E402
from tests.dist_utils import run_ranks  # noqa: E402
from xfast.training.accumulation import whole_batch_step  # noqa: E402
from xfast.training.engine import (  # noqa: E402
    ZERO_SPEED_DEFAULTS,
    adamw,
    build_engine,
    clip_like_deepspeed,
    deepspeed_config,
)

# What DeepSpeed itself uses for the keys xfast sets (deepspeed.runtime.zero.config, 0.19).
DEEPSPEED_OWN = {"contiguous_gradients": True, "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000}


def test_speed_defaults_are_deepspeed_keys_and_a_users_keys_win():
    assert set(ZERO_SPEED_DEFAULTS) <= set(DEEPSPEED_OWN)
    common = dict(micro_batch_size=4, accumulation_steps=1, world_size=1, precision="fp32", gradient_clipping=1.0)
    assert deepspeed_config(zero_stage=2, **common)["zero_optimization"] == {"stage": 2, **ZERO_SPEED_DEFAULTS}
    for stage in (0, 1, 3):  # measured and tested at stage 2 only
        assert deepspeed_config(zero_stage=stage, **common)["zero_optimization"] == {"stage": stage}
    assert deepspeed_config(zero_stage=2, device_type="cuda", **common)["zero_optimization"] == {"stage": 2}
    mine = {"contiguous_gradients": True, "overlap_comm": True}
    zero = deepspeed_config(zero_stage=2, extra={"zero_optimization": mine}, **common)["zero_optimization"]
    assert zero == {**ZERO_SPEED_DEFAULTS, "stage": 2, **mine}
    # and the result parses as a DeepSpeed config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    parsed = DeepSpeedZeroConfig(**zero)
    assert parsed.contiguous_gradients is True and parsed.overlap_comm is True
    # no throughput timer (it synchronizes the device twice a step); a user's setting wins
    from deepspeed.utils.config import get_timers_config
    assert get_timers_config(deepspeed_config(zero_stage=2, **common)).enabled is False
    mine = {"timers": {"throughput": {"enabled": True}}}
    assert get_timers_config(deepspeed_config(zero_stage=2, extra=mine, **common)).enabled is True
    mine = {"timers": {"throughput": {"synchronized": False}}}  # merged key by key: still off
    timers = get_timers_config(deepspeed_config(zero_stage=2, extra=mine, **common))
    assert timers.enabled is False and timers.synchronized is False


class Towers(nn.Module):
    def __init__(self):
        super().__init__()
        self.text = nn.Sequential(nn.Linear(5, 24), nn.LayerNorm(24), nn.Dropout(0.2), nn.GELU(), nn.Linear(24, 8))
        self.image = nn.Sequential(nn.Linear(7, 24), nn.LayerNorm(24), nn.Dropout(0.2), nn.GELU(), nn.Linear(24, 8))
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(10.0)))

    def forward(self, batch):
        features = {"text": nn.functional.normalize(self.text(batch["x"]), dim=-1),
                    "image": nn.functional.normalize(self.image(batch["y"]), dim=-1)}
        return features, {"scale": self.logit_scale.exp()}


def _objective(features, shared, group=None):
    loss = xfast.clip_loss(features["text"], features["image"], shared["scale"], group=group)
    return loss, {"clip": loss}


def _train(rank: int, world: int, stage: int, deepspeeds_own: bool, accumulation: int) -> dict[str, torch.Tensor]:
    """Three optimizer steps of the same model on the same data, in the engine the trainer builds
    (or with DeepSpeed's own settings and clipping); the weights after them."""
    torch.manual_seed(0)
    model = Towers()
    config = deepspeed_config(micro_batch_size=6, accumulation_steps=accumulation, world_size=world, zero_stage=stage,
                              precision="fp32", gradient_clipping=0.05,  # small: the clipping acts on every step
                              extra={"zero_optimization": DEEPSPEED_OWN} if deepspeeds_own and stage == 2 else {})
    engine = build_engine(model, ds_config=config, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6,
                          tower_lr={}, warmup_steps=1, total_steps=10, min_lr_ratio=0.0)
    if deepspeeds_own and stage == 0:
        del engine.clip_fp32_gradients  # back to DeepSpeed's method
    torch.manual_seed(1 + rank)
    for _ in range(3):
        micro = [{"x": torch.randn(6, 5), "y": torch.randn(6, 7)} for _ in range(accumulation)]
        whole_batch_step(engine, micro, _objective)
    return {name: param.detach().clone() for name, param in engine.module.named_parameters()}


def _init_deepspeed():
    import deepspeed.ops
    os.environ["LOCAL_RANK"] = os.environ["RANK"]  # as a launcher sets it (run_ranks sets RANK)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build: plain gloo is enough here
    deepspeed.init_distributed(verbose=False)


def _compare_on_ranks(rank: int, world: int, stage: int, accumulation: int) -> None:
    _init_deepspeed()
    fast = _train(rank, world, stage, False, accumulation)
    own = _train(rank, world, stage, True, accumulation)
    for name, value in own.items():
        # Bit for bit: the settings only move where gradients wait before the same elementwise
        # reduction, the same norm and the same AdamW update.
        assert torch.equal(fast[name], value), (rank, name, (fast[name] - value).abs().max())


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("world, accumulation", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_xfasts_engine_trains_bit_for_bit_like_deepspeeds_own(stage, world, accumulation):
    run_ranks(world, _compare_on_ranks, stage, accumulation)


def _clip_cases(rank: int, world: int) -> None:
    from deepspeed.runtime.utils import clip_grad_norm_
    _init_deepspeed()
    torch.manual_seed(rank)
    grads = [torch.randn(shape) * 0.3 for shape in ((33, 7), (7,), (1,), (0,), (5, 5))]

    def parameters():  # fresh parameters holding the unclipped gradients, and one without a gradient
        params = [nn.Parameter(torch.zeros(g.shape)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        return params + [nn.Parameter(torch.zeros(3))]

    for max_norm in (1e-3, 1.0, 1e6):  # clipping hard, about the norm, not at all
        theirs, mine = parameters(), parameters()
        clip_grad_norm_(theirs, max_norm)
        clip_like_deepspeed(mine, max_norm)
        for p, q in zip(mine[:-1], theirs[:-1]):
            assert torch.equal(p.grad, q.grad), (max_norm, (p.grad - q.grad).abs().max())
        assert mine[-1].grad is None
        if max_norm == 1e-3:
            assert not torch.equal(mine[0].grad, grads[0])


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [1, 2])
def test_clip_like_deepspeed_equals_deepspeeds_clip_grad_norm(world):
    run_ranks(world, _clip_cases)


def test_adamw_is_fused_where_torch_has_the_kernel_else_foreach():
    def kernels(module, device_type=None):
        optimizer = adamw(module, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, device_type=device_type)
        return {(bool(g["fused"]), bool(g["foreach"])) for g in optimizer.param_groups}

    assert kernels(Towers()) == {(True, False)}
    assert kernels(Towers().to(torch.float64)) == {(True, False)}
    assert kernels(Towers().to("meta")) == {(False, True)}  # a device without torch's fused kernel
    # built on the CPU, trained where DeepSpeed moves it: the kernel is chosen for that device
    assert kernels(Towers(), device_type="cuda") == {(True, False)}
    assert kernels(Towers(), device_type="xpu") == {(False, True)}


def _stage_steps(rank: int, world: int, stage: int) -> None:
    """ZeRO hands the optimizer its flat fp32 partitions: torch's fused AdamW must run on them,
    and give what the same fused AdamW gives on the plain model's own parameters."""
    _init_deepspeed()
    torch.manual_seed(0)
    model = Towers()
    reference = Towers()
    reference.load_state_dict(model.state_dict())
    config = deepspeed_config(micro_batch_size=6, accumulation_steps=1, world_size=world, zero_stage=stage,
                              precision="fp32", gradient_clipping=0.0)
    optim = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    engine = build_engine(model, ds_config=config, tower_lr={}, warmup_steps=0, total_steps=10, min_lr_ratio=1.0, **optim)
    plain = adamw(reference, **optim)
    kernel = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    assert all(g["fused"] for g in kernel.param_groups) and all(g["fused"] for g in plain.param_groups)
    torch.manual_seed(1)
    batches = [{"x": torch.randn(6, 5), "y": torch.randn(6, 7)} for _ in range(3)]
    rng = torch.get_rng_state()
    for batch in batches:
        whole_batch_step(engine, [batch], _objective)
    torch.set_rng_state(rng)  # the same dropout masks
    for batch in batches:
        features, shared = reference(batch)
        loss, _ = _objective(features, shared)
        loss.backward()
        plain.step()
        plain.zero_grad(set_to_none=True)
    if stage == 3:
        import deepspeed
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            trained = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    else:
        trained = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    for name, value in reference.named_parameters():
        if stage == 0:  # the same kernel on the same tensors and gradients
            assert torch.equal(trained[name], value.detach()), name
            continue
        # ZeRO 1-3: the same elementwise kernel on one flat partition instead of separate tensors
        # (one rank: DeepSpeed's average over ranks divides by 1). Its vector body and its tail
        # round differently, so an element may take the other path: per step at most ~8 float32
        # roundings of the update (|update| <= lr) and one of the parameter, doubled for their
        # effect on the later steps' moments and gradients, over the 3 steps.
        steps = len(batches)
        torch.testing.assert_close(trained[name], value.detach(), rtol=steps * 2 * 2**-23,
                                   atol=steps * 2 * 8 * 2**-24 * optim["lr"],
                                   msg=lambda m, name=name: f"stage {stage} {name}: {m}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_runs_the_fused_adamw_like_plain_torch(stage):
    run_ranks(1, _stage_steps, stage)
