"""DeepSpeed engine construction: process group, parameter groups, warmup+cosine schedule.

The optimizer is torch's AdamW handed to DeepSpeed as a client optimizer: DeepSpeed's own
"AdamW" (FusedAdam) JIT-compiles a C++/CUDA op for ~45 s on first use and buys nothing on CPU.
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

from xfast.config import ConfigError
from xfast.distributed.rendezvous import free_port
from xfast.training import zero_fastpath
from xfast.training.deepspeed_muon import import_muon
from xfast.training.run_dir import lr_factor

# Parameters that get no weight decay (open_clip's rule): 1-D tensors (biases, norm gains,
# logit scale) and anything named like a norm or the temperature.
_NO_DECAY_NAMES = ("bias", "norm", "ln_", "layernorm", "logit_scale")


def init_distributed() -> tuple[int, int]:
    """Join (or create) the process group; returns (rank, world_size).

    Under `deepspeed`/`torchrun` the launcher sets RANK, WORLD_SIZE, MASTER_ADDR/PORT. A plain
    `python -m xfast.train` run gets a one-process group on a free local port, because
    deepspeed.initialize otherwise goes looking for MPI.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() == "cpu":
        # DeepSpeed JIT-builds a shared-memory all-reduce op for CPU ranks (30-60 s per new venv,
        # under a lock file a killed build leaves behind, on which every later run waits forever).
        # Only its inference_all_reduce (tensor-parallel inference) calls that op: training's
        # collectives (ZeRO's reduce-scatter and all-gather, the gradient all-reduce) go through
        # torch.distributed (gloo) with or without it. DeepSpeed keeps its op-compatibility
        # table in this module attribute and consults it on load.
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def make_deterministic() -> None:
    """Deterministic kernels (train.deterministic), without the debugging fill that comes with
    them: torch.use_deterministic_algorithms also fills every torch.empty with NaN, and
    DeepSpeed's ZeRO allocates its ~5e8-element gradient buckets that way on every step (a
    50x slowdown of a small model on CPU). Filling is a check for reads of uninitialised
    memory, not a source of determinism: results are the same without it."""
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def comm_device() -> torch.device:
    """Where tensors for collectives live: the accelerator under NCCL, the CPU under gloo."""
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def _true_shape(param: nn.Parameter) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps the real shape in ds_shape


def param_groups(model: nn.Module, *, lr: float, weight_decay: float,
                 tower_lr: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: (tower, decay?) -> params, with per-tower learning rates.

    tower_lr maps a parameter-name prefix (a submodule path such as "text_tower") to its peak
    learning rate; parameters under no prefix use `lr`. Each group keeps its peak lr in
    "initial_lr" so the schedule scales every tower by the same factor.
    """
    tower_lr = dict(tower_lr or {})
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for prefix in tower_lr:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"train.tower_lr.{prefix}: no parameter lives under {prefix!r}; "
                              f"top-level modules are {', '.join(tops)}")
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tower = next((p for p in sorted(tower_lr, key=len, reverse=True)
                      if name == p or name.startswith(p + ".")), "")
        no_decay = len(_true_shape(param)) < 2 or any(k in name.lower() for k in _NO_DECAY_NAMES)
        key = (tower, no_decay)
        if key not in groups:
            group_lr = tower_lr.get(tower, lr)
            groups[key] = {"params": [], "names": [], "lr": group_lr, "initial_lr": group_lr,
                           "weight_decay": 0.0 if no_decay else weight_decay,
                           "name": f"{tower or 'default'}{'/no_decay' if no_decay else ''}"}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


class WarmupCosine:
    """lr factor: linear warmup from 0 over `warmup` steps, then cosine down to `floor`.

    A callable object rather than a lambda, so LambdaLR's state_dict (saved in checkpoints)
    carries its settings.
    """

    def __init__(self, warmup: int, total: int, floor: float):
        self.warmup, self.total, self.floor = warmup, total, floor

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup, self.total, self.floor)


def relay_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, *, warmup: int, total: int, floor: float) -> None:
    """After a resume: the schedule of the run's current config from the restored step on.

    LambdaLR's state_dict restores the WarmupCosine settings the checkpoint was written with;
    a run whose train.steps grew would otherwise train its extra steps at the old schedule's
    end (lr = floor, e.g. 0). xfast.training.run_dir warns about the change before the run starts."""
    for schedule in scheduler.lr_lambdas:
        schedule.__init__(warmup, total, floor)
    for group, base, schedule in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                     strict=True):
        group["lr"] = base * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


# ZeRO-2 settings for CPU ranks that change where gradients wait between backward and the
# optimizer, not what a step computes (tests/test_train_engine.py: the same weights bit for bit
# on 1 and 2 ranks). DeepSpeed's defaults allocate a 5e8-element reduce bucket afresh at every
# step and copy every gradient into it (contiguous_gradients); on CPU that costs a small model a
# large share of its step (benchmarks/bench_train.py, paired DeepSpeed cost). Not measured on
# GPUs, where contiguous buckets are what keeps big models' memory unfragmented: left alone there.
# A user's own keys in deepspeed.extra win.
ZERO_SPEED_DEFAULTS = {"contiguous_gradients": False}


def deepspeed_config(*, micro_batch_size: int, accumulation_steps: int, world_size: int,
                     zero_stage: int, precision: str, gradient_clipping: float,
                     extra: dict | None = None, device_type: str = "cpu") -> dict:
    """The DeepSpeed JSON config for one run (the trainer owns batch, ZeRO and precision keys);
    device_type: where the ranks compute ("cpu", "cuda", ...), which picks the speed defaults."""
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": micro_batch_size * accumulation_steps * world_size,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": {"stage": zero_stage,
                              **(ZERO_SPEED_DEFAULTS if zero_stage == 2 and device_type == "cpu" else {})},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # the trainer's progress bar reports instead
        "wall_clock_breakdown": False,
        # DeepSpeed's samples/s timer (on unless set) synchronizes the device when each forward
        # starts and each step ends (deepspeed/utils/timer.py, ThroughputTimer): two host syncs
        # per step on GPUs for a figure the trainer logs itself.
        "timers": {"throughput": {"enabled": False}},
    }
    return _merged(config, extra or {})


def _merged(base: dict, override: dict) -> dict:
    """override's keys over base's, recursively into sections both have as dicts (a user's
    {"timers": {"throughput": {"synchronized": false}}} keeps xfast's "enabled": false)."""
    merged = dict(base)
    for key, value in override.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merged(base[key], value) if both_dicts else value
    return merged


def adamw(module: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
          tower_lr: dict[str, float] | None = None, device_type: str | None = None) -> torch.optim.AdamW:
    """torch AdamW over param_groups(module): fused (one kernel per group of tensors) where every
    parameter is a float tensor and the device it trains on (device_type, e.g. DeepSpeed's
    accelerator, which the module is moved to after this; default: where the parameters are now)
    is the CPU or a CUDA device; else foreach (one multi-tensor update per group). torch's own
    default on CPU is a Python loop over the parameters. Fused and foreach are the same AdamW,
    rounded differently (the fused kernel has its own order of operations, and its vector body and
    tail round differently, so a flat tensor and the same values as separate tensors can differ in
    the last bit). ZeRO 1-3 (and bf16 at ZeRO-0) hand the optimizer their flat fp32 partitions
    instead, one per parameter group."""
    groups = param_groups(module, lr=lr, weight_decay=weight_decay, tower_lr=tower_lr)
    for group in groups:
        del group["names"]
    fused = all(fused_adamw_supports(p, device_type) for g in groups for p in g["params"])
    kernel = {"fused": True} if fused else {"foreach": True}
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kernel)
    optimizer.register_load_state_dict_pre_hook(_keep_this_runs_kernel)
    return optimizer


KERNEL_FLAGS = ("fused", "foreach")


def _keep_this_runs_kernel(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict | None:
    """A load_state_dict pre-hook: the loaded parameter groups keep the kernel flags chosen in this
    process. torch restores every key of a saved group, so a checkpoint written before xfast chose
    the fused kernel (fused None, foreach True) would turn a resumed run back to foreach. The flags
    say which implementation runs here, not what was learnt; with them set first, torch also
    places the loaded `step` counters as this kernel needs (float32 on the parameter's device for
    fused). Groups that do not pair up are left to torch, which refuses them."""
    saved = state_dict["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        return None
    groups = [{**old, **{k: now.get(k) for k in KERNEL_FLAGS}} for old, now in zip(saved, optimizer.param_groups)]
    return {**state_dict, "param_groups": groups}


def fused_adamw_supports(param: torch.Tensor, device_type: str | None = None) -> bool:
    """torch's fused AdamW takes this parameter on device_type (default: its own device): a
    floating-point tensor on the CPU or a CUDA device."""
    return param.is_floating_point() and (device_type or param.device.type) in ("cpu", "cuda")


def build_engine(module: nn.Module, *, ds_config: dict, lr: float, weight_decay: float,
                 betas: tuple[float, float], eps: float, tower_lr: dict[str, float],
                 warmup_steps: int, total_steps: int, min_lr_ratio: float, fast_path: bool = True):
    """deepspeed.initialize around `module` with torch AdamW and a warmup+cosine LambdaLR.

    DeepSpeed steps the scheduler once per optimizer step (at the accumulation boundary) and
    saves/loads its state with the checkpoint. fast_path: at ZeRO-0/1/2, xfast.training.zero_fastpath
    replaces some of DeepSpeed's per-step engine/optimizer methods with the same arithmetic in fewer
    tensor ops (rank 0 prints which, once).
    """
    import deepspeed

    optimizer = adamw(module, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, tower_lr=tower_lr,
                      device_type=comm_device().type)
    schedule = WarmupCosine(warmup_steps, total_steps, min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    import_muon()  # before deepspeed.initialize imports it with its kernels compiled (deepspeed_muon.py)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if ds_config["zero_optimization"]["stage"] == 0:
        if torch.distributed.get_world_size() == 1:
            # Stage 0 all-reduces every gradient after backward, through a flat copy of all of
            # them, even alone; with one rank there is nothing to average.
            engine.enable_backward_allreduce = False
        listed = zero_fastpath.module_parameters if fast_path else nn.Module.parameters
        engine.clip_fp32_gradients = lambda: clip_like_deepspeed(listed(engine.module), engine.gradient_clipping())
    if fast_path and ds_config["zero_optimization"]["stage"] in (0, 1, 2):
        replaced, why = (zero_fastpath.install_stage0(engine) if ds_config["zero_optimization"]["stage"] == 0
                         else zero_fastpath.install(engine.optimizer))
        message = (f"xfast train: ZeRO fast path: {', '.join(replaced) or 'nothing'} replaced"
                   f"{f' ({why})' if why else ''}; deepspeed.fast_path false turns it off")
        if torch.distributed.get_rank() == 0 and message not in _SAID:  # once per process, not per engine
            _SAID.add(message)
            print(message, file=sys.stderr, flush=True)
    return engine


_SAID: set[str] = set()


def clip_like_deepspeed(parameters, max_norm: float) -> None:
    """DeepSpeed's stage-0 fp32 gradient clipping (deepspeed.runtime.utils.clip_grad_norm_, 2-norm,
    no model parallelism), with its two loops over the parameters as foreach calls: the same
    per-tensor norms, sum of squares, averaged all-reduce (none with one rank, where it is the
    identity) and scale factor, so the same gradients bit for bit (tests/test_train_engine.py), for
    a fraction of the Python per parameter."""
    from deepspeed import comm
    from deepspeed.utils import groups

    grads = [p.grad.data for p in parameters if p.grad is not None]
    if not grads:
        return
    total = torch.stack(torch._foreach_norm(grads, 2.0)).pow(2.0).sum().float().pow(1.0 / 2.0)
    group = groups._get_data_parallel_group()
    world = comm.get_world_size(group=group)
    total = total * 1.0 / float(world)  # DeepSpeed's MoE-safe average
    if world > 1:  # a one-rank sum is the value itself (and costs gloo ~0.1 ms)
        comm.all_reduce(total, group=group)
    coef = torch.min(torch.tensor([1.0], device=total.device),
                     torch.tensor([float(max_norm)], device=total.device) / (total + 1e-6))
    torch._foreach_mul_(grads, coef.to(grads[0].device).reshape(()))


def engine_from_config(module: nn.Module, *, deepspeed_section, optim, micro_batch_size: int, world_size: int):
    """build_engine from the run's "deepspeed" and "train" sections; tower_lr keys name modules
    of the model, which the engine's module holds as `model`."""
    return build_engine(
        module, ds_config=deepspeed_config(
            micro_batch_size=micro_batch_size, accumulation_steps=deepspeed_section.accumulation_steps,
            world_size=world_size, zero_stage=deepspeed_section.zero_stage, precision=deepspeed_section.precision,
            gradient_clipping=deepspeed_section.gradient_clipping, extra=deepspeed_section.extra,
            device_type=comm_device().type),
        lr=optim.lr, weight_decay=optim.weight_decay, betas=tuple(optim.betas), eps=optim.eps,
        tower_lr={f"model.{k}": v for k, v in optim.tower_lr.items()}, warmup_steps=optim.warmup,
        total_steps=optim.steps, min_lr_ratio=optim.min_lr_ratio, fast_path=deepspeed_section.fast_path)
