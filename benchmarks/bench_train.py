"""Training throughput of xfast against a plain transformers loop and open_clip-style training.

Every measurement is one (size, method) pair run in its own subprocess(es); each of --repeat
rounds runs every method once, in a balanced order (benchmarks/rounds.py: over a whole number
of orders each method runs in every position and after every other one equally often; --repeat is
not rounded up to whole orders, so a shorter run is only nearly balanced). The ratio to the
transformers loop is taken per round (the two ran at most minutes apart) and its median over
the rounds is the reported figure; the best round of each method and best/best are kept too
(every round is in the JSON). On this kind of machine one process can run 45% faster than the
next, so a best-of over a few rounds is mostly noise. All methods read batches from xfast.data's
loader over the built-in demo data (the demo config's worker count), so "data wait" (the share
of wall time spent waiting for the next batch) is comparable. Each result also holds, per step,
the CPU of the training process (step_cpu_ms, of it in the kernel: step_sys_ms) and of its
loader workers (loader_cpu_ms), and their minor page faults (step_faults, loader_faults): with 1
loader worker at the tiny sizes the worker is about as busy as the step, so wall time follows
whichever is slower. The xfast methods run with xfast's process settings, as `xfast train`
(xfast.training.process: keep_freed_memory, and freeze_objects_before_fork before the loader
forks); the baselines with glibc's and Python's defaults unless --malloc all (--malloc none:
the defaults everywhere).

Sizes (SIZES):
  tiny_clap, tiny_clip  the demo's towers: hidden 32, 2 layers, batch 32. CLAP = RoBERTa +
                        HTSAT (MLP projections), CLIP = CLIP text + CLIP vision (linear).
  tiny_clip_b4096       the tiny CLIP towers at batch 4096 in one batch: the largest share of the
                        step the N x N loss can take here (tiny towers, embedding 32), where
                        the plain loop's 4096 x 4096 logits and their softmax grads weigh most.
  wide_b1024            CLIP text + CLIP vision of hidden 128 (2 layers, 4 heads), embedding
                        128, batch 1024: the contrastive batch is large next to the towers.
  wide_b4096            the same towers, batch 4096: xfast as 4 micro-batches of 1024 with
                        whole-batch accumulation (one loss over all 4096), the plain loop as one
                        4096 batch (its N x N logits in memory).
Methods (METHODS):
  xfast         xfast.models towers + Objective in a DeepSpeed engine (ZeRO-2, torch AdamW),
                whole_batch_step; on 1 rank.
  xfast_zero0   the same at ZeRO stage 0.
  xfast_torch   the same step without DeepSpeed (plain torch AdamW + clipping; on 2 ranks one
                flat gradient all-reduce, as DDP): what xfast costs without DeepSpeed.
  transformers  CLIPModel / ClapModel from config objects, return_loss=True (materialises the
                N x N logits), loss.backward(), clip_grad_norm_, torch AdamW (torch's default:
                on CPU a loop over the parameters; --baseline-adamw fused gives it xfast's kernel).
  transformers_compiled  the same loop with the whole HF model compiled (model.compile(), inductor):
                what a user of the plain loop gets from one more line.
  xfast_2ranks  xfast at ZeRO-2 on 2 ranks (1 thread each): each rank scores its own rows
                through xfast's distributed fused loss.
  open_clip_2ranks  the HF towers on 2 ranks with open_clip's recipe: features gathered with
                gradient (torch.distributed.nn.all_gather), each rank's local_loss over its
                rows, gradients averaged over ranks as DDP does.
Single-process methods run on 1 thread (the loader worker has the other core); 2-rank methods
on 1 thread per rank.

Compiled towers (--compile): the xfast methods (and the paired DeepSpeed cost, all three copies)
compile their two towers as the Trainer does with train.compile (ContrastiveModel.compile_towers)
when --compile is on, or with the default `config` when the demo config of the size's family
(demo_clip_tiny / demo_clap_tiny) sets train.compile. Each result says whether it ran compiled
("compiled"). Compiling happens in the untimed warmup steps (the first step compiles); inductor's
cache (TORCHINDUCTOR_CACHE_DIR) makes later processes compile faster. The transformers row stays
eager; transformers_compiled is the loop compiled.

DeepSpeed's own cost per step (tiny sizes; --paired-ranks): the difference of two separate
throughput runs is mostly their noise (it came out negative), so it is measured paired: one
process per rank holds xfast_torch, xfast_zero0 and xfast copies of one model and runs one step of
each per round on the same in-memory batch, in balanced order (rounds rounded up to whole orders); the cost is the median over rounds
of (DeepSpeed step - torch step), with a distribution-free 95% interval, on 1 rank and on the
demo's 2 ranks (half the batch each). On 1 rank the eager transformers loop steps in the same
rounds, and each xfast step's ratio to it (median over rounds of loop / xfast, 95% interval) is
the steadiest figure of the step itself: separate processes of one method differ by up to ~30%
in speed on these shared machines (every op, a plain GEMM too), which moves the per-round ratios
of the throughput rows, while two steps interleaved in one process keep their ratio within ~3%.

    python benchmarks/bench_train.py                      # prints the table, writes nothing
    python benchmarks/bench_train.py --save               # also benchmarks/results/train.{json,md}
    python benchmarks/bench_train.py --sizes tiny_clip --methods xfast transformers --steps 10 --repeat 1
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from xfast.distributed.rendezvous import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import balanced_rounds, median_interval, round_order  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# size -> model family, tower width, micro-batch, micro-batches per step, timed steps / warmup
# (None: from the command line)
SIZES = {
    "tiny_clap": dict(model="clap", hidden=32, batch=32, micro_batches=1, steps=None, warmup=None),
    "tiny_clip": dict(model="clip", hidden=32, batch=32, micro_batches=1, steps=None, warmup=None),
    "tiny_clip_b4096": dict(model="clip", hidden=32, batch=4096, micro_batches=1, steps=4, warmup=1),
    "wide_b1024": dict(model="clip", hidden=128, batch=1024, micro_batches=1, steps=2, warmup=1),
    "wide_b4096": dict(model="clip", hidden=128, batch=1024, micro_batches=4, steps=1, warmup=1),
}
METHODS = ("xfast", "xfast_zero0", "xfast_torch", "transformers", "transformers_compiled", "xfast_2ranks",
           "open_clip_2ranks")
DEFAULT_METHODS = {"tiny": ("xfast", "xfast_zero0", "xfast_torch", "transformers"),
                   "large": ("xfast", "xfast_torch", "transformers"),
                   "wide": ("xfast", "transformers", "xfast_2ranks", "open_clip_2ranks")}


def default_methods(size_name: str) -> tuple[str, ...]:
    size = SIZES[size_name]
    return DEFAULT_METHODS["wide" if size["hidden"] > 32 else "large" if size["batch"] > 256 else "tiny"]


def ranks_of(method: str) -> int:
    return 2 if method.endswith("_2ranks") else 1


def demo_compile(size: dict):
    """The demo config's train.compile for the size's model family, as CompileOptions or None."""
    from xfast.config import parse
    from xfast.training.config import OptimConfig, resolve_config_path
    raw = json.loads(resolve_config_path(f"demo_{size['model']}_tiny").read_text()).get("train", {})
    return parse(OptimConfig, {"compile": raw.get("compile", False)}, "train").compile_options


def compile_options(size: dict, compile_flag: str):
    """What the xfast methods compile with: --compile on/off, or (config) the demo config's."""
    from xfast.training.config import CompileOptions
    if compile_flag == "config":
        return demo_compile(size)
    return CompileOptions() if compile_flag == "on" else None


def endless(source):
    """A next_batch() that never runs out: the loader starts its next epoch when one ends (the
    first epoch's iterator, and so the workers' fork, is created now)."""
    batches = iter(source)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(source)
            return next(batches)
    return next_batch


def _loader(size: dict, batch_size: int, root: Path, tokenizer, *, rank: int, world: int):
    from xfast.config import parse
    from xfast.data import DataConfig, build_loader
    from xfast.training.config import resolve_config_path
    raw = json.loads(resolve_config_path(f"demo_{size['model']}_tiny").read_text())["data"]
    raw.update(sources=[{"urls": str(root / ("audio" if size["model"] == "clap" else "images") / "train")}],
               batch_size=batch_size)
    if batch_size * world > 256:  # more than a few batches per epoch of the 2048 demo samples
        raw.update(resampled=True, samples_per_epoch=10**7)
    return build_loader(parse(DataConfig, raw, "data"), tokenizer, rank=rank, world_size=world)


def _xfast_model(size: dict, tokenizer_dir: Path):
    from xfast.config import parse
    from xfast.models import ModelConfig, build_model
    wide = dict(hidden_size=size["hidden"], num_attention_heads=4, intermediate_size=4 * size["hidden"]) \
        if size["hidden"] != 32 else {}
    if size["model"] == "clap":
        towers = {"text": {"type": "roberta", "preset": "tiny", "projection": "mlp"},
                  "audio": {"type": "htsat", "preset": "tiny", "projection": "mlp"}}
    else:
        towers = {"text": {"type": "clip_text", "preset": "tiny", "overrides": wide},
                  "image": {"type": "clip_vision", "preset": "tiny", "overrides": wide}}
    towers["text"]["tokenizer"] = str(tokenizer_dir)
    return build_model(parse(ModelConfig, {**towers, "embed_dim": size["hidden"]}, "model"))


class _TorchEngine:
    """The engine interface of whole_batch_step without DeepSpeed: plain backward, and at the last
    micro-batch the gradient averaged over ranks (one flat all-reduce, what DDP's buckets amount
    to on CPU), clipping and AdamW."""

    def __init__(self, module, optimizer, micro_batches: int):
        self.module, self.optimizer, self.micro_batches, self.calls = module, optimizer, micro_batches, 0

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss, scale_wrt_gas=False):
        loss.backward()

    def step(self):
        import torch
        import torch.distributed as dist
        self.calls += 1
        if self.calls % self.micro_batches:
            return
        if dist.get_world_size() > 1:
            _average_over_ranks([p.grad for p in self.module.parameters() if p.grad is not None])
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _average_over_ranks(grads: list) -> None:
    """Gradients averaged over the ranks in place through one flat all-reduce (what DDP's buckets
    amount to on CPU)."""
    import torch
    import torch.distributed as dist
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, average in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(average.view_as(g))


def _xfast_engine(task, size: dict, method: str, world: int, ds_extra: dict, fast_path: bool = True):
    """`task` in the engine of `method`: DeepSpeed ZeRO-2 (xfast), ZeRO-0 (xfast_zero0) or plain
    torch (xfast_torch), with the same AdamW (xfast.training.engine.adamw: fused on CPU) in all three;
    fast_path: xfast's ZeRO fast path (deepspeed.fast_path)."""
    from xfast.training.engine import adamw, build_engine, deepspeed_config
    optim = dict(lr=1e-3, weight_decay=0.1)
    if method == "xfast_torch":
        return _TorchEngine(task, adamw(task, betas=(0.9, 0.98), eps=1e-6, **optim), size["micro_batches"])
    return build_engine(task, ds_config=deepspeed_config(
        micro_batch_size=size["batch"] // world, accumulation_steps=size["micro_batches"], world_size=world,
        zero_stage=0 if method == "xfast_zero0" else 2, precision="fp32", gradient_clipping=1.0, extra=ds_extra),
        betas=(0.9, 0.98), eps=1e-6, tower_lr={}, warmup_steps=0, total_steps=1000, min_lr_ratio=0.0,
        fast_path=fast_path, **optim)


def _xfast_step(model, size: dict, method: str, world: int, ds_extra: dict, compile_with=None):
    """step(micro_batches) -> loss: one optimizer step of `model` in the engine of `method`, under
    RepeatedSteps as in the Trainer (checks across ranks on the first step only); its towers
    compiled first with `compile_with` (CompileOptions) unless None, as the Trainer does."""
    from xfast.config import parse
    from xfast.distributed.checks import RepeatedSteps
    from xfast.models import Objective, ObjectiveConfig
    from xfast.training.accumulation import whole_batch_step
    from xfast.training.task import ContrastiveTask

    if compile_with is not None:
        model.compile_towers(mode=compile_with.mode, dynamic=compile_with.dynamic, backend=compile_with.backend)
    objective = Objective(parse(ObjectiveConfig, {}, "objective"))
    task = ContrastiveTask(model, objective)
    plan = objective.plan(0)
    engine = _xfast_engine(task, size, method, world, ds_extra)
    repeats = RepeatedSteps()

    def step(micro):
        with repeats.step(plan):
            loss, _, _ = whole_batch_step(engine, [{"pairs": batch, "plan": plan} for batch in micro],
                                          lambda f, s, group: task.loss(f, s, plan, group=group))
        return loss

    return step


def _xfast_step_fn(size: dict, method: str, tokenizer_dir: Path, world: int, ds_extra: dict, compile_with=None):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from xfast.training.engine import init_distributed

    init_distributed()
    model = _xfast_model(size, tokenizer_dir)
    step = _xfast_step(model, size, method, world, ds_extra, compile_with)
    return model.tokenizer, step, sum(p.numel() for p in model.parameters())


def _hf_model(size: dict, tokenizer):
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapModel,
        ClapTextConfig,
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPVisionConfig,
    )
    h = size["hidden"]
    layers = dict(hidden_size=h, num_hidden_layers=2, num_attention_heads=2 if h == 32 else 4, intermediate_size=2 * h
                  if h == 32 else 4 * h)
    text = dict(layers, vocab_size=len(tokenizer), max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    if size["model"] == "clap":
        audio = ClapAudioConfig(spec_size=64, num_mel_bins=16, patch_size=4, patch_stride=4, patch_embeds_hidden_size=16,
                                depths=[1, 1], num_attention_heads=[2, 2], hidden_size=32, window_size=4,
                                enable_fusion=False, projection_dim=h)
        config = ClapConfig(text_config=ClapTextConfig(**dict(text, max_position_embeddings=66), projection_dim=h).to_dict(),
                            audio_config=audio.to_dict(), projection_dim=h)
        return ClapModel(config), "input_features"
    # xfast's clip_text preset has attention dropout 0.1 (SimCSE needs some): the same here.
    config = CLIPConfig(text_config=CLIPTextConfig(**text, bos_token_id=tokenizer.cls_token_id, attention_dropout=0.1,
                                                   eos_token_id=tokenizer.sep_token_id).to_dict(),
                        vision_config=CLIPVisionConfig(**layers, image_size=32, patch_size=8).to_dict(),
                        projection_dim=h)
    return CLIPModel(config), "pixel_values"


def _baseline_adamw(params, adamw_kernel: str):
    """The baselines' AdamW: torch's default (on CPU a Python loop over the parameters: what a plain
    loop gets) or, with --baseline-adamw fused, the fused kernel xfast uses."""
    import torch
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6,
                             **({"fused": True} if adamw_kernel == "fused" else {}))


def _transformers_step_fn(size: dict, tokenizer_dir: Path, adamw_kernel: str = "default", compiled: bool = False):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model, media_key = _hf_model(size, tokenizer)
    model.train()
    if compiled:
        model.compile()
    optimizer = _baseline_adamw(model.parameters(), adamw_kernel)

    def step(micro):
        batch = micro[0] if len(micro) == 1 else {k: torch.cat([m[k] for m in micro])
                                                  for k in ("input_ids", "attention_mask", media_key)}
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     **{media_key: batch[media_key]}, return_loss=True).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    return tokenizer, step, sum(p.numel() for p in model.parameters())


def _open_clip_step_fn(size: dict, tokenizer_dir: Path, adamw_kernel: str = "default"):
    """open_clip's distributed recipe on the HF towers: gather_with_grad + local_loss, DDP-averaged
    gradients (one flat all-reduce, as DDP's buckets amount to on CPU)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model, media_key = _hf_model(size, tokenizer)
    for p in model.parameters():  # the same initial weights on every rank, as DDP broadcasts them
        dist.broadcast(p.data, 0)
    model.train()
    params = list(model.parameters())
    optimizer = _baseline_adamw(params, adamw_kernel)

    def step(micro):
        batch = micro[0] if len(micro) == 1 else {k: torch.cat([m[k] for m in micro])
                                                  for k in ("input_ids", "attention_mask", media_key)}
        text = F.normalize(model.get_text_features(input_ids=batch["input_ids"],
                                                   attention_mask=batch["attention_mask"]).pooler_output, dim=-1)
        media = F.normalize(model.get_image_features(pixel_values=batch[media_key]).pooler_output, dim=-1)
        all_text, all_media = torch.cat(dist_fn.all_gather(text)), torch.cat(dist_fn.all_gather(media))
        scale = model.logit_scale.exp()
        labels = torch.arange(len(text)) + rank * len(text)
        loss = (F.cross_entropy(scale * media @ all_text.T, labels) + F.cross_entropy(scale * text @ all_media.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in params:  # every rank sends the same layout, as DDP does
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _average_over_ranks([p.grad for p in params])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.detach()

    return tokenizer, step, sum(p.numel() for p in params)


def worker(size_name: str, method: str, steps: int, warmup: int, root: Path, ds_extra: dict, threads: int,
           malloc: str, adamw_kernel: str = "default", compile_flag: str = "off") -> dict | None:
    """Runs in the subprocess (one per rank): `warmup` untimed steps, then `steps` timed ones."""
    import torch

    from xfast.training.process import freeze_objects_before_fork, keep_freed_memory
    settings = malloc == "all" or (malloc == "xfast" and method.startswith("xfast"))
    if settings:
        keep_freed_memory()  # what xfast's Trainer does first (before the loader forks its worker)
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    size = SIZES[size_name]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if method in ("transformers", "transformers_compiled"):
        compiled = method == "transformers_compiled"
        tokenizer, step, parameters = _transformers_step_fn(size, root / "tokenizer", adamw_kernel, compiled)
    elif method == "open_clip_2ranks":
        compiled = False
        tokenizer, step, parameters = _open_clip_step_fn(size, root / "tokenizer", adamw_kernel)
    else:
        compile_with = compile_options(size, compile_flag)
        compiled = compile_with is not None
        tokenizer, step, parameters = _xfast_step_fn(size, method, root / "tokenizer", world, ds_extra, compile_with)
    micro_batches = size["micro_batches"]
    rank_batch = size["batch"] // world
    if not method.startswith("xfast"):  # one pass over the whole batch
        rank_batch, micro_batches = rank_batch * micro_batches, 1
    source = _loader(size, rank_batch, root, tokenizer, rank=rank, world=world)
    if settings:
        freeze_objects_before_fork()  # as xfast.train's entry point once everything is built
    next_batch = endless(source)
    for _ in range(warmup):
        float(step([next_batch() for _ in range(micro_batches)]))
    wait = 0.0
    usage_start = _usage()
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        micro = [next_batch() for _ in range(micro_batches)]
        wait += time.perf_counter() - t0
        loss = step(micro)
    float(loss)
    elapsed = time.perf_counter() - start
    used = [b - a for a, b in zip(usage_start, _usage())]
    if rank != 0:
        return None
    samples = steps * size["batch"] * size["micro_batches"]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"samples_per_s": samples / elapsed, "ms_per_step": elapsed / steps * 1e3, "compiled": compiled,
            "data_wait_share": wait / elapsed, "parameters": parameters, "peak_rss_mib": peak_rss,
            "step_cpu_ms": used[0] / steps * 1e3, "loader_cpu_ms": used[1] / steps * 1e3,
            "step_sys_ms": used[2] / steps * 1e3, "step_faults": used[3] / steps, "loader_faults": used[4] / steps}


def _usage() -> tuple[float, ...]:
    """So far: CPU seconds of this process and of its running child processes (the loader
    workers), this process's kernel CPU seconds, and the minor page faults of this process and of
    its children (Linux /proc; NaN elsewhere): where a step's time went when they share the cores,
    and how often freed memory was faulted in again."""
    tick = os.sysconf("SC_CLK_TCK")
    nan = float("nan")
    try:
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        child_cpu = child_faults = 0.0
        for pid in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            child_cpu += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            child_faults += int(fields[7])  # minflt
    except OSError:  # not Linux, or a child ended meanwhile
        return time.process_time(), nan, nan, nan, nan
    return time.process_time(), child_cpu, int(own[12]) / tick, int(own[7]), child_faults


PAIRED = ("xfast_torch", "xfast_zero0", "xfast")


def paired_worker(size_name: str, steps: int, warmup: int, root: Path, ds_extra: dict, malloc: str,
                  compile_flag: str = "off", adamw_kernel: str = "default") -> dict | None:
    """DeepSpeed's own cost per step, paired (runs in the subprocess, one per rank).

    One process holds three copies of the same model: in plain torch (xfast_torch), ZeRO-0 and
    ZeRO-2. Each round runs one step of each on the same in-memory batch, in the next balanced
    order (rounds.round_order; `steps` rounded up to whole orders); a step's DeepSpeed cost is its time minus the torch step's time of the
    same round. Pairing cancels what drifts between rounds on a shared machine (other load,
    clock), and no loader runs during the timed steps, so the median of the differences is
    DeepSpeed's cost and not the noise of two separate runs."""
    import copy
    import itertools

    import torch

    from xfast.training.engine import init_distributed
    from xfast.training.process import keep_freed_memory
    if malloc != "none":  # all three are xfast steps
        keep_freed_memory()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    size = SIZES[size_name]
    rank, world = init_distributed()
    model = _xfast_model(size, root / "tokenizer")
    compile_with = compile_options(size, compile_flag)
    step_of = {m: _xfast_step(copy.deepcopy(model), size, m, world, ds_extra, compile_with) for m in PAIRED}
    if world == 1:  # the eager loop in the same rounds: each xfast step's ratio to it, paired
        _, step_of["transformers"], _ = _transformers_step_fn(size, root / "tokenizer", adamw_kernel)
    methods = tuple(step_of)
    per_step = size["micro_batches"]
    source = _loader(size, size["batch"] // world, root, model.tokenizer, rank=rank, world=world)
    stream = iter(source)
    batches = list(itertools.islice(stream, 4 * per_step))
    stream.close()  # stop the loader's workers: none may run during the timed steps (nor block the exit)
    source.close()
    micro = [batches[i:i + per_step] for i in range(0, len(batches), per_step)]
    for i in range(warmup):
        for method in methods:
            float(step_of[method](micro[i % len(micro)]))
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(balanced_rounds(steps, len(methods))):
        for method in round_order(methods, i):
            start = time.perf_counter()
            float(step_of[method](micro[i % len(micro)]))
            times[method].append(time.perf_counter() - start)
    if rank != 0:
        return None
    return paired_result(times, world, compile_with is not None)


def paired_result(times: dict[str, list[float]], world: int, compiled: bool) -> dict:
    """paired_worker's result from each method's step times (seconds, round i at index i)."""
    result = {"ranks": world, "steps": len(times["xfast"]), "compiled": compiled,
              "ms_per_step": {m: statistics.median(t) * 1e3 for m, t in times.items()}}
    for method in PAIRED[1:]:
        diffs = [1e3 * (a - b) for a, b in zip(times[method], times["xfast_torch"])]
        median, ci95 = median_interval(diffs)
        result[method] = {"deepspeed_ms_per_step": median, "ci95": ci95, "round_diffs_ms": diffs}
    if "transformers" in times:
        for method in PAIRED:
            ratios = [loop / own for own, loop in zip(times[method], times["transformers"])]
            median, ci95 = median_interval(ratios)
            result.setdefault(method, {}).update(vs_loop=median, vs_loop_ci95=ci95, round_vs_loop=ratios)
    return result


def run_ranks(args: list[str], world: int, what: str, script: str = __file__) -> dict:
    """`script` (a benchmark that prints "RESULT <json>" on rank 0) with `args` in fresh
    subprocesses (one per rank); returns rank 0's RESULT."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, script, *args]
    if world > 1:
        port = str(free_port())
        envs = [dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in range(world)]
    else:
        envs = [env]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
             for e in envs]
    outs = [p.communicate(timeout=3600) for p in procs]
    line = next((l for l in outs[0][0].splitlines() if l.startswith("RESULT ")), None)
    if any(p.returncode for p in procs) or line is None:
        for out, err in outs:
            print(out[-2000:], err[-3000:], file=sys.stderr)
        raise SystemExit(f"{what} failed (exit {[p.returncode for p in procs]})")
    return json.loads(line[len("RESULT "):])


def measure(size_name: str, method: str, steps: int, warmup: int, ds_extra: dict, threads: int = 1,
            malloc: str = "xfast", adamw_kernel: str = "default", compile_flag: str = "config") -> dict:
    """One throughput measurement in fresh subprocesses (one per rank); returns rank 0's result."""
    return run_ranks(["--worker", size_name, method, "--steps", str(steps), "--warmup", str(warmup),
                 "--ds-extra", json.dumps(ds_extra), "--threads", str(threads), "--malloc", malloc,
                 "--baseline-adamw", adamw_kernel, "--compile", compile_flag],
                ranks_of(method), f"{size_name}/{method}")


def measure_paired(size_name: str, ranks: int, steps: int, warmup: int, ds_extra: dict, malloc: str = "xfast",
                   compile_flag: str = "config", adamw_kernel: str = "default") -> dict:
    """paired_worker on `ranks` ranks (each rank its share of the batch, as the demo's 2 ranks)."""
    return run_ranks(["--paired", size_name, "--paired-steps", str(steps), "--warmup", str(warmup),
                 "--ds-extra", json.dumps(ds_extra), "--malloc", malloc, "--compile", compile_flag,
                 "--baseline-adamw", adamw_kernel], ranks, f"{size_name}/paired on {ranks} ranks")


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def summarize(runs: dict, sizes, methods_of, paired: dict) -> list[dict]:
    """Rows per size: each method's best round, ratios, and the paired DeepSpeed cost per rank count
    (paired[size][ranks], as measure_paired returns it)."""
    rows = []
    for size_name in sizes:
        size = SIZES[size_name]
        row = {"size": size_name, "batch": size["batch"] * size["micro_batches"], "micro_batches": size["micro_batches"],
               "hidden": size["hidden"], "model": size["model"]}
        for method in methods_of[size_name]:
            results = runs[(size_name, method)]
            best = max(results, key=lambda r: r["samples_per_s"])
            row[method] = {**best, "median_samples_per_s": statistics.median(r["samples_per_s"] for r in results),
                           "all_samples_per_s": [r["samples_per_s"] for r in results]}
        ref = row.get("transformers", {}).get("samples_per_s")
        for method in methods_of[size_name]:
            if ref and method != "transformers":
                row[method]["vs_transformers"] = row[method]["samples_per_s"] / ref
                # the figure the targets are judged on: each round's ratio (the two ran minutes apart
                # at most), median over the rounds
                ratios = [r["samples_per_s"] / t["samples_per_s"]
                          for r, t in zip(runs[(size_name, method)], runs[(size_name, "transformers")])]
                row[method].update(round_ratios=ratios, median_round_ratio=statistics.median(ratios))
        if "xfast_2ranks" in row and "open_clip_2ranks" in row:
            row["xfast_2ranks"]["vs_open_clip_2ranks"] = (row["xfast_2ranks"]["samples_per_s"]
                                                         / row["open_clip_2ranks"]["samples_per_s"])
        if paired.get(size_name):
            row["deepspeed_cost"] = {str(ranks): result for ranks, result in sorted(paired[size_name].items())}
        rows.append(row)
    return rows


HEADER = ("Training throughput on CPU: 1 thread per process unless the command says --threads (2-rank methods: 2 processes), best of "
          "alternating rounds on a shared machine; demo data through xfast.data; xfast's process settings in the "
          "xfast methods only (unless the command says --malloc); the baselines' AdamW is torch's default (unless the "
          "command says --baseline-adamw fused), xfast's the fused kernel. vs transformers: the median "
          "over rounds of each round's ratio (every round runs each method once; balanced order since 2026-11-29 11:39, rotating before), then "
          "best round / best round. DeepSpeed ms/step: the paired figure of the table below (1 rank). --compile "
          "compiles xfast's towers only; the transformers loop stays eager (transformers_compiled is it compiled)")
PAIRED_HEADER = ("DeepSpeed's own cost per optimizer step, paired: torch, ZeRO-0 and ZeRO-2 copies of the model in "
                 "one process per rank, one step of each per round on the same in-memory batch (balanced order since 2026-11-29 11:39, rotating before); "
                 "median step time, and the median of (DeepSpeed step - torch step) over the rounds [95% interval]. "
                 "On 1 rank the eager transformers loop runs in the same rounds (since 2026-11-29 17:50; in that process "
                 "under xfast's malloc setting too, with the AdamW of --baseline-adamw): vs loop is the median over rounds of "
                 "(loop step / xfast step) [95% interval]")


def table(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| size | method | samples/s | ms/step | data wait | vs transformers | DeepSpeed ms/step | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for method in METHODS:
            if method not in row:
                continue
            r = row[method]
            vs = f"{r['vs_transformers']:.2f}x" if "vs_transformers" in r else ""
            if "median_round_ratio" in r:  # rows saved before it was computed have the best-of only
                vs = f"{r['median_round_ratio']:.2f}x (best {vs})"
            if "vs_open_clip_2ranks" in r:
                vs += f" ({r['vs_open_clip_2ranks']:.2f}x open_clip)"
            cost = row.get("deepspeed_cost", {}).get("1", {}).get(method)
            ds = _cost_cell(cost) if cost and "deepspeed_ms_per_step" in cost else ""
            rss = f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else ""  # rows saved before it was measured
            name = f"{method} (compiled towers)" if r.get("compiled") and method.startswith("xfast") else method
            lines.append(f"| {row['size']} (batch {row['batch']}) | {name} | {r['samples_per_s']:.0f} | "
                         f"{r['ms_per_step']:.1f} | {r['data_wait_share']:.0%} | {vs} | {ds} | {rss} |")
    costs = [(row, ranks, result) for row in rows for ranks, result in row.get("deepspeed_cost", {}).items()]
    if costs:
        lines += ["", PAIRED_HEADER, "",
                  "| size | ranks | torch step ms | ZeRO-0 ms/step | ZeRO-2 ms/step | DeepSpeed ZeRO-0 | DeepSpeed ZeRO-2 "
                  "| loop ms/step | vs loop: torch / ZeRO-0 / ZeRO-2 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row, ranks, result in costs:
            ms = result["ms_per_step"]
            ranks = f"{ranks}, compiled towers" if result.get("compiled") else ranks
            loop = vs_loop = ""
            if "transformers" in ms:  # results saved before the loop joined the paired rounds have none
                loop = f"{ms['transformers']:.1f}"
                vs_loop = " / ".join(_ratio_cell(result[m]) for m in PAIRED)
            lines.append(f"| {row['size']} (batch {row['batch']}) | {ranks} | {ms['xfast_torch']:.1f} | "
                         f"{ms['xfast_zero0']:.1f} | {ms['xfast']:.1f} | {_cost_cell(result['xfast_zero0'])} | "
                         f"{_cost_cell(result['xfast'])} | {loop} | {vs_loop} |")
    return "\n".join(lines)


def _ratio_cell(result: dict) -> str:
    low, high = result["vs_loop_ci95"]
    return f"{result['vs_loop']:.2f}x [{low:.2f}, {high:.2f}]"


def _cost_cell(cost: dict) -> str:
    low, high = cost["ci95"]
    return f"{cost['deepspeed_ms_per_step']:+.1f} [{low:+.1f}, {high:+.1f}]"


def save(rows: list[dict]) -> None:
    """Rows of the sizes measured now replace theirs in results/train.json; the others are kept."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "train.json"
    kept = json.loads(path.read_text()).get("rows", []) if path.is_file() else []
    # rows of another size are kept (rows without a size are from the previous format: dropped)
    rows = [r for r in kept if r.get("size") in SIZES and r["size"] not in {n["size"] for n in rows}] + rows
    rows.sort(key=lambda r: list(SIZES).index(r["size"]))
    path.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    (RESULTS / "train.md").write_text(table(rows, HEADER) + "\n\n" + "\n".join(
        f"- {r['size']}: `{r['command']}` on {r['machine']}, {r['date']}" for r in rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES), help="sizes to measure (default all)")
    parser.add_argument("--methods", nargs="*", choices=METHODS,
                        help="methods (none: only the paired DeepSpeed cost; default: per size; tiny: " + " ".join(DEFAULT_METHODS["tiny"]) + "; "
                             "tiny_clip_b4096: " + " ".join(DEFAULT_METHODS["large"]) + "; wide: "
                             + " ".join(DEFAULT_METHODS["wide"]) + ")")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per tiny measurement (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first, tiny sizes (default 5)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, each method once per round in the next balanced order (exactly balanced at "
                        "multiples of the period: n orders for n methods, 2n when n is odd); default 3")
    parser.add_argument("--ds-extra", type=json.loads, default={}, metavar="JSON",
                        help="DeepSpeed config keys merged into the xfast methods' config (the trainer's "
                             "deepspeed.extra), e.g. '{\"zero_optimization\": {\"overlap_comm\": true}}'")
    parser.add_argument("--paired-ranks", nargs="*", type=int, metavar="RANKS",
                        help="rank counts of the paired DeepSpeed-cost measurement (default: 1 2 for the tiny "
                             "sizes, none for the others; give the option without values to skip it)")
    parser.add_argument("--paired-steps", type=int, default=60,
                        help="rounds of the paired measurement, rounded up to whole balanced orders (default 60)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per training process (default 1: the loader worker has the other core)")
    parser.add_argument("--malloc", choices=("xfast", "all", "none"), default="xfast",
                        help="which methods' processes run with xfast's process settings "
                             "(xfast.training.process: keep_freed_memory, freeze_objects_before_fork): xfast = the "
                             "xfast methods, as the Trainer does (default); all = the baselines too, to show what the "
                             "settings alone are worth; none = glibc's and Python's defaults everywhere")
    parser.add_argument("--baseline-adamw", choices=("default", "fused"), default="default",
                        help="the transformers / open_clip baselines' AdamW: torch's default (on CPU a Python loop "
                             "over the parameters, what a plain loop gets; default) or fused=True, the kernel "
                             "xfast uses, to show what that flag alone is worth")
    parser.add_argument("--compile", choices=("config", "on", "off"), default="config",
                        help="compile the xfast methods' towers (as train.compile): config = as the size's demo "
                             "config (demo_clip_tiny / demo_clap_tiny) says (default; both say false now), on, off. "
                             "The transformers row stays eager; the transformers_compiled method is the loop "
                             "compiled")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/train.{json,md}")
    parser.add_argument("--worker", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--paired", metavar="SIZE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("steps", "repeat", "paired_steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.methods == [] and args.save:
        parser.error("--save needs throughput methods (the saved rows would have none)")

    from xfast.training import demo_data
    root, _ = demo_data.ensure()
    if args.worker:
        result = worker(*args.worker, args.steps, args.warmup, root, args.ds_extra, args.threads, args.malloc,
                        args.baseline_adamw, args.compile)
        if result is not None:
            print("RESULT " + json.dumps(result))
        return 0
    if args.paired:
        result = paired_worker(args.paired, args.paired_steps, args.warmup, root, args.ds_extra, args.malloc,
                               args.compile, args.baseline_adamw)
        if result is not None:
            print("RESULT " + json.dumps(result))
        return 0

    from tqdm.auto import tqdm
    methods_of = {s: list(default_methods(s) if args.methods is None else args.methods) for s in args.sizes}
    # round r runs every method once, in the r-th balanced order: each round is a paired comparison
    jobs = [(s, m) for r in range(args.repeat) for s in args.sizes if methods_of[s] for m in round_order(methods_of[s], r)]
    runs: dict[tuple[str, str], list[dict]] = {}
    command = " ".join(["python", "benchmarks/bench_train.py", *(argv if argv is not None else sys.argv[1:])])
    cpu = machine()
    paired: dict[str, dict[int, dict]] = {}
    for size_name in args.sizes:
        tiny = SIZES[size_name]["hidden"] == 32 and SIZES[size_name]["batch"] <= 256
        for ranks in args.paired_ranks if args.paired_ranks is not None else (1, 2) if tiny else ():
            paired.setdefault(size_name, {})[ranks] = measure_paired(size_name, ranks, args.paired_steps, args.warmup,
                                                                     args.ds_extra, args.malloc, args.compile,
                                                                     args.baseline_adamw)
    done: list[str] = []
    for size_name, method in tqdm(jobs, desc="bench_train", unit="run", disable=not sys.stderr.isatty()):
        size = SIZES[size_name]
        steps, warmup = size["steps"] or args.steps, size["warmup"] if size["warmup"] is not None else args.warmup
        result = measure(size_name, method, steps, warmup, args.ds_extra, args.threads, args.malloc,
                         args.baseline_adamw, args.compile)
        runs.setdefault((size_name, method), []).append(result)
        print(f"{size_name}/{method}: {result['samples_per_s']:.0f} samples/s, data wait {result['data_wait_share']:.0%}, "
              f"per step: training process {result['step_cpu_ms']:.1f} ms CPU ({result['step_sys_ms']:.1f} in the "
              f"kernel), {result['step_faults']:.0f} page faults; loader workers {result['loader_cpu_ms']:.1f} ms CPU, "
              f"{result['loader_faults']:.0f} page faults", file=sys.stderr, flush=True)
        complete = [s for s in args.sizes if all(len(runs.get((s, m), [])) == args.repeat for m in methods_of[s])]
        if complete != done:  # a size has all its rounds: report (and save) it now, not only at the end
            done = complete
            rows = summarize(runs, done, methods_of, paired)
            for row in rows:
                row.update(machine=cpu, repeat=args.repeat, command=command,
                           date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
            print(table(rows, HEADER), flush=True)
            if args.save:
                save(rows)
    if not jobs:  # only the paired DeepSpeed cost
        print(table(summarize(runs, args.sizes, methods_of, paired), HEADER), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
