"""train.compile: the towers compiled in place (ContrastiveModel.compile_towers), in a step, in
DeepSpeed and across a kill + resume.

Compiling costs about a minute per process on 2 cores, so the model here is the one of the
end-to-end runs (tests/test_train_run.py's tiny_config: BERT + ViT tiny, batch 8, text 24,
image 32) on the same demo tokenizer: one in-process compile, and the training processes find
inductor's graphs in its on-disk cache. All but the config checks are marked slow (`make test`
runs them, `make test-fast` does not).
"""
import copy
import json
import os
import re
import textwrap
from pathlib import Path

import pytest
import torch

from xfast.config import ConfigError, parse
from xfast.training import demo_data
from xfast.training.config import OptimConfig

os.environ.setdefault("DS_ACCELERATOR", "cpu")


# -- config (fast)

@pytest.mark.parametrize("value, message", [
    ("yes", "train.compile: 'yes' does not fit bool"),
    ({"mode": "fastest"}, "train.compile.mode: 'fastest' is not allowed; choose one of 'default'"),
    ({"mdoe": "default"}, "train.compile.mdoe: unknown key (did you mean 'mode'?)"),
    ({"dynamic": "no"}, "train.compile.dynamic: expected true or false"),
    ({"backend": "tvm"}, "train.compile.backend: 'tvm' is not allowed"),
])
def test_a_bad_compile_value_is_refused_naming_the_key(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(OptimConfig, {"compile": value}, "train")


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_a_cuda_graph_mode_is_refused_naming_why(mode):
    with pytest.raises(ConfigError, match=re.escape(f"train.compile.mode: {mode!r} captures CUDA graphs")):
        parse(OptimConfig, {"compile": {"mode": mode}}, "train")


def test_compile_towers_never_turns_cuda_graphs_on(monkeypatch):
    from xfast.models.model import ContrastiveModel
    seen = []
    tower = type("Tower", (), {"compile": lambda self, **kwargs: seen.append(kwargs)})()
    model = type("Model", (), {"text": tower, "media": tower, "_embed_pair": lambda self: None})()
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)  # the pair's region
    with pytest.raises(ValueError, match="mode 'reduce-overhead' is not supported"):
        ContrastiveModel.compile_towers(model, mode="reduce-overhead")
    ContrastiveModel.compile_towers(model, mode="max-autotune-no-cudagraphs")
    assert len(seen) == 3 and all(k["options"]["triton.cudagraphs"] is False for k in seen), seen


def test_compile_values_and_their_options():
    assert parse(OptimConfig, {}, "train").compile_options is None
    assert parse(OptimConfig, {"compile": False}, "train").compile_options is None
    on = parse(OptimConfig, {"compile": True}, "train").compile_options
    assert (on.mode, on.dynamic, on.backend) == ("default", None, "inductor")
    options = parse(OptimConfig, {"compile": {"mode": "max-autotune-no-cudagraphs", "dynamic": False}},
                    "train").compile_options
    assert (options.mode, options.dynamic, options.backend) == ("max-autotune-no-cudagraphs", False, "inductor")


def test_compile_with_zero3_is_refused(tmp_path):
    from tests.test_train_run import tiny_config
    from xfast.training.config import TrainConfig
    root = tmp_path / "demo"
    demo_data.generate(root, train=16, test=4, sentences=4, seed=1)
    raw = tiny_config(root / "images" / "train", root / "tokenizer", train={"compile": True},
                      deepspeed={"zero_stage": 3})
    with pytest.raises(ConfigError, match="train.compile: not supported with deepspeed.zero_stage 3"):
        parse(TrainConfig, raw, "config")


def test_switching_compile_does_not_block_a_resume():
    from xfast.training.run_dir import differences
    saved = {"train": {"lr": 1.0}}  # a run saved before train.compile existed
    assert differences(saved, {"train": {"lr": 1.0, "compile": {"mode": "default"}}}) == []
    assert differences({"train": {"lr": 1.0, "compile": True}}, {"train": {"lr": 2.0, "compile": False}}) == \
        [("train.lr", 1.0, 2.0)]


def test_resuming_with_compile_switched_says_so(tmp_path):
    from tests.test_train_lifecycle import start_run
    from tests.test_train_run import tiny_config
    from xfast.training.config import TrainConfig
    from xfast.training.run_dir import plan_resume
    root = tmp_path / "demo"
    demo_data.generate(root, train=16, test=4, sentences=4, seed=1)

    def config(compile_value):
        raw = tiny_config(root / "images" / "train", root / "tokenizer", train={"compile": compile_value})
        return parse(TrainConfig, dict(raw, output_dir=str(tmp_path / "run")), "config")

    start_run(config(False), 4)
    switched = plan_resume(config({"mode": "default"}))
    assert switched.step == 4 and not switched.forced and len(switched.warnings) == 1
    assert "train.compile False -> {'mode': 'default'}: the towers now run compiled from step 4" in \
        switched.warnings[0] and "not bit-equal" in switched.warnings[0]
    assert plan_resume(config(False)).warnings == []


# -- the compiled step (slow: one compile for the module)

# The demo data of the compiled runs: its tokenizer's vocabulary sets the embedding's shape, part of
# every compiled graph. test_train_release's compiled Trainer uses the same, and so finds them compiled.
DEMO = {"train": 48, "test": 12, "sentences": 20, "seed": 5}


def compile_threads() -> int:
    """torch's thread count in every compiling process here: what a one-rank Trainer without loader
    workers takes (train.process.torch_threads). Inductor's CPU kernels are generated for it, so it
    is part of their cache key."""
    from xfast.training.process import torch_threads
    return torch_threads(1, 0)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile") / "demo"
    demo_data.generate(root, **DEMO)
    return root


def _model(tokenizer):
    from tests.test_train_run import tiny_config
    from xfast.models import ModelConfig, build_model
    torch.manual_seed(0)
    return build_model(parse(ModelConfig, tiny_config(tokenizer.parent, tokenizer)["model"], "model"))


def _batches(model, count: int, rows: int = 8, length: int = 24):
    """Right-padded captions of random lengths and random images, as the loader makes them."""
    generator = torch.Generator().manual_seed(1)
    vocab = model.text.backbone.config.vocab_size
    out = []
    for _ in range(count):
        lengths = torch.randint(3, length + 1, (rows,), generator=generator)
        mask = (torch.arange(length) < lengths[:, None]).long()
        ids = torch.randint(5, vocab, (rows, length), generator=generator) * mask
        out.append({"input_ids": ids, "attention_mask": mask,
                    "pixel_values": torch.randn(rows, 3, 32, 32, generator=generator)})
    return out


class _PlainEngine:
    """whole_batch_step's engine interface over a module: backward only, no optimizer."""

    def __init__(self, module):
        self.module = module

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss, scale_wrt_gas=False):
        loss.backward()

    def step(self):
        pass


def _accumulated_step(model, micro, seed: int):
    """Loss and parameter gradients of one whole-batch step (GradCache over the micro-batches)."""
    from xfast.models import Objective, ObjectiveConfig
    from xfast.training.accumulation import whole_batch_step
    from xfast.training.task import ContrastiveTask
    objective = Objective(parse(ObjectiveConfig, {}, "objective"))
    task = ContrastiveTask(model, objective)
    plan = objective.plan(0)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    batches = [dict(b, pixel_values=b["pixel_values"].to(dtype)) for b in micro]
    loss, _, _ = whole_batch_step(_PlainEngine(task), [{"pairs": b, "plan": plan} for b in batches],
                                  lambda f, s, group: task.loss(f, s, plan, group=group))
    return loss.double(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def models(demo_root):
    """Eager float32, eager float64 and compiled float32 copies of one tiny model (dropout on).

    The module runs under train.deterministic's settings (make_deterministic) and compile_threads(),
    as the Trainer of the runs below and STEP_PROBE do: inductor keys its on-disk cache on them, so
    those processes find the graphs compiled here instead of compiling their own. The settings
    before are restored afterwards."""
    from xfast.training.engine import make_deterministic
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory, torch.get_num_threads())
    make_deterministic()
    torch.set_num_threads(compile_threads())
    eager = _model(demo_root / "tokenizer")
    compiled = copy.deepcopy(eager)
    compiled.compile_towers()
    yield eager, copy.deepcopy(eager).double(), compiled
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.utils.deterministic.fill_uninitialized_memory = before[2]
    torch.set_num_threads(before[3])


ULP = torch.finfo(torch.float32).eps


def _layer(name: str) -> str:
    """The block a parameter belongs to ("...layer.0.attention.self" for its query/key/value
    weights and biases): its gradients are sums over the same upstream gradient and inputs."""
    return name.rsplit(".", 2)[0]


def _rounding_scales(grads64: dict, eager: dict) -> dict[str, tuple[float, float]]:
    """Per parameter: (E, S) of its block. S: the largest |gradient| of the block in float64 (what
    flows through it); E: eager float32's largest error against float64 over the block (the
    rounding that float32 arithmetic on these sums really makes, on this CPU's BLAS). A tensor
    whose gradient is 0 in exact arithmetic (attention key biases: softmax ignores a shift of
    the scores) carries only rounding noise of the block's upstream gradient, so its own size
    says nothing of the error it may have; the block's does."""
    blocks: dict[str, list[float]] = {}
    for name, ref in grads64.items():
        e, s = blocks.setdefault(_layer(name), [0.0, 0.0])
        blocks[_layer(name)] = [max(e, (eager[name] - ref).abs().max().item()), max(s, ref.abs().max().item())]
    return {name: tuple(blocks[_layer(name)]) for name in grads64}


@pytest.mark.slow
def test_compiled_step_matches_eager_within_float32_rounding(models):
    """Two micro-batches through whole-batch accumulation, dropout on (the same masks: inductor
    draws them with torch's RNG, replayed in the second forward). Inductor fuses and reorders the
    float32 sums, so its result is another float32 rounding of the same function. Each gradient's
    error against float64 (same weights, same masks) is bounded by its block's rounding scale:
    twice eager float32's largest error in the block (flash-attention's rule, over a block, not a
    tensor whose exact value may be 0) plus 4 ulps of the block's largest gradient (a rounding
    of each of the few values a fused kernel may store differently)."""
    eager, reference, compiled = models
    micro = _batches(eager, 2)
    loss64, grads64 = _accumulated_step(reference, micro, seed=3)
    loss_e, grads_e = _accumulated_step(eager, micro, seed=3)
    loss_c, grads_c = _accumulated_step(compiled, micro, seed=3)
    assert grads64.keys() == grads_e.keys() == grads_c.keys()
    scales = _rounding_scales(grads64, grads_e)
    worst_relative = 0.0
    for name, ref in grads64.items():
        e, s = scales[name]
        # the reference has the same dropout masks (else eager float32 would be off by O(1) of s)
        assert e <= 1e-3 * s, (name, e, s)
        worst_relative = max(worst_relative, e / s)
        err = (grads_c[name] - ref).abs().max().item()
        assert err <= 2 * e + 4 * ULP * s, (name, err, e, s)
    # The loss: the same forward roundings, relative to its size, as the gradients' worst block.
    bound = 2 * (loss_e - loss64).abs().item() + 2 * worst_relative * loss64.abs().item() + 4 * ULP * loss64.abs().item()
    assert (loss_c - loss64).abs().item() <= bound, (loss_c, loss_e, loss64)


@pytest.mark.slow
def test_compiled_towers_keep_parameter_names_and_checkpoint_keys(models):
    eager, _, compiled = models
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    fresh = copy.deepcopy(eager)
    fresh.load_state_dict(compiled.state_dict(), strict=True)


@pytest.mark.slow
def test_no_recompile_after_the_first_step(models):
    """Fixed shapes (drop_last, text padded to max_length): the graphs of the first step serve
    every later one, and evaluation under the trainer's force_eager stance adds none."""
    from torch._dynamo.utils import counters
    _, _, compiled = models
    micro = _batches(compiled, 6)
    _accumulated_step(compiled, micro[:2], seed=4)
    graphs = counters["stats"]["unique_graphs"]
    recompiles = sum(counters["recompiles"].values())
    for i in range(2, 6, 2):
        _accumulated_step(compiled, micro[i:i + 2], seed=4)
    compiled.eval()
    with torch.compiler.set_stance("force_eager"), torch.no_grad():
        compiled.encode_text(micro[0]["input_ids"][:3], micro[0]["attention_mask"][:3])
        compiled.encode_image(micro[0]["pixel_values"][:5])
    compiled.train()
    assert counters["stats"]["unique_graphs"] == graphs
    assert sum(counters["recompiles"].values()) == recompiles


@pytest.mark.slow
def test_a_step_pairing_media_and_captions_is_one_compiled_graph(demo_root):
    """compile_towers: the plain cross-modal features (both towers, normalised) come from ONE
    graph, with no graph break, and equal the eager model's bit for bit under the 'eager' backend
    (the same ops in the same order, dropout from the same RNG: media first, then text); a step
    with SimCSE views of the captions calls the towers' own compiled forwards instead. That
    inductor keeps the masks' order too rests on test_compiled_step_matches_eager_within_float32_rounding
    (its plain step takes this one region). A deepcopy runs its own weights (eager) and a
    compiled model pickles."""
    import pickle

    from torch._dynamo.utils import counters

    from xfast.models.objective import FeaturePlan
    eager = _model(demo_root / "tokenizer")
    compiled = copy.deepcopy(eager)
    compiled.compile_towers(backend="eager")
    tower_calls = []
    for tower in (compiled.text, compiled.media):
        inner = tower._compiled_call_impl
        tower._compiled_call_impl = lambda *a, _inner=inner, _name=tower.modality, **k: (
            tower_calls.append(_name), _inner(*a, **k))[1]
    batch = _batches(eager, 1)[0]
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    for _ in range(2):  # the second call reuses the graph
        torch.manual_seed(2)
        got = compiled.features(batch)
        torch.manual_seed(2)
        want = eager.features(batch)
        assert got.keys() == want.keys() == {"media", "text"}
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert sum(counters["graph_break"].values()) == breaks
    assert tower_calls == []
    assert not torch._dynamo.config.use_recursive_dict_tags_for_guards  # set around the call only
    # The guards skip an unchanged module tree by its dict tags: a reassigned parameter (here a
    # projection of another shape, as a resized head would be) changes a tag, so the graph is
    # checked again and the new weights are used, not the ones traced.
    for model in (compiled, eager):
        head = next(m for m in model.media.projection.modules() if isinstance(m, torch.nn.Linear))
        head.weight = torch.nn.Parameter(torch.linspace(-1, 1, 2 * head.weight.numel()).view(-1, head.in_features))
    torch.manual_seed(2)
    got = compiled.features(batch)
    torch.manual_seed(2)
    want = eager.features(batch)
    assert got["media"].shape[1] == 2 * got["text"].shape[1]
    assert all(torch.equal(got[k], want[k]) for k in want)
    # A copy must not call the original's compiled pair (bound to the original's towers).
    twin = copy.deepcopy(compiled)
    assert twin._compiled_pair is None and compiled._compiled_pair is not None
    with torch.no_grad():
        for p in twin.media.projection.parameters():
            p.zero_()
    torch.manual_seed(2)
    assert not twin.features(batch)["media"].any()
    torch.manual_seed(2)
    assert torch.equal(compiled.features(batch)["media"], got["media"])
    assert pickle.loads(pickle.dumps(compiled))._compiled_pair is None
    views = FeaturePlan(cross_modal=True, captions=True, sentences=False, nli=False, embedding="projected")
    torch.manual_seed(2)
    got = compiled.features(batch, plan=views)
    torch.manual_seed(2)
    want = eager.features(batch, plan=views)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert sorted(tower_calls) == ["image", "text"]


# -- DeepSpeed and the Trainer (slow, separate processes)

@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_trains_compiled_towers_as_eager_ones(models, stage):
    """ZeRO-0 and ZeRO-2 over compiled towers: their gradient hooks fire, and one optimizer step
    moves the weights as the eager engine's does. AdamW with eps 10 (>> |grad|) steps by about
    lr * grad / eps, so the step shows the gradient itself, not just its sign; compiled and eager
    gradients differ by float32 rounding (the test above)."""
    from xfast.training.engine import init_distributed
    init_distributed()
    eager = models[0]
    micro = _batches(eager, 2)
    delta = {}
    for name in ("eager", "compiled"):
        model = copy.deepcopy(eager)
        if name == "compiled":
            model.compile_towers()  # the graphs compiled for `models` serve this copy too
        delta[name] = _engine_step(model, micro, stage)
    _assert_steps_agree(delta["eager"], delta["compiled"], eager, models[1], micro)


LR, EPS = 1e-2, 10.0  # AdamW's eps >> |grad|: the step shows the gradient, not just its sign


def _engine_step(model, micro, stage: int) -> dict:
    """The weights' change in one DeepSpeed optimizer step over `micro` (dropout masks from seed 3)."""
    from xfast.models import Objective, ObjectiveConfig
    from xfast.training.accumulation import whole_batch_step
    from xfast.training.engine import build_engine, deepspeed_config
    from xfast.training.task import ContrastiveTask
    before = {k: v.detach().double() for k, v in model.state_dict().items()}
    objective = Objective(parse(ObjectiveConfig, {}, "objective"))
    task = ContrastiveTask(model, objective)
    plan = objective.plan(0)
    engine = build_engine(task, ds_config=deepspeed_config(
        micro_batch_size=8, accumulation_steps=len(micro), world_size=1, zero_stage=stage, precision="fp32",
        gradient_clipping=0.0), lr=LR, weight_decay=0.0, betas=(0.9, 0.98), eps=EPS, tower_lr={},
        warmup_steps=0, total_steps=10, min_lr_ratio=0.0)
    torch.manual_seed(3)
    whole_batch_step(engine, [{"pairs": b, "plan": plan} for b in micro],
                     lambda f, s, group: task.loss(f, s, plan, group=group))
    assert engine.global_steps == 1
    return {k: v.detach().double() - before[k] for k, v in model.state_dict().items()}


def _assert_steps_agree(eager_delta: dict, compiled_delta: dict, eager, reference, micro) -> None:
    """AdamW's first step with eps = 10: update = lr * g / (|g| + eps), whose slope in g is at most
    lr / eps. So compiled and eager steps differ by lr / eps times their gradients' difference,
    bounded through float64: eager's own block error E plus the compiled bound of the first step
    test (2 E + 4 ulp S); plus 4 ulps of the step (the update's own float32 arithmetic) and 1 ulp
    of each of the two float32 weights the step is read back from. `eager` and `reference`: the
    float32 and float64 models before the step."""
    before = eager.state_dict()
    moved = [k for k, d in compiled_delta.items() if d.abs().max() > 0]
    assert len(moved) > len(before) // 2, moved
    _, grads64 = _accumulated_step(reference, micro, seed=3)
    _, grads_e = _accumulated_step(copy.deepcopy(eager), micro, seed=3)
    scales = _rounding_scales(grads64, grads_e)
    for key in before:
        e, s = scales.get(key, (0.0, 0.0))  # buffers: no gradient, no step
        step = eager_delta[key].abs().max().item()
        bound = LR / EPS * (3 * e + 4 * ULP * s) + 4 * ULP * step + 2 * ULP * before[key].abs().max().item()
        assert (compiled_delta[key] - eager_delta[key]).abs().max().item() <= bound, (key, e, s)


# One compiled DeepSpeed ZeRO-2 step in a fresh process (forked from the `launcher`, which imported
# the training stack and ran no torch op: its RNG, dynamo and inductor state all new): the model of
# _model, the batches of _batches; writes the weights' change.
STEP_PROBE = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from tests.test_train_compile import _batches, _engine_step, _model, compile_threads
    from xfast.training.engine import init_distributed, make_deterministic
    tokenizer, out = sys.argv[1:3]
    init_distributed()
    make_deterministic()  # as the `models` fixture: the graphs it compiled are in inductor's cache
    torch.set_num_threads(compile_threads())
    model = _model(Path(tokenizer))
    model.compile_towers()
    torch.save(_engine_step(model, _batches(model, 2), stage=2), out)
""")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_eager_and_compiled_processes_draw_the_same_dropout_masks(demo_root, tmp_path, launcher):
    """A compiled step, the first thing a fresh process runs (the compile happens inside the
    step, between the accumulation's two forwards of a micro-batch), and an eager one from the
    same seed: the same weights within the rounding bound of the in-process test. Masks drawn
    differently (inductor's own RNG instead of torch's, or an RNG draw by the compiler) would
    change the BERT tower's gradients by O(1) of their size. The eager step draws its masks from
    torch's generator seeded by _engine_step, whatever ran before it: it runs here."""
    from tests.test_train_run import clean_env
    from xfast.training.engine import init_distributed
    env = dict(clean_env(), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "compiled.pt"
    result = launcher.run_code(STEP_PROBE, [demo_root / "tokenizer", out], cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    init_distributed()
    eager = _model(demo_root / "tokenizer")
    assert eager.text.backbone.config.hidden_dropout_prob > 0
    micro = _batches(eager, 2)
    before = copy.deepcopy(eager)
    _assert_steps_agree(_engine_step(eager, micro, stage=2), torch.load(out), before, copy.deepcopy(before).double(),
                        micro)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_compiled_run_killed_then_resumed_ends_bit_equal_to_an_uninterrupted_one(demo_root, launcher):
    """Compiled -> compiled resume is exact: kill -9 after step 5 (checkpoint at 3), the same
    command resumes, and the final weights and every logged loss equal those of a run that was
    never interrupted (accumulation over 2 micro-batches, dropout on, evaluation in between)."""
    from tests.test_train_run import clean_env, final_weights, losses, tiny_config, train_args
    workdir = demo_root.parent
    held_out = {"task": "retrieval", "data": str(demo_root / "images" / "test"), "ks": [1, 5]}
    cfg = tiny_config(demo_root / "images" / "train", demo_root / "tokenizer", train={"compile": True},
                      deepspeed={"accumulation_steps": 2},  # evaluation runs the towers eager:
                      eval={"tasks": {"held_out": held_out}, "before_training": True, "every_steps": 4})
    cfg["data"]["batch_size"] = 8
    cfg_path = workdir / "compiled.json"
    cfg_path.write_text(json.dumps(cfg))
    runs = {name: workdir / name for name in ("uninterrupted", "killed")}

    def start(name, fault=None):
        env = dict(clean_env(), **({"XFAST_FAULT": fault} if fault else {}))
        return launcher.start("xfast.train", train_args(cfg_path, f"output_dir={runs[name]}"), cwd=workdir, env=env)

    # The uninterrupted run goes side by side with the killed one and its resume (own processes and
    # folders, the same thread count: the same arithmetic); most of a run here is single-threaded
    # Python (dynamo's tracing, loading inductor's cached graphs).
    uninterrupted = start("uninterrupted")
    try:
        killed = start("killed", "train.step@5").result(timeout=600)
        assert killed.returncode == -9, killed.stderr[-4000:]
        assert (runs["killed"] / "checkpoints" / "latest").read_text().strip() == "step_00000003"
        resumed = start("killed").result(timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert "resumed from" in resumed.stderr + resumed.stdout
        done = uninterrupted.result(timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
    finally:
        if uninterrupted.poll() is None:
            uninterrupted.kill()
            uninterrupted.wait()
    a, b = final_weights(runs["uninterrupted"]), final_weights(runs["killed"])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    loss_a, loss_b = losses(runs["uninterrupted"]), losses(runs["killed"])
    assert all(loss_b[step] == loss_a[step] for step in range(4, 11)), (loss_a, loss_b)
