"""xfast.training.zero_fastpath: each replaced DeepSpeed ZeRO-1/2 method gives what DeepSpeed's own
gives on the same optimizer state, falls back to it where a condition does not hold, and whole
training steps give the same weights bit for bit with and without it, on 1 and 2 ranks."""
import math
import os
import types

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip("deepspeed")

from tests.dist_utils import run_ranks  # noqa: E402
from tests.test_train_engine import Towers, _init_deepspeed, _objective  # noqa: E402
from xfast.training import zero_fastpath  # noqa: E402
from xfast.training.accumulation import whole_batch_step  # noqa: E402
from xfast.training.engine import build_engine, deepspeed_config  # noqa: E402

pytestmark = pytest.mark.multiprocess


def _engine(world: int, stage: int, *, fast_path: bool, clipping: float = 0.05, accumulation: int = 1,
            extra: dict | None = None):
    torch.manual_seed(0)
    config = deepspeed_config(micro_batch_size=6, accumulation_steps=accumulation, world_size=world, zero_stage=stage,
                              precision="fp32", gradient_clipping=clipping, extra=extra)
    return build_engine(Towers(), ds_config=config, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6,
                        tower_lr={}, warmup_steps=1, total_steps=10, min_lr_ratio=0.0, fast_path=fast_path)


def _theirs(opt, name: str):
    """DeepSpeed's own method, bound to this optimizer (the class attribute, not the replacement)."""
    return getattr(type(opt), name).__get__(opt)


def _spy(opt, name: str, calls: list):
    """The replacement of `name` with DeepSpeed's method under it counting its calls."""
    original = _theirs(opt, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)
    factory = {"get_grad_norm_direct": zero_fastpath._grad_norm_direct,
               "_update_model_bit16_weights": zero_fastpath._update_model_bit16_weights,
               "buffered_reduce_fallback": zero_fastpath._buffered_reduce_fallback,
               "process_gradients": zero_fastpath._process_gradients}[name]
    return factory(counted).__get__(opt)


def _norm_cases(rank: int, world: int) -> None:
    _init_deepspeed()
    opt = _engine(world, 2, fast_path=False).optimizer
    assert not set(zero_fastpath.METHODS) & set(vars(opt)), "fast_path=False replaced something"
    theirs, calls = _theirs(opt, "get_grad_norm_direct"), []
    mine = _spy(opt, "get_grad_norm_direct", calls)
    assert zero_fastpath._single_rank(opt) == (world == 1)
    # what install puts there: at one rank without the all-reduce of the sum
    installed = zero_fastpath._grad_norm_direct(theirs, single_rank=world == 1).__get__(opt)
    torch.manual_seed(10 + rank)  # each rank's own gradients: the norm is all-reduced
    shapes = [(33, 7), (7,), (1,), (0,), (5, 5), (4097,), (3, 1, 2)]

    def grads(dtype=torch.float32, scale=1.0):
        return [(torch.randn(s) * scale * 10.0 ** torch.randint(-3, 4, ()).item()).to(dtype) for s in shapes]

    def padding(n):
        pad = torch.zeros(n)
        pad._zero_padding = True
        return pad

    params = [torch.zeros(s) for s in shapes]
    fresh = grads()
    cases = {"fp32": (fresh, params), "bf16": (grads(torch.bfloat16), params),
             "tiny": (grads(scale=1e-30), params), "huge": (grads(scale=1e15), params),
             "padding between": ([fresh[0], padding(3), *fresh[1:], padding(5)], params),
             "fewer params": (fresh, params[:4]), "fewer grads": (fresh[:3], params), "none": ([], [])}
    nan, inf = [g.clone() for g in fresh], [g.clone() for g in fresh]
    nan[5][17] = float("nan")
    inf[0][2, 3] = float("inf") if rank == 0 else 1.0  # one rank's inf makes every rank's norm invalid
    cases.update(nan=(nan, params), inf=(inf, params))
    for name, (g, p) in cases.items():
        expected, got = theirs(g, p), mine(g, p)
        assert expected.dtype == got.dtype == torch.float32 and expected.shape == got.shape
        assert torch.equal(expected, got), (name, expected, got)
        assert torch.equal(expected, installed(g, p)), name
        if name in ("nan", "inf"):
            assert got.item() == -1.0  # DeepSpeed's invalid-norm sentinel
    assert not calls
    nonempty = [g for g in fresh if g.numel()]  # DeepSpeed's inf-norm takes max() of each
    for norm_type in (math.inf, 1):  # only the 2-norm is replaced
        assert torch.equal(theirs(nonempty, params, norm_type), mine(nonempty, params, norm_type))
    assert calls == ["get_grad_norm_direct"] * 2


@pytest.mark.parametrize("world", [1, 2])
def test_grad_norm_equals_deepspeeds_on_ragged_padded_and_invalid_gradients(world):
    run_ranks(world, _norm_cases)


def _view_cases(rank: int, world: int) -> None:
    _init_deepspeed()
    engine = _engine(world, 2, fast_path=True)
    opt = engine.optimizer
    torch.manual_seed(1 + rank)
    whole_batch_step(engine, [{"x": torch.randn(6, 5), "y": torch.randn(6, 7)}], _objective)

    def layout():
        return [(p.data_ptr(), p.shape, p.stride(), p.dtype, p._version) for p in engine.module.parameters()]

    calls = []
    mine = _spy(opt, "_update_model_bit16_weights", calls)
    before = layout()
    for i in range(len(opt.bit16_groups)):
        mine(i)
    assert not calls and layout() == before  # every parameter was already its slice
    for i in range(len(opt.bit16_groups)):
        _theirs(opt, "_update_model_bit16_weights")(i)
    assert layout() == before  # DeepSpeed's re-pointing leaves them where they were
    # a parameter moved off the flat buffer: DeepSpeed's method puts it back
    moved = opt.bit16_groups[0][1]
    moved.data = moved.data.clone()
    away = layout()
    assert away != before
    for i in range(len(opt.bit16_groups)):
        mine(i)
    assert calls == ["_update_model_bit16_weights"]
    assert [x[:4] for x in layout()] == [x[:4] for x in before]
    # the training keeps its weights in the flat buffer: the optimizer's update reaches the module
    whole_batch_step(engine, [{"x": torch.randn(6, 5), "y": torch.randn(6, 7)}], _objective)
    flat = opt.bit16_groups_flat[0]
    assert moved.data_ptr() - flat.data_ptr() == dict(
        zip(map(id, opt.round_robin_bit16_groups[0]), opt.round_robin_bit16_offsets[0]))[id(moved)] * 4


@pytest.mark.parametrize("world", [1, 2])
def test_weights_stay_views_of_the_flat_buffer_and_a_moved_one_is_put_back(world):
    run_ranks(world, _view_cases)


def _reduce_cases(rank: int, world: int) -> None:
    _init_deepspeed()
    engine = _engine(world, 2, fast_path=True)
    opt = engine.optimizer
    replaced = {m for m in zero_fastpath.METHODS if m in vars(opt)}
    if world > 1:
        assert replaced == set(zero_fastpath.METHODS) - {"buffered_reduce_fallback"}
        return
    assert replaced == set(zero_fastpath.METHODS)
    theirs, calls = _theirs(opt, "buffered_reduce_fallback"), []
    mine = _spy(opt, "buffered_reduce_fallback", calls)
    torch.manual_seed(3)
    grads = [torch.randn(s) for s in ((33, 7), (7,), (1,), (5, 5))]
    grads[1][2] = float("nan")
    grads[2][0] = -0.0
    ours, reference = [g.clone() for g in grads], [g.clone() for g in grads]
    mine(None, ours, torch.float32)
    theirs(None, reference, torch.float32)
    assert not calls
    for a, b, g in zip(ours, reference, grads):
        # the same bits (NaN and -0.0 included) before and after DeepSpeed's one-rank round trip
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)) and torch.equal(a.view(torch.int32),
                                                                                     g.view(torch.int32))
    mine(None, [g.clone() for g in grads], torch.bfloat16)  # would round through bf16: DeepSpeed's runs
    assert calls == ["buffered_reduce_fallback"]
    opt.overlap_comm = True
    try:
        mine(None, [g.clone() for g in grads], torch.float32)
    finally:
        opt.overlap_comm = False
    assert calls == ["buffered_reduce_fallback"] * 2


@pytest.mark.parametrize("world", [1, 2])
def test_the_one_rank_reduction_is_skipped_only_where_it_changes_nothing(world):
    run_ranks(world, _reduce_cases)


def _expected(world: int, stage: int) -> list[str]:
    """What install replaces on the engines of these tests."""
    return [m for m in zero_fastpath.METHODS if not (m == "buffered_reduce_fallback" and world > 1)
            and not (m == "process_gradients" and stage == 1)]


def _install_cases(rank: int, world: int) -> None:
    _init_deepspeed()
    stage0 = _engine(world, 0, fast_path=False)
    assert zero_fastpath.install(stage0.optimizer) == ([], "not a ZeRO-1/2 optimizer")
    assert "zero_grad" not in vars(stage0)
    version, deepspeed.__version__ = deepspeed.__version__, "0.20.0"
    try:
        assert zero_fastpath.install_stage0(stage0) == ([], "DeepSpeed 0.20.0, tested with 0.19.8")
    finally:
        deepspeed.__version__ = version
    assert "zero_grad" not in vars(stage0) and zero_fastpath.install_stage0(stage0) == (["zero_grad"], "")
    opt = _engine(world, 2, fast_path=False).optimizer  # one engine, one condition broken at a time
    for flag, why in (("cpu_offload", "CPU offload"), ("has_moe_layers", "MoE layers"), ("zenflow", "ZenFlow"),
                      ("model_parallel_rank", "model parallelism")):
        kept = getattr(opt, flag)
        setattr(opt, flag, 1)
        try:
            assert zero_fastpath.install(opt) == ([], why)
        finally:
            setattr(opt, flag, kept)
    param = next(iter(opt.bit16_groups[0]))
    param.ds_pipe_replicated = True
    try:
        assert zero_fastpath.install(opt) == ([], "pipeline-replicated parameters")
    finally:
        del param.ds_pipe_replicated
    version, deepspeed.__version__ = deepspeed.__version__, "0.20.0"
    try:
        replaced, why = zero_fastpath.install(opt)
    finally:
        deepspeed.__version__ = version
    assert replaced == [] and "0.20.0" in why
    assert not set(zero_fastpath.METHODS) & set(vars(opt)), "a refused install replaced something"
    assert zero_fastpath.install(opt)[0] == _expected(world, 2)
    # ZeRO-1 and contiguous gradients: every hook would take DeepSpeed's path, so the hook stays
    replaced, why = zero_fastpath.install(_engine(world, 1, fast_path=False).optimizer)
    assert replaced == _expected(world, 1) and "process_gradients kept" in why, (replaced, why)
    contiguous = _engine(world, 2, fast_path=False, extra={"zero_optimization": {"contiguous_gradients": True}})
    replaced, why = zero_fastpath.install(contiguous.optimizer)
    assert "process_gradients" not in replaced and "process_gradients kept" in why, (replaced, why)


@pytest.mark.parametrize("world", [1, 2])
def test_nothing_is_replaced_where_a_condition_does_not_hold(world):
    run_ranks(world, _install_cases)


def _hook_cases(rank: int, world: int) -> None:
    _init_deepspeed()
    engine = _engine(world, 2, fast_path=True)
    opt, calls = engine.optimizer, []
    opt.process_gradients = _spy(opt, "process_gradients", calls)
    torch.manual_seed(1 + rank)

    def step():
        whole_batch_step(engine, [{"x": torch.randn(6, 5), "y": torch.randn(6, 7)}], _objective)

    step()
    assert not calls
    opt.reduce_bucket_size = 200  # the bucket fills: DeepSpeed's method reduces it mid-backward
    step()
    assert 0 < len(calls) < len(list(engine.module.parameters())), calls
    calls.clear()
    contiguous = _engine(world, 2, fast_path=True, extra={"zero_optimization": {"contiguous_gradients": True}})
    contiguous.optimizer.process_gradients = _spy(contiguous.optimizer, "process_gradients", calls)
    whole_batch_step(contiguous, [{"x": torch.randn(6, 5), "y": torch.randn(6, 7)}], _objective)
    assert len(calls) == len(list(contiguous.module.parameters()))  # every hook ran DeepSpeed's


@pytest.mark.parametrize("world", [1, 2])
def test_the_backward_hook_runs_deepspeeds_method_for_a_full_bucket_or_contiguous_gradients(world):
    run_ranks(world, _hook_cases)


def _train(rank: int, world: int, stage: int, accumulation: int, clipping: float, fast_path: bool,
           extra: dict | None = None):
    """Four optimizer steps; before the third, one gradient element is NaN: both engines must
    see the overflow and skip that step alike. Returns the weights and each step's norm/overflow."""
    engine = _engine(world, stage, fast_path=fast_path, clipping=clipping, accumulation=accumulation, extra=extra)
    opt = engine.optimizer
    step, seen = opt.step, []
    hooks, deepspeeds_hooks = [], []
    if fast_path:  # the comparison means something only if the replacements are there and taken
        assert [m for m in zero_fastpath.METHODS if m in vars(opt)] == _expected(world, stage)
        if "process_gradients" in vars(opt):
            spy = _spy(opt, "process_gradients", deepspeeds_hooks)
            opt.process_gradients = lambda *a: hooks.append(1) or spy(*a)

    def step_with_a_nan_before_the_third(*args, **kwargs):
        if len(seen) == 2 and rank == 0:
            opt.averaged_gradients[0][0].view(-1)[0] = float("nan")
        used = opt._max_expected_hooks_seen  # the hooks' count of parameters the backward reaches
        step(*args, **kwargs)
        seen.append((opt.overflow, float(opt._global_grad_norm), used))

    opt.step = step_with_a_nan_before_the_third
    torch.manual_seed(1 + rank)
    for _ in range(4):
        micro = [{"x": torch.randn(6, 5), "y": torch.randn(6, 7)} for _ in range(accumulation)]
        whole_batch_step(engine, micro, _objective)
    assert not fast_path or stage == 1 or len(deepspeeds_hooks) < len(hooks), (len(deepspeeds_hooks), len(hooks))
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}, seen


def _whole_steps(rank: int, world: int, stage: int, accumulation: int) -> None:
    _init_deepspeed()
    # clipping on every step, never, and with buckets that fill in backward (some hooks reduce)
    for clipping, extra in ((0.05, None), (1e6, None), (0.05, {"zero_optimization": {"reduce_bucket_size": 200}})):
        fast, fast_seen = _train(rank, world, stage, accumulation, clipping, True, extra)
        own, own_seen = _train(rank, world, stage, accumulation, clipping, False, extra)
        assert [s[0] for s in own_seen] == [False, False, True, False], own_seen
        assert all(s[2] > 0 for s in own_seen), own_seen  # the count was taken
        # The same norm (bit for bit: the same per-tensor float64 norms, summed in the same order),
        # hence the same clip factor, and the same gradients into the same AdamW: equal weights.
        assert fast_seen == own_seen, (clipping, fast_seen, own_seen)
        for name, value in own.items():
            assert torch.equal(fast[name], value), (rank, clipping, name, (fast[name] - value).abs().max())
        if clipping == 0.05:
            assert all(norm > clipping for overflow, norm, _ in own_seen if not overflow)  # it did clip


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("world, accumulation", [(1, 1), (1, 2), (2, 1)])
def test_training_steps_give_the_same_weights_bit_for_bit_with_and_without(stage, world, accumulation):
    run_ranks(world, _whole_steps, stage, accumulation)


def test_the_used_parameter_count_is_deepspeeds_in_every_backward():
    """_UsedParameters.count against DeepSpeed's count_used_parameters_in_backward, both taken in
    the same gradient hook: whole and partial graphs, a parameter that stops requiring grad, one
    whose dtype changes and one changed to another dtype and back (torch gives each a new
    accumulator node), a non-leaf tensor, and outside a backward."""
    from deepspeed.runtime.zero import stage_1_and_2 as zero12

    torch.manual_seed(0)
    model = Towers()
    params = list(model.parameters())
    used = zero_fastpath._UsedParameters(types.SimpleNamespace(bit16_groups=[params[:5], params[5:]]))
    counts = []
    hooks = [p.register_post_accumulate_grad_hook(
        lambda p: counts.append((zero12.count_used_parameters_in_backward(used.params), used.count())))
        for p in params]
    batch = {"x": torch.randn(6, 5), "y": torch.randn(6, 7)}

    def backward(loss, expected: int):
        counts.clear()
        loss.backward()
        assert counts and all(c == (expected, expected) for c in counts), (counts, expected)

    try:
        features, shared = model(batch)
        backward(_objective(features, shared)[0], len(params))
        nodes = list(used.nodes)
        features, _ = model(batch)
        backward(features["text"].sum(), 6)  # the text tower's 6 tensors only
        assert all(a is b for a, b in zip(used.nodes, nodes)), "looked up again with nothing changed"
        model.text[0].bias.requires_grad_(False)
        features, _ = model(batch)
        backward(features["text"].sum(), 5)
        model.text[0].bias.requires_grad_(True)
        model.logit_scale.data = model.logit_scale.data.double()  # a new accumulator node for it
        features, shared = model(batch)
        backward(features["text"].sum() + features["image"].sum() + shared["scale"].sum(), len(params))
        moved = [i for i, p in enumerate(params) if p is model.logit_scale]
        assert [i for i, (a, b) in enumerate(zip(used.nodes, nodes)) if a is not b] == moved
        # to another dtype and back: the same key as before, but torch made the weight a new node
        weight = model.text[0].weight
        weight.data = weight.data.double()
        weight.data = weight.data.float()
        features, shared = model(batch)
        backward(features["text"].sum() + features["image"].sum() + shared["scale"].sum(), len(params))
    finally:
        for hook in hooks:
            hook.remove()
    with pytest.raises(RuntimeError, match="during backward"):  # as DeepSpeed's, outside a backward
        used.count()
    # a non-leaf tensor among them: its node is new in every graph, so DeepSpeed's count runs
    leaf = torch.randn(3, requires_grad=True)
    derived = torch.randn(4, requires_grad=True) * 2.0
    used = zero_fastpath._UsedParameters(types.SimpleNamespace(bit16_groups=[[leaf, derived]]))
    counts.clear()
    leaf.register_post_accumulate_grad_hook(lambda p: counts.append(used.count()))
    (leaf.sum() + derived.sum()).backward()
    assert counts == [2] and used.looked_up_for is None
