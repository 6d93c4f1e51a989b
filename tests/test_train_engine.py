"""The DeepSpeed config xfast builds: its speed defaults leave every step's arithmetic unchanged,
and a user's explicit keys win."""
import math
import os
from pathlib import Path

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
    init_distributed,
)
from xfast.training.zero_fastpath import module_parameters  # noqa: E402

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
    (or with DeepSpeed's own settings, clipping and ZeRO methods); the weights after them."""
    torch.manual_seed(0)
    model = Towers()
    config = deepspeed_config(micro_batch_size=6, accumulation_steps=accumulation, world_size=world, zero_stage=stage,
                              precision="fp32", gradient_clipping=0.05,  # small: the clipping acts on every step
                              extra={"zero_optimization": DEEPSPEED_OWN} if deepspeeds_own and stage == 2 else {})
    engine = build_engine(model, ds_config=config, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6,
                          tower_lr={}, warmup_steps=1, total_steps=10, min_lr_ratio=0.0,
                          fast_path=not deepspeeds_own)  # DeepSpeed's own methods (tests/test_zero_fastpath.py)
    assert ("zero_grad" in vars(engine)) == (stage == 0 and not deepspeeds_own)  # the fast path's at ZeRO-0
    if deepspeeds_own and stage == 0:
        del engine.clip_fp32_gradients  # back to DeepSpeed's method
    torch.manual_seed(1 + rank)
    for _ in range(3):
        micro = [{"x": torch.randn(6, 5), "y": torch.randn(6, 7)} for _ in range(accumulation)]
        whole_batch_step(engine, micro, _objective)
    return {name: param.detach().clone() for name, param in engine.module.named_parameters()}


def _init_deepspeed():
    """The training runs' process group (engine.init_distributed), on CPU without DeepSpeed's
    JIT-built shared-memory op at any world size: ZeRO's collectives here go through gloo."""
    from deepspeed.comm import comm
    os.environ["LOCAL_RANK"] = os.environ["RANK"]  # as a launcher sets it (run_ranks sets RANK)
    init_distributed()
    assert comm.cdb.shm_comm_op is None and not hasattr(torch.ops.deepspeed, "inference_all_reduce_")


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


def test_module_parameters_lists_what_module_parameters_lists():
    """The same tensors in the same order as nn.Module.parameters(): shared submodules and tied
    parameters once, None entries skipped, torch.compile's wrapper, and a module class with its own
    listing (then its listing is the answer)."""
    shared = nn.Linear(3, 4)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Sequential(nn.Linear(4, 3), shared, None, nn.LayerNorm(4))
            self.register_parameter("missing", None)
            self.gain = nn.Parameter(torch.ones(1))
            self.again = shared  # the same submodule twice
            self.head = nn.Linear(4, 4, bias=False)
            self.tail = nn.Linear(4, 4)
            self.tail.weight = self.head.weight  # a tied parameter
            self.towers = torch.compile(Towers())  # not compiled until called

    class OwnListing(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def parameters(self, recurse=True):
            return iter([self.b.weight])

    for module in (Towers(), Tied(), nn.Sequential(Tied(), OwnListing()), OwnListing(), nn.Linear(2, 2)):
        expected = list(module.parameters())
        got = module_parameters(module)
        assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected)), type(module)


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


def _foreach_adamw(module, **optim):
    """xfast's AdamW as it was before it chose torch's fused kernel: the same groups, foreach."""
    optimizer = adamw(module, **optim)
    for group in optimizer.param_groups:
        group.update(fused=None, foreach=True)
    return optimizer


def _resume_steps(rank: int, world: int, stage: int, folder: str) -> None:
    """A checkpoint written by a foreach AdamW (the flags torch saves in each parameter group) is
    resumed by an engine that chose the fused kernel: the resumed run keeps fused, its `step`
    counters as the fused kernel wants them, and continues from the saved moments."""
    import xfast.training.engine as engine_module
    _init_deepspeed()
    config = deepspeed_config(micro_batch_size=6, accumulation_steps=1, world_size=world, zero_stage=stage,
                              precision="fp32", gradient_clipping=0.0)
    optim = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    torch.manual_seed(1)
    batches = [{"x": torch.randn(6, 5), "y": torch.randn(6, 7)} for _ in range(3)]

    def engine(optimizer_of):
        torch.manual_seed(0)
        original, engine_module.adamw = engine_module.adamw, optimizer_of
        try:
            return build_engine(Towers(), ds_config=config, tower_lr={}, warmup_steps=0, total_steps=10,
                                min_lr_ratio=1.0, **optim)
        finally:
            engine_module.adamw = original

    def kernel(e):
        return getattr(e.optimizer, "optimizer", e.optimizer)  # ZeRO wraps the torch optimizer

    def step(e, batch):
        torch.manual_seed(2)  # the same dropout masks in both runs
        whole_batch_step(e, [batch], _objective)

    old = engine(_foreach_adamw)
    for batch in batches[:2]:
        step(old, batch)
    old.save_checkpoint(folder, tag="old")
    # ZeRO 1-3 write their optimizer partitions apart; stage 0 keeps the optimizer with the model
    if stage:
        saved = torch.load(next(Path(folder, "old").glob("*optim_states.pt")), weights_only=False)
        saved_groups = saved["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    else:
        saved = torch.load(Path(folder, "old", "mp_rank_00_model_states.pt"), weights_only=False)
        saved_groups = saved["optimizer"]["param_groups"]
    assert all(g["foreach"] and not g["fused"] for g in saved_groups)  # the old format, really

    resumed = engine(adamw)
    path, _ = resumed.load_checkpoint(folder, tag="old", load_optimizer_states=True, load_lr_scheduler_states=True)
    assert path is not None
    groups = kernel(resumed).param_groups
    assert all(g["fused"] and not g["foreach"] for g in groups), [(g["fused"], g["foreach"]) for g in groups]
    for state in kernel(resumed).state.values():
        assert state["step"].dtype == torch.float32 and state["step"].item() == 2
    calls = []
    fused = torch._fused_adamw_
    torch._fused_adamw_ = lambda *a, **k: calls.append(1) or fused(*a, **k)
    try:
        step(resumed, batches[2])
    finally:
        torch._fused_adamw_ = fused
    assert calls, "the resumed step did not run the fused kernel"
    step(old, batches[2])  # the old run's third step, on foreach
    for (name, value), other in zip(old.module.named_parameters(), resumed.module.parameters()):
        # The same AdamW step from the same moments, weights and gradient: fused and foreach round
        # each of the update's ~8 operations (|update| <= lr) and the parameter's once, per element.
        # (Resumed without the moments, the step would differ by about lr.)
        torch.testing.assert_close(other.detach(), value.detach(), rtol=2 * 2**-23, atol=2 * 8 * 2**-24 * optim["lr"],
                                   msg=lambda m, name=name: f"stage {stage} {name}: {m}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [0, 2])
def test_a_checkpoint_of_the_foreach_adamw_resumes_on_the_fused_kernel(stage, tmp_path):
    run_ranks(1, _resume_steps, stage, str(tmp_path))


def _bf16_objective(features, shared, group=None):
    return _objective({k: v.float() for k, v in features.items()}, {k: v.float() for k, v in shared.items()}, group)


def _bf16_stage_step(rank: int, world: int, stage: int, folder: str) -> None:
    """bf16 at ZeRO 1-3: the towers compute in bf16 and the fused AdamW updates the fp32 master
    partitions. One step against a plain bf16 model whose fp32 master copy takes the same fused
    AdamW on its bf16 gradients; the masters read back from the checkpoint by name."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    _init_deepspeed()
    torch.manual_seed(0)
    model = Towers()
    reference = Towers().to(torch.bfloat16)
    reference.load_state_dict(model.state_dict())
    master = Towers()
    master.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})  # what bf16 starts from
    config = deepspeed_config(micro_batch_size=6, accumulation_steps=1, world_size=world, zero_stage=stage,
                              precision="bf16", gradient_clipping=0.0)
    optim = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    engine = build_engine(model, ds_config=config, tower_lr={}, warmup_steps=0, total_steps=10, min_lr_ratio=1.0, **optim)
    plain = adamw(master, **optim)
    kernel = getattr(engine.optimizer, "optimizer", engine.optimizer)
    assert all(g["fused"] for g in kernel.param_groups)
    dtypes = []
    fused = torch._fused_adamw_
    torch._fused_adamw_ = lambda params, *a, **k: dtypes.extend(p.dtype for p in params) or fused(params, *a, **k)
    torch.manual_seed(1)
    batch = {"x": torch.randn(6, 5), "y": torch.randn(6, 7)}
    try:
        rng = torch.get_rng_state()
        whole_batch_step(engine, [{k: v.to(torch.bfloat16) for k, v in batch.items()}], _bf16_objective)
    finally:
        torch._fused_adamw_ = fused
    assert dtypes and set(dtypes) == {torch.float32}, dtypes  # the fp32 partitions, not the bf16 weights
    torch.set_rng_state(rng)  # the same dropout masks
    loss, _ = _bf16_objective(*reference({k: v.to(torch.bfloat16) for k, v in batch.items()}))
    loss.backward()
    for p, m in zip(reference.parameters(), master.parameters()):
        m.grad = p.grad.float()
    plain.step()
    engine.save_checkpoint(folder, tag="step1")
    trained = get_fp32_state_dict_from_zero_checkpoint(folder, tag="step1")
    if stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    else:
        weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    for name, value in master.named_parameters():
        assert weights[name].dtype == torch.bfloat16 and torch.equal(weights[name], trained[name].to(torch.bfloat16)), name
        # One fused step on one flat partition vs separate tensors (see _stage_steps), same bf16 gradient.
        torch.testing.assert_close(trained[name].float(), value.detach(), rtol=2 * 2**-23, atol=2 * 8 * 2**-24 * optim["lr"],
                                   msg=lambda m, name=name: f"bf16 stage {stage} {name}: {m}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_zero_stages_run_the_fused_adamw_on_fp32_masters(stage, tmp_path):
    run_ranks(1, _bf16_stage_step, stage, str(tmp_path))
